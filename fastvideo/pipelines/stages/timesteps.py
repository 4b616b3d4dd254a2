"""Create this batch's sampler (samplers keep per-request state) and its timesteps."""

from __future__ import annotations

from collections.abc import Callable

from fastvideo.pipelines.base import ForwardBatch, PipelineStage, StepControl


class TimestepPreparationStage(PipelineStage):
    name = "timestep_preparation"

    def __init__(self, sampler_factory: Callable[[], object]):
        self.sampler_factory = sampler_factory

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        sampler = self.sampler_factory()
        sampler.set_timesteps(batch.first.num_inference_steps)  # type: ignore[attr-defined]
        batch.scheduler = sampler
        batch.timesteps = sampler.timesteps  # type: ignore[attr-defined]
        return batch
