"""HunyuanVideo text-to-video: the components it loads and the stages it runs."""

from __future__ import annotations

import torch

from fastvideo.cache.base import StepCacheCall
from fastvideo.models.hunyuan import components
from fastvideo.models.hunyuan.transformer import HunyuanTransformer3D
from fastvideo.pipelines.base import ComposedPipelineBase, ForwardBatch, PipelineStage
from fastvideo.pipelines.stages.decoding import DecodingStage
from fastvideo.pipelines.stages.denoising import DenoisingStage
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latents import LatentPreparationStage
from fastvideo.pipelines.stages.text_encoding import TextEncodingStage
from fastvideo.pipelines.stages.timesteps import TimestepPreparationStage


def embedded_guidance(batch: ForwardBatch, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows] guidance input: each item's ``guidance_scale`` x 1000, its pass repeated
    (rows = B, or 2B for batched CFG). Built in the DiT dtype and then scaled, exactly as
    diffusers does: in bf16, 6.0 x 1000 is 6016."""
    scales = [item.guidance_scale for item in batch.items]
    return torch.tensor(scales * (rows // len(scales)), dtype=dtype) * 1000.0


class HunyuanDenoisingStage(DenoisingStage):
    """The generic loop with HunyuanVideo's DiT inputs: the text mask, the CLIP pooled
    embedding and the embedded guidance scale.

    Classifier-free guidance is diffusers' "true CFG": ``true_cfg_scale`` when a negative
    prompt is given (``wire.validation.cfg_scale``, which the generic ``guidance_scales``
    already applies for a model whose guidance is embedded); the embedded scale goes into
    both passes.
    """

    def call_model(
        self,
        model: HunyuanTransformer3D,  # type: ignore[override]
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: dict[str, torch.Tensor],
        batch: ForwardBatch,
        cache: StepCacheCall | None,
    ) -> torch.Tensor:
        guidance = embedded_guidance(batch, x.shape[0], model.dtype).to(x.device)
        assert batch.grid is not None
        return model.forward_tokens(
            x, timestep, cond["text"], cond["text_mask"], cond["pooled"], guidance,
            batch.grid, batch.shard, cache,
        )  # fmt: skip


class HunyuanVideoT2VPipeline(ComposedPipelineBase):
    """prompt -> Llama states + CLIP pooled -> flow-matching Euler denoising with the
    HunyuanVideo DiT -> HunyuanVideo VAE."""

    component_loaders = {
        "transformer": components.load_transformer,
        "scheduler": components.load_sampler,
        # Both encoders and tokenizers (text_encoder[_2], tokenizer[_2]).
        "text_encoder": components.load_prompt_encoder,
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
                components.text_output_spec(dit.config, env.dtypes["transformer"]),
            ),
            TimestepPreparationStage(c["scheduler"]),
            # diffusers draws [B, in_channels, (F-1)/4+1, H/8, W/8] fp32 noise per seed.
            LatentPreparationStage(env, dit.config.in_channels),
            HunyuanDenoisingStage(dit, env),
            DecodingStage(c.get("vae"), env),
        ]
