"""Wan2.1 text-to-video: the components it loads and the stages it runs."""

from __future__ import annotations

from fastvideo.models.wan import components
from fastvideo.pipelines.base import ComposedPipelineBase, PipelineStage
from fastvideo.pipelines.stages.decoding import DecodingStage
from fastvideo.pipelines.stages.denoising import DenoisingStage
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latents import LatentPreparationStage
from fastvideo.pipelines.stages.text_encoding import TextEncodingStage
from fastvideo.pipelines.stages.timesteps import TimestepPreparationStage


class WanT2VPipeline(ComposedPipelineBase):
    """prompt -> UMT5 states -> flow-matching denoising with the Wan DiT -> Wan VAE."""

    component_loaders = {
        "transformer": components.load_transformer,
        "scheduler": components.load_sampler,
        "text_encoder": components.load_wan_text_encoder,  # with its tokenizer
        "vae": components.load_vae,
    }
    # Text is encoded once and video decoded once, on the output rank.
    output_rank_components = ("text_encoder", "vae")

    def create_stages(self) -> list[PipelineStage]:
        c, env = self.components, self.env
        dit = c["transformer"]
        return [
            InputValidationStage(env),
            TextEncodingStage(
                c.get("text_encoder"),
                env,
                components.text_output_spec(dit.config.text_dim, env.dtypes["transformer"]),
            ),
            TimestepPreparationStage(c["scheduler"]),
            LatentPreparationStage(env, dit.config.in_channels),
            DenoisingStage(dit, env),
            DecodingStage(c.get("vae"), env),
        ]
