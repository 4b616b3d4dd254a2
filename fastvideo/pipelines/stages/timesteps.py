"""Create this request's scheduler (schedulers keep per-request state) and its timesteps."""

from __future__ import annotations

from collections.abc import Callable

from fastvideo.pipelines.base import ForwardBatch, PipelineStage, ProgressFn


class TimestepPreparationStage(PipelineStage):
    name = "timestep_preparation"

    def __init__(self, scheduler_factory: Callable[[], object]):
        self.scheduler_factory = scheduler_factory

    def __call__(self, batch: ForwardBatch, progress: ProgressFn) -> ForwardBatch:
        scheduler = self.scheduler_factory()
        scheduler.set_timesteps(batch.num_inference_steps)
        batch.scheduler = scheduler
        batch.timesteps = scheduler.timesteps
        return batch
