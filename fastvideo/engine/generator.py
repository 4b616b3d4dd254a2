"""``VideoGenerator``: the synchronous user API, a thin layer over ``EngineCore``.

The driver process validates requests, schedules them and talks to the workers; it
never loads weights and never initialises CUDA.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastvideo.distributed.plan import choose_plan
from fastvideo.engine.configs import RING_BACKENDS, PipelineConfig, SamplingParam
from fastvideo.engine.core import (
    EngineCore,
    EventSink,
    ProgressEvent,
    check_sampling,
    wire_request,
)
from fastvideo.engine.model_info import ModelInfo, resolve_model
from fastvideo.engine.output import VideoOutput
from fastvideo.engine.protocol import GenerateRequest
from fastvideo.logger import init_logger
from fastvideo.scheduler import Mode
from fastvideo.workers.executor import Executor, create_executor

logger = init_logger(__name__)

__all__ = ["VideoGenerator", "check_sampling", "pick_device", "start_engine"]


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


def start_engine(
    model: str,
    num_gpus: int | None,
    pipeline_config: PipelineConfig | None,
    overrides: dict[str, Any],
) -> EngineCore:
    """Resolve the model, check the configuration, start the workers and the core."""
    info = resolve_model(model)  # once: the defaults below come from it too
    if pipeline_config is None:
        pipeline_config = PipelineConfig(model_path=model).update(**info.variant.pipeline_defaults)
    config = pipeline_config.copy().update(**overrides)
    if num_gpus is not None:
        config.num_gpus = num_gpus
    config.validate()
    config.model_path = str(info.path)
    backend = config.resolved_attention_backend() or "auto"
    for use_cfg in (True, False):  # an impossible forced plan fails here, not later
        plan = choose_plan(config.num_gpus, info.spec.num_heads, use_cfg, **config.plan_kwargs())
        if plan.ring_degree > 1 and backend not in RING_BACKENDS:
            raise ValueError(
                f"attention_backend={backend!r} cannot run ring attention, and with "
                f"num_gpus={config.num_gpus} and {info.spec.num_heads} heads the plan with "
                f"guidance {'on' if use_cfg else 'off'} is {plan.describe()}. Use a GPU count "
                f"whose Ulysses degree divides the heads (ulysses_degree=, cfg_parallel=), or "
                f"attention_backend 'auto' or 'sdpa'"
            )
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
    return EngineCore(info, config, executor, device)


class VideoGenerator:
    """Generates videos with a model running on ``num_gpus`` worker processes."""

    def __init__(self, core: EngineCore):
        self.core = core

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
        return cls(start_engine(model, num_gpus, pipeline_config, overrides))

    @property
    def info(self) -> ModelInfo:
        return self.core.info

    @property
    def config(self) -> PipelineConfig:
        return self.core.config

    @property
    def executor(self) -> Executor:
        return self.core.executor

    @property
    def default_sampling_param(self) -> SamplingParam:
        return self.core.default_sampling_param

    def generate_video(
        self,
        prompt: str | list[str],
        sampling_param: SamplingParam | list[SamplingParam] | None = None,
        **overrides: Any,
    ) -> VideoOutput | list[VideoOutput]:
        """Generate one video, or a list of videos for a list of prompts (in input order).

        ``overrides`` set ``SamplingParam`` fields for this call. With a list of prompts and
        one param, video i gets seed ``param.seed + i`` (logged); with a list of params,
        each keeps its own. Every request is validated before any is queued.
        """
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        params = self._params(prompts, sampling_param, overrides)
        for p, param in zip(prompts, params, strict=True):
            check_sampling(self.info, p, param, self.core.config)
        events: queue.Queue = queue.Queue()
        sinks = [EventSink(lambda event, i=i: events.put((i, event))) for i in range(len(prompts))]
        pending = list(zip(prompts, params, sinks, strict=True))

        def feed() -> None:  # the queue is bounded: top it up as requests finish
            if pending:
                del pending[: self.core.submit_many(pending)]

        outputs = _collect(events, len(prompts), params[0].num_inference_steps, feed)
        for out, param in zip(outputs, params, strict=True):
            path = param.resolve_output_file(out.prompt) if out.frames is not None else None
            if path is not None:
                out.save(path)
                logger.info("saved %s", path)
        return outputs[0] if single else outputs

    def _params(
        self,
        prompts: list[str],
        sampling_param: SamplingParam | list[SamplingParam] | None,
        overrides: dict[str, Any],
    ) -> list[SamplingParam]:
        if not prompts:
            raise ValueError("prompt must be a non-empty string or a non-empty list of them")
        if isinstance(sampling_param, list):
            if len(sampling_param) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(sampling_param)} params")
            return [p.copy().update(**overrides) for p in sampling_param]
        base = (sampling_param or self.default_sampling_param).copy().update(**overrides)
        if len(prompts) == 1:
            return [base]
        params = [base.copy().update(seed=base.seed + i) for i in range(len(prompts))]
        logger.info(
            "seeds %d..%d for %d prompts (base seed %d + index)",
            base.seed,
            base.seed + len(prompts) - 1,
            len(prompts),
            base.seed,
        )
        return params

    def build_request(self, prompt: str, param: SamplingParam) -> GenerateRequest:
        """The wire request the engine would send for one prompt (validated, latency-mode
        plan), for callers that drive the executor directly."""
        check_sampling(self.info, prompt, param, self.core.config)
        plan = self.core.plan_for(param.guidance_scale > 1.0, Mode.LATENCY)
        request_id = uuid.uuid4().hex
        return wire_request(request_id, [(prompt, param)], [request_id], plan)

    def shutdown(self) -> None:
        self.core.shutdown()

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _collect(
    events: queue.Queue, count: int, steps: int, feed: Callable[[], None]
) -> list[VideoOutput]:
    """Wait for ``count`` requests' outputs (in index order), calling ``feed`` to queue
    more whenever one finishes (the queue is bounded); a tqdm bar counts denoising steps
    of all of them and finished videos. Raises the first error once all are done."""
    from tqdm.auto import tqdm

    outputs: list[VideoOutput | None] = [None] * count
    errors: list[BaseException | None] = [None] * count
    done_steps = [0] * count
    bar = tqdm(total=count * steps, desc="denoising", unit="step", disable=None)
    finished = 0
    try:
        feed()
        while finished < count:
            try:
                index, event = events.get(timeout=0.5)
            except queue.Empty:
                feed()  # room may have opened up through other clients' requests
                continue
            if isinstance(event, ProgressEvent):
                if event.stage == "denoising" and event.total_steps:
                    done_steps[index] = event.step
                    bar.update(sum(done_steps) - bar.n)
                continue
            finished += 1
            feed()
            if isinstance(event, BaseException):
                errors[index] = event
            else:
                outputs[index] = event
            if count > 1:
                bar.set_postfix(videos=f"{finished}/{count}")
    finally:
        bar.close()
    first_error = next((e for e in errors if e is not None), None)
    if first_error is not None:
        raise first_error
    return outputs  # type: ignore[return-value]
