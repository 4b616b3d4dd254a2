"""Re-check a request on the worker: the driver validates too, but a worker never trusts
what arrives over a socket."""

from __future__ import annotations

from fastvideo.models.registry import ModelSpec
from fastvideo.pipelines.base import ForwardBatch, PipelineStage, ProgressFn
from fastvideo.pipelines.validation import check_teacache, validate_generation


class InputValidationStage(PipelineStage):
    name = "input_validation"
    collective = False  # every rank validates the same request the same way

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def __call__(self, batch: ForwardBatch, progress: ProgressFn) -> ForwardBatch:
        n = batch.batch_size
        lists = (batch.negative_prompts, batch.seeds, batch.guidance_scales)
        if n == 0 or any(len(x) != n for x in lists):
            raise ValueError("request lists (prompts, negative prompts, seeds, guidance) differ")
        if len({g > 1.0 for g in batch.guidance_scales}) > 1:
            raise ValueError("a batch must not mix guidance on (>1) and off (<=1)")
        for i in range(n):
            validate_generation(
                self.spec,
                prompt=batch.prompts[i],
                negative_prompt=batch.negative_prompts[i],
                height=batch.height,
                width=batch.width,
                num_frames=batch.num_frames,
                num_inference_steps=batch.num_inference_steps,
                guidance_scale=batch.guidance_scales[i],
                seed=batch.seeds[i],
                output_type=batch.output_type,
            )
        if batch.teacache_thresh is not None:
            check_teacache(True, batch.teacache_thresh)
        return batch
