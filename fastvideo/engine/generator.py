"""``VideoGenerator``: the synchronous user API.

The driver process validates requests, picks the parallel plan and talks to the workers;
it never loads weights and never initialises CUDA.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastvideo.distributed.plan import ParallelPlan, choose_plan
from fastvideo.engine.configs import PipelineConfig, SamplingParam
from fastvideo.engine.model_info import ModelInfo, resolve_model
from fastvideo.engine.output import VideoOutput
from fastvideo.engine.protocol import GenerateRequest, GenerateResult, Progress
from fastvideo.logger import init_logger
from fastvideo.pipelines.validation import validate_generation
from fastvideo.workers.executor import Executor, create_executor

logger = init_logger(__name__)


def pick_device(config: PipelineConfig) -> str:
    """'cuda' or 'cpu' for the workers; checks num_gpus against the visible GPUs."""
    import torch

    count = torch.cuda.device_count()  # does not create a CUDA context
    device = config.device or ("cuda" if count > 0 else "cpu")
    if device == "cuda" and config.num_gpus > count:
        visible = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
        raise ValueError(
            f"num_gpus={config.num_gpus} but {count} CUDA device(s) are visible"
            + (f": {visible}" if visible else "")
            + " (set num_gpus accordingly, or CUDA_VISIBLE_DEVICES)"
        )
    return device


class VideoGenerator:
    """Generates videos with a model running on ``num_gpus`` worker processes."""

    def __init__(self, info: ModelInfo, config: PipelineConfig, executor: Executor, device: str):
        self.info = info
        self.config = config
        self.executor = executor
        self.device = device

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        num_gpus: int | None = None,
        pipeline_config: PipelineConfig | None = None,
        **overrides: Any,
    ) -> VideoGenerator:
        """Start workers for ``model`` (a Hugging Face id, a local diffusers folder, or
        the built-in demo id) and load it. ``overrides`` set ``PipelineConfig`` fields."""
        if pipeline_config is None:
            config = PipelineConfig.from_pretrained(model)
        else:
            config = pipeline_config.copy()
        config.update(**overrides)
        if num_gpus is not None:
            config.num_gpus = num_gpus
        config.validate()
        info = resolve_model(model)
        config.model_path = str(info.path)
        for use_cfg in (True, False):  # an impossible forced plan fails here, not later
            cls._plan(config, info, use_cfg)
        device = pick_device(config)
        start = time.perf_counter()
        executor = create_executor(info.path, config, device)
        logger.info(
            "loaded %s (%s) on %d %s worker(s) in %.1fs",
            model,
            info.variant.name,
            config.num_gpus,
            device,
            time.perf_counter() - start,
        )
        return cls(info, config, executor, device)

    @staticmethod
    def _plan(config: PipelineConfig, info: ModelInfo, use_cfg: bool) -> ParallelPlan:
        return choose_plan(
            config.num_gpus,
            info.spec.num_heads,
            use_cfg,
            cfg_parallel=config.cfg_parallel,
            sp_degree=config.sp_degree,
            ulysses_degree=config.ulysses_degree,
            ring_degree=config.ring_degree,
        )

    @property
    def default_sampling_param(self) -> SamplingParam:
        return SamplingParam().update(**self.info.variant.sampling_defaults)

    def build_request(self, prompt: str, param: SamplingParam) -> GenerateRequest:
        """Validate every field (before any model work) and pick the parallel plan."""
        check_sampling(self.info, prompt, param)
        plan = self._plan(self.config, self.info, param.guidance_scale > 1.0)
        logger.info(
            "parallel plan: %s on %d %s rank(s)", plan.describe(), plan.world_size, self.device
        )
        return GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompts=[prompt],
            negative_prompts=[param.negative_prompt or ""],
            seeds=[param.seed],
            guidance_scales=[float(param.guidance_scale)],
            height=param.height,
            width=param.width,
            num_frames=param.num_frames,
            num_inference_steps=param.num_inference_steps,
            output_type=param.output_type,
            cfg_degree=plan.cfg_degree,
            ulysses_degree=plan.ulysses_degree,
            ring_degree=plan.ring_degree,
        )

    def generate_video(
        self, prompt: str, sampling_param: SamplingParam | None = None, **overrides: Any
    ) -> VideoOutput:
        """Generate one video. ``overrides`` set ``SamplingParam`` fields for this call."""
        param = (sampling_param or self.default_sampling_param).copy().update(**overrides)
        request = self.build_request(prompt, param)
        start = time.perf_counter()
        with _StepProgress() as progress:
            result = self.executor.execute(request, progress)
        output = to_video_output(result, prompt, param)
        output.timings["end_to_end"] = time.perf_counter() - start
        path = param.resolve_output_file(prompt)
        if path is not None and output.frames is not None:
            output.save(path)
            logger.info("saved %s", path)
        return output

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def check_sampling(info: ModelInfo, prompt: str, param: SamplingParam) -> None:
    """Raise TypeError/ValueError naming the first invalid field of a request."""
    validate_generation(
        info.spec,
        prompt=prompt,
        negative_prompt=param.negative_prompt,
        height=param.height,
        width=param.width,
        num_frames=param.num_frames,
        num_inference_steps=param.num_inference_steps,
        guidance_scale=param.guidance_scale,
        seed=param.seed,
        fps=param.fps,
        output_type=param.output_type,
    )


def to_video_output(result: GenerateResult, prompt: str, param: SamplingParam) -> VideoOutput:
    """The first (only) video of a result as a VideoOutput."""
    frames = result.frames[0].numpy() if result.frames is not None else None
    latents = result.latents[0] if result.latents is not None else None
    return VideoOutput(
        frames=frames,
        fps=param.fps,
        seed=param.seed,
        prompt=prompt,
        negative_prompt=param.negative_prompt,
        timings=dict(result.timings),
        latents=latents,
        request_id=result.request_id,
        plan=result.plan,
        peak_memory_bytes=list(result.peak_memory_bytes),
    )


class _StepProgress:
    """A tqdm bar over denoising steps, fed by the workers' progress events."""

    def __init__(self) -> None:
        self.bar = None

    def __enter__(self) -> _StepProgress:
        return self

    def __call__(self, event: Progress) -> None:
        if event.stage != "denoising" or event.total_steps == 0:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=event.total_steps, desc="denoising", unit="step", disable=None)
        self.bar.update(event.step - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
