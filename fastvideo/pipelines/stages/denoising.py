"""The denoising loop: DiT forward(s) per step, classifier-free guidance, sampler step.

With CFG on, the conditional and unconditional passes either run as one batched forward
(CFG degree 1) or on the two halves of the ranks (CFG-parallel), which then exchange their
predictions once per step. At every step boundary the replica agrees, collectively, on
which items leave the batch (aborted, or NaN/inf latents).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from fastvideo.cache.base import StepCache, StepCacheCall, create_step_cache
from fastvideo.layers.sequence import SequenceShard, TokenGrid
from fastvideo.logger import init_logger
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl

logger = init_logger(__name__)


class Denoiser(Protocol):
    """What the stage needs of a family's DiT."""

    dtype: torch.dtype

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        grid: TokenGrid,
        shard: SequenceShard | None = None,
        cache: StepCacheCall | None = None,
    ) -> torch.Tensor:
        """[B, L_shard, P*C] noisy tokens -> [B, L_shard, P*C] prediction."""
        ...


class DenoisingStage(PipelineStage):
    name = "denoising"

    def __init__(self, transformer: Denoiser, env: PipelineRuntime):
        self.transformer = transformer
        self.env = env

    def _guidance(self, batch: ForwardBatch, like: torch.Tensor) -> torch.Tensor | float:
        scales = [item.guidance_scale for item in batch.items]
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
            cache = None if batch.step_cache is None else StepCacheCall(batch.step_cache, branches)
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

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        assert batch.timesteps is not None and batch.latents is not None
        total = len(batch.timesteps)
        latents = batch.latents
        batch.step_cache = self._step_cache(batch, total)
        step_times = []
        for i, t in enumerate(batch.timesteps):
            batch.latents = latents
            batch = self.boundary(batch, i, control)
            if batch.batch_size == 0:
                return batch  # every item left (aborted or failed)
            latents = batch.latents
            if batch.step_cache is not None:
                batch.step_cache.begin_step(i)
            start = time.perf_counter()
            noise_pred = self.predict(batch, latents, t.to(self.env.device))
            latents = batch.scheduler.step(noise_pred, latents)
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            step_times.append(time.perf_counter() - start)
            control.progress(self.name, i + 1, total)
        batch.latents = latents
        batch = self.boundary(batch, total, control)  # catches NaNs of the last step
        batch.timings["denoising_step_mean"] = sum(step_times) / max(1, len(step_times))
        if batch.step_cache is not None:
            cache = batch.step_cache
            batch.stats.update(cache.stats())
            logger.info(
                "batch %s: %s (thresh %g) skipped %s of %d steps",
                batch.batch_id,
                cache.name,
                cache.thresh,
                cache.skipped(),
                total,
            )
            batch.step_cache = None
        return batch

    def _step_cache(self, batch: ForwardBatch, steps: int) -> StepCache | None:
        first = batch.first
        if first.cache is None:
            return None
        calibration = self.env.settings.caches.get(first.cache)
        if calibration is None:
            raise ValueError(f"cache {first.cache!r} is not calibrated for this model")
        runtime = self.env.runtime
        replica = runtime.groups.replica

        def sync(values: torch.Tensor) -> None:
            if replica.size > 1:
                on_device = values.to(self.env.device)
                runtime.all_reduce_max_(replica, on_device)
                values.copy_(on_device.cpu())

        return create_step_cache(first.cache, first.cache_thresh, calibration, steps, sync)

    def boundary(self, batch: ForwardBatch, step: int, control: StepControl) -> ForwardBatch:
        """At a step boundary, drop items that were aborted or whose latents hold NaN/inf.

        Every rank of the replica must drop the same items at the same step, so the
        ranks' abort flags and NaN checks are combined with one small max all-reduce.
        """
        runtime = self.env.runtime
        n = batch.batch_size
        control.at_step(batch, step)
        requested = control.abort_requested()
        flags = torch.zeros(2, n, device=self.env.device)
        flags[0] = torch.tensor([float(i in requested) for i in batch.item_ids])
        if batch.latents is not None:
            flags[1] = (~torch.isfinite(batch.latents)).flatten(1).any(dim=1).float()
        runtime.all_reduce_max_(runtime.groups.replica, flags)
        aborted, bad = flags.bool().tolist()
        if not any(aborted) and not any(bad):
            return batch
        for i, item in enumerate(batch.item_ids):
            if aborted[i]:
                batch.aborted.append(item)
            elif bad[i]:
                batch.failures[item] = f"non-finite (NaN/inf) latents at step {step}"
        keep = [i for i in range(n) if not aborted[i] and not bad[i]]
        logger.info("batch %s: %d item(s) left at step %d", batch.batch_id, n - len(keep), step)
        return batch.select(keep)
