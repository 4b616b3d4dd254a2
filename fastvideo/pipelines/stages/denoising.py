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
from fastvideo.wire.validation import cfg_scale

logger = init_logger(__name__)


class Denoiser(Protocol):
    """What the stage needs of a family's DiT (``call_model`` adapts other signatures)."""

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


def _cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([a[name], b[name]]) for name in a}


class DenoisingStage(PipelineStage):
    """The family-neutral loop. A family changes what its models need through the hooks
    (``denoiser``, ``guidance_scales``, ``model_input``, ``model_timestep``, ``call_model``,
    ``after_step``) in a subclass in its own folder."""

    name = "denoising"

    def __init__(self, transformer: Denoiser, env: PipelineRuntime):
        self.transformer = transformer
        self.env = env

    # --- hooks ---------------------------------------------------------------------------
    def denoiser(self, batch: ForwardBatch, step: int, t: torch.Tensor) -> Denoiser:
        """The DiT that runs this step (two-expert models switch on the timestep)."""
        return self.transformer

    def guidance_scales(self, batch: ForwardBatch, step: int, t: torch.Tensor) -> list[float]:
        """Each item's classifier-free guidance scale at this step."""
        return [cfg_scale(self.env.spec, item) for item in batch.items]

    def model_input(self, batch: ForwardBatch, latents: torch.Tensor, step: int) -> torch.Tensor:
        """The DiT's token input [B, L_shard, P*C_in] (image-to-video adds channels)."""
        return latents

    def model_timestep(self, batch: ForwardBatch, t: torch.Tensor, step: int) -> torch.Tensor:
        """[B] timesteps, or [B, L_shard] per token."""
        return t.expand(batch.batch_size)

    def call_model(
        self,
        model: Denoiser,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: dict[str, torch.Tensor],
        batch: ForwardBatch,
        cache: StepCacheCall | None,
    ) -> torch.Tensor:
        return model.forward_tokens(x, timestep, cond["text"], batch.grid, batch.shard, cache)

    def after_step(self, batch: ForwardBatch, latents: torch.Tensor, step: int) -> torch.Tensor:
        """The latents after the sampler's step (e.g. a conditioning frame put back)."""
        return latents

    # --- the guided prediction -----------------------------------------------------------
    def _guidance(self, scales: list[float], like: torch.Tensor) -> torch.Tensor | float:
        if len(set(scales)) == 1:
            return float(scales[0])  # a Python scalar keeps the reference's bf16 arithmetic
        return torch.tensor(scales, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def predict(
        self, batch: ForwardBatch, latents: torch.Tensor, step: int, t: torch.Tensor
    ) -> torch.Tensor:
        """Guided noise prediction for this rank's tokens: [B, L_shard, P*C]."""
        model = self.denoiser(batch, step, t)
        b = batch.batch_size
        x = self.model_input(batch, latents, step).to(model.dtype)
        ts = self.model_timestep(batch, t, step)

        def run(x: torch.Tensor, ts: torch.Tensor, cond: dict, branches: dict) -> torch.Tensor:
            cache = None if batch.step_cache is None else StepCacheCall(batch.step_cache, branches)
            return self.call_model(model, x, ts, cond, batch, cache)

        if not batch.do_cfg:
            return run(x, ts, batch.conditioning, {"cond": slice(0, b)})
        cfg = self.env.runtime.groups.cfg
        if cfg.size == 1:
            cond = _cat(batch.conditioning, batch.negative_conditioning)
            both = {"cond": slice(0, b), "uncond": slice(b, 2 * b)}
            out = run(torch.cat([x, x]), torch.cat([ts, ts]), cond, both)
            positive, negative = out[:b], out[b:]
        else:
            mine = batch.conditioning if cfg.rank == 0 else batch.negative_conditioning
            branch = {"cond" if cfg.rank == 0 else "uncond": slice(0, b)}
            both = self.env.runtime.all_gather(cfg, run(x, ts, mine, branch), dim=0)
            positive, negative = both[:b], both[b:]
        scale = self._guidance(self.guidance_scales(batch, step, t), negative)
        return negative + scale * (positive - negative)

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
            noise_pred = self.predict(batch, latents, i, t.to(self.env.device))
            latents = self.after_step(batch, batch.scheduler.step(noise_pred, latents), i)
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
