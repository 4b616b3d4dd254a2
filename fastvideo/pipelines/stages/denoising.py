"""The denoising loop: DiT forward(s) per step, classifier-free guidance, scheduler step.

With CFG on, the conditional and unconditional passes either run as one batched forward
(CFG degree 1) or on the two halves of the ranks (CFG-parallel), which then exchange
their predictions once per step.
"""

from __future__ import annotations

import time

import torch

from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, ProgressFn


class DenoisingStage(PipelineStage):
    name = "denoising"

    def __init__(self, transformer, env: PipelineRuntime):
        self.transformer = transformer
        self.env = env

    def _guidance(self, batch: ForwardBatch, like: torch.Tensor) -> torch.Tensor | float:
        scales = batch.guidance_scales
        if len(set(scales)) == 1:
            return float(scales[0])  # a Python scalar keeps the reference's bf16 arithmetic
        return torch.tensor(scales, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def predict(self, batch: ForwardBatch, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction for this rank's tokens: [B, L_shard, P*C]."""
        model = self.transformer
        b = batch.batch_size
        x = latents.to(model.dtype)
        run = lambda x, t, text: model.forward_tokens(x, t, text, batch.grid, batch.shard)  # noqa: E731
        if not batch.do_cfg:
            return run(x, t.expand(b), batch.prompt_embeds)
        cfg = self.env.runtime.groups.cfg
        if cfg.size == 1:
            out = run(
                torch.cat([x, x]),
                t.expand(2 * b),
                torch.cat([batch.prompt_embeds, batch.negative_prompt_embeds]),
            )
            cond, uncond = out[:b], out[b:]
        else:
            text = batch.prompt_embeds if cfg.rank == 0 else batch.negative_prompt_embeds
            both = self.env.runtime.all_gather(cfg, run(x, t.expand(b), text), dim=0)
            cond, uncond = both[:b], both[b:]
        return uncond + self._guidance(batch, uncond) * (cond - uncond)

    def __call__(self, batch: ForwardBatch, progress: ProgressFn) -> ForwardBatch:
        assert batch.timesteps is not None and batch.latents is not None
        total = len(batch.timesteps)
        latents = batch.latents
        step_times = []
        for i, t in enumerate(batch.timesteps):
            batch.latents = latents
            batch = self._boundary(batch, i)
            if batch.batch_size == 0:
                return batch  # every request left (aborted or failed)
            latents = batch.latents
            start = time.perf_counter()
            noise_pred = self.predict(batch, latents, t.to(self.env.device))
            latents = batch.scheduler.step(noise_pred, latents)
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            step_times.append(time.perf_counter() - start)
            progress(self.name, i + 1, total)
        batch.latents = latents
        batch = self._boundary(batch, total)  # catches NaNs of the last step
        batch.timings["denoising_step_mean"] = sum(step_times) / max(1, len(step_times))
        return batch

    @staticmethod
    def _boundary(batch: ForwardBatch, step: int) -> ForwardBatch:
        return batch.step_hook(batch, step) if batch.step_hook is not None else batch
