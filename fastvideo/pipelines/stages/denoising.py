"""The denoising loop: DiT forward(s) per step, classifier-free guidance, scheduler step.

With CFG on, the conditional and unconditional passes either run as one batched forward
(CFG degree 1) or on the two halves of the ranks (CFG-parallel), which then exchange
their predictions once per step.
"""

from __future__ import annotations

import time

import torch

from fastvideo.logger import init_logger
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, ProgressFn
from fastvideo.pipelines.teacache import TeaCache, TeaCacheCall, TeaCacheParams

logger = init_logger(__name__)


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

        def run(
            x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, branches: dict
        ) -> torch.Tensor:
            cache = TeaCacheCall(batch.teacache, branches) if batch.teacache is not None else None
            return model.forward_tokens(x, t, text, batch.grid, batch.shard, cache)

        if not batch.do_cfg:
            return run(x, t.expand(b), batch.prompt_embeds, {"cond": slice(0, b)})
        cfg = self.env.runtime.groups.cfg
        if cfg.size == 1:
            out = run(
                torch.cat([x, x]),
                t.expand(2 * b),
                torch.cat([batch.prompt_embeds, batch.negative_prompt_embeds]),
                {"cond": slice(0, b), "uncond": slice(b, 2 * b)},
            )
            cond, uncond = out[:b], out[b:]
        else:
            text = batch.prompt_embeds if cfg.rank == 0 else batch.negative_prompt_embeds
            branch = {"cond" if cfg.rank == 0 else "uncond": slice(0, b)}
            both = self.env.runtime.all_gather(cfg, run(x, t.expand(b), text, branch), dim=0)
            cond, uncond = both[:b], both[b:]
        return uncond + self._guidance(batch, uncond) * (cond - uncond)

    def __call__(self, batch: ForwardBatch, progress: ProgressFn) -> ForwardBatch:
        assert batch.timesteps is not None and batch.latents is not None
        total = len(batch.timesteps)
        latents = batch.latents
        batch.teacache = self._teacache(batch)
        step_times = []
        for i, t in enumerate(batch.timesteps):
            batch.latents = latents
            batch = self._boundary(batch, i)
            if batch.batch_size == 0:
                return batch  # every request left (aborted or failed)
            latents = batch.latents
            if batch.teacache is not None:
                batch.teacache.step = i
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
        if batch.teacache is not None:
            batch.stats.update(batch.teacache.stats())
            logger.info(
                "request %s: TeaCache (thresh %g) skipped %s of %d steps",
                batch.request_id,
                batch.teacache_thresh,
                batch.teacache.skipped(),
                total,
            )
            batch.teacache = None
        return batch

    def _teacache(self, batch: ForwardBatch) -> TeaCache | None:
        if batch.teacache_thresh is None:
            return None
        calibration = self.env.options.get("teacache")
        if calibration is None:
            raise ValueError("TeaCache is not calibrated for this model (no coefficients)")
        params = TeaCacheParams(
            thresh=batch.teacache_thresh,
            coefficients=tuple(calibration["coefficients"]),
            warmup_steps=int(calibration.get("warmup_steps", 5)),
        )
        runtime = self.env.runtime
        replica = runtime.groups.replica

        def sync(values: torch.Tensor) -> None:
            if replica.size > 1:
                on_device = values.to(self.env.device)
                runtime.all_reduce_max_(replica, on_device)
                values.copy_(on_device.cpu())

        return TeaCache(params, sync)

    @staticmethod
    def _boundary(batch: ForwardBatch, step: int) -> ForwardBatch:
        return batch.step_hook(batch, step) if batch.step_hook is not None else batch
