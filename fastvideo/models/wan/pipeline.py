"""The Wan family's pipeline: the components it loads and the stages it runs, for every
Wan checkpoint kind (the checkpoint's ModelSpec and folders say which stages apply).

* Wan2.1 T2V: prompt -> UMT5 states -> denoising with the DiT -> Wan VAE.
* Wan2.1 I2V: + CLIP image states and the image's VAE latents (``concat``).
* Wan2.2 A14B T2V / I2V: two experts switched at the boundary timestep (+ ``concat``).
* Wan2.2 TI2V-5B: text-only, or the image's latents as the first frame (``first_frame``).
"""

from __future__ import annotations

from fastvideo.models.wan import components
from fastvideo.models.wan.conditioning import ImageConditioningStage
from fastvideo.models.wan.denoising import WanDenoisingStage
from fastvideo.models.wan.image_encoder import load_image_encoder
from fastvideo.pipelines.base import ComposedPipelineBase, PipelineStage
from fastvideo.pipelines.stages.decoding import DecodingStage
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latents import LatentPreparationStage
from fastvideo.pipelines.stages.text_encoding import TextEncodingStage
from fastvideo.pipelines.stages.timesteps import TimestepPreparationStage


class WanVideoPipeline(ComposedPipelineBase):
    """Text- and image-to-video for Wan2.1 and Wan2.2 checkpoints."""

    component_loaders = {
        "transformer": components.load_transformer,
        "transformer_2": components.load_second_expert,  # None unless two experts
        "scheduler": components.load_sampler,
        "text_encoder": components.load_wan_text_encoder,  # with its tokenizer
        "image_encoder": load_image_encoder,  # None unless the DiT takes CLIP states
        "vae": components.load_vae,
    }
    # Text and image are encoded once, and video decoded once, on the output rank.
    output_rank_components = ("text_encoder", "image_encoder", "vae")

    def _image_stage(self) -> ImageConditioningStage | None:
        env, dit = self.env, self.components["transformer"]
        if env.spec.image_input == "none":
            return None
        mode = "first_frame" if env.spec.image_input == "optional" else "concat"
        c = self.components
        return ImageConditioningStage(
            env, mode, c.get("vae"), c.get("image_encoder"), clip_states=dit.takes_image
        )

    def _denoising_stage(self) -> WanDenoisingStage:
        c = self.components
        expert = c.get("transformer_2")
        if expert is None:
            return WanDenoisingStage(c["transformer"], self.env)
        return WanDenoisingStage(c["transformer"], self.env, expert.model, expert.boundary_ratio)

    def create_stages(self) -> list[PipelineStage]:
        c, env = self.components, self.env
        dit = c["transformer"]
        image_stage = self._image_stage()
        return [
            InputValidationStage(env),
            TextEncodingStage(
                c.get("text_encoder"),
                env,
                components.text_output_spec(dit.config.text_dim, env.dtypes["transformer"]),
            ),
            TimestepPreparationStage(c["scheduler"]),
            LatentPreparationStage(env, env.spec.latent_channels),
            *([image_stage] if image_stage is not None else []),
            self._denoising_stage(),
            DecodingStage(c.get("vae"), env),
        ]


# The name the text-to-video pipeline had; the same class serves it.
WanT2VPipeline = WanVideoPipeline
