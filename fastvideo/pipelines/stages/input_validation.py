"""Re-check a batch on the worker: the driver validates every item, but a worker never
trusts what arrives over a socket."""

from __future__ import annotations

from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl
from fastvideo.wire.validation import validate_batch


class InputValidationStage(PipelineStage):
    name = "input_validation"
    collective = False  # every rank validates the same batch the same way

    def __init__(self, env: PipelineRuntime):
        self.env = env

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        settings = self.env.settings
        validate_batch(self.env.spec, batch.items, settings.limits, tuple(settings.caches))
        return batch
