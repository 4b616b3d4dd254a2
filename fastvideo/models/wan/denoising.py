"""The Wan family's denoising loop: the shared loop with Wan's hooks.

* Two experts (Wan2.2 A14B): ``transformer`` runs the steps with ``t >= boundary_ratio *
  num_train_timesteps`` at ``guidance_scale``, ``transformer_2`` the others at
  ``guidance_scale_2`` (``guidance_scale`` when unset), exactly as diffusers switches.
* Image conditioning (see ``conditioning.py``): ``concat`` joins the condition channels to
  the noisy latents per token; ``first_frame`` (TI2V) puts the image latents in place of the
  first latent frame, gives those tokens timestep 0, and puts them back after every step
  (the sampler is element-wise, so this equals diffusers' single blend after the loop:
  the first frame's evolving values never reach any other token).
* Wan2.1 I2V's DiT also takes the CLIP image states (``cond["image"]``).
"""

from __future__ import annotations

import torch

from fastvideo.cache.base import StepCacheCall
from fastvideo.models.wan.conditioning import CONDITION, NOISE_MASK
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime
from fastvideo.pipelines.stages.denoising import Denoiser, DenoisingStage
from fastvideo.wire.validation import cfg_scale


class WanDenoisingStage(DenoisingStage):
    """DenoisingStage for Wan2.1 (T2V, I2V) and Wan2.2 (A14B experts, TI2V).

    Args:
        transformer: the DiT (Wan2.2 A14B: the high-noise expert).
        transformer_2: the low-noise expert, with ``boundary_ratio``; else None.
    """

    def __init__(
        self,
        transformer: Denoiser,
        env: PipelineRuntime,
        transformer_2: Denoiser | None = None,
        boundary_ratio: float | None = None,
    ):
        super().__init__(transformer, env)
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("transformer_2 and boundary_ratio come together (Wan2.2 A14B)")
        self.transformer_2 = transformer_2
        self.boundary_ratio = boundary_ratio
        pt, ph, pw = env.spec.patch_size
        self.patch_features = pt * ph * pw

    def _low_noise(self, batch: ForwardBatch, t: torch.Tensor) -> bool:
        if self.boundary_ratio is None:
            return False
        boundary = self.boundary_ratio * batch.scheduler.num_train_timesteps
        return bool(t < boundary)  # the tensor comparison diffusers makes (t >= boundary)

    def denoiser(self, batch: ForwardBatch, step: int, t: torch.Tensor) -> Denoiser:
        if self._low_noise(batch, t):
            assert self.transformer_2 is not None
            return self.transformer_2
        return self.transformer

    def guidance_scales(self, batch: ForwardBatch, step: int, t: torch.Tensor) -> list[float]:
        scales = [cfg_scale(self.env.spec, item) for item in batch.items]
        if not self._low_noise(batch, t):
            return scales
        return [
            s if item.guidance_scale_2 is None else item.guidance_scale_2
            for s, item in zip(scales, batch.items, strict=True)
        ]

    def model_input(self, batch: ForwardBatch, latents: torch.Tensor, step: int) -> torch.Tensor:
        condition = batch.item_tensors.get(CONDITION)
        if condition is None:
            return latents
        mask = batch.item_tensors.get(NOISE_MASK)
        if mask is not None:  # first_frame: diffusers' blend, in fp32
            return (1 - mask) * condition + mask * latents
        # concat: per token, the latent channels then the condition channels of each patch
        # position (the DiT's patch embedding reads channels innermost).
        p = self.patch_features
        joined = torch.cat([latents.unflatten(-1, (p, -1)), condition.unflatten(-1, (p, -1))], -1)
        return joined.flatten(2)

    def model_timestep(self, batch: ForwardBatch, t: torch.Tensor, step: int) -> torch.Tensor:
        mask = batch.item_tensors.get(NOISE_MASK)
        if mask is None:
            return t.expand(batch.batch_size)
        return mask[..., 0] * t  # [B, L_shard]: 0 on the first frame's tokens

    def call_model(
        self,
        model: Denoiser,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: dict[str, torch.Tensor],
        batch: ForwardBatch,
        cache: StepCacheCall | None,
    ) -> torch.Tensor:
        image = cond.get("image")
        if image is None:
            return model.forward_tokens(x, timestep, cond["text"], batch.grid, batch.shard, cache)
        return model.forward_tokens(  # type: ignore[call-arg]
            x, timestep, cond["text"], batch.grid, batch.shard, cache, image=image
        )

    def after_step(self, batch: ForwardBatch, latents: torch.Tensor, step: int) -> torch.Tensor:
        mask = batch.item_tensors.get(NOISE_MASK)
        if mask is None:
            return latents
        return (1 - mask) * batch.item_tensors[CONDITION] + mask * latents
