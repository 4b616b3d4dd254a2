"""``VideoGenerator``: the blocking user API, a thin layer over ``EngineCore``.

The driver process validates requests, schedules them and talks to the workers; it never
loads weights and never initialises CUDA.
"""

from __future__ import annotations

import math
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from fastvideo.config import PipelineConfig, SamplingParam
from fastvideo.engine.core import EngineCore, EventSink, ProgressEvent, Request
from fastvideo.engine.model_info import ModelInfo
from fastvideo.engine.output import VideoOutput, release_output_file, write_video
from fastvideo.engine.startup import start_engine
from fastvideo.executor.base import Executor
from fastvideo.logger import init_logger
from fastvideo.wire.errors import OutputSaveError

logger = init_logger(__name__)

__all__ = ["VideoGenerator"]

MAX_VIDEOS_PER_PROMPT = 64


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
        a built-in demo id) and load it. ``overrides`` set ``PipelineConfig`` fields."""
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

    @overload
    def generate_video(
        self, prompt: str, sampling_param: SamplingParam | None = None, **overrides: Any
    ) -> VideoOutput: ...

    @overload
    def generate_video(
        self,
        prompt: list[str],
        sampling_param: SamplingParam | list[SamplingParam] | None = None,
        **overrides: Any,
    ) -> list[VideoOutput]: ...

    def generate_video(
        self,
        prompt: str | list[str],
        sampling_param: SamplingParam | list[SamplingParam] | None = None,
        callback_on_step_end: Callable[[ProgressEvent], None] | None = None,
        **overrides: Any,
    ) -> VideoOutput | list[VideoOutput]:
        """Generate one video, or a list of videos for a list of prompts (in input order).

        ``overrides`` set ``SamplingParam`` fields for this call. With a list of prompts and
        one param, video i gets seed ``param.seed + i`` (logged); with a list of params,
        each keeps its own; ``num_videos_per_prompt=n`` repeats each prompt n times with
        consecutive seeds (and returns a list). ``callback_on_step_end(event)`` is called in
        this thread after every denoising step of every request (a ``ProgressEvent``); if
        it raises, this call's requests are aborted and the error is raised. Every request
        is validated, and every output file planned, before any is queued. Ctrl-C
        (KeyboardInterrupt) aborts this call's requests and re-raises.
        """
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable")
        prompts = [prompt] if single else list(prompt)
        params = self._params(prompts, sampling_param, overrides)
        prompts, params = _repeat(prompts, params)
        single = single and len(prompts) == 1
        events: queue.Queue = queue.Queue()
        requests: list[Request] = []
        try:
            for i, (p, param) in enumerate(zip(prompts, params, strict=True)):
                sink = EventSink(lambda event, i=i: events.put((i, event)))
                requests.append(self.core.new_request(p, param, sink))
        except BaseException:
            for r in requests:
                release_output_file(r.output_file)
            raise
        pending = list(requests)

        def feed() -> None:  # the queue is bounded: top it up as requests finish
            if pending:
                del pending[: self.core.submit_many(pending)]

        def interrupted() -> None:
            pending.clear()
            for r in requests:
                self.core.abort(r.request_id)

        steps = requests[0].item.num_inference_steps
        outputs, errors = _collect(
            events, len(requests), steps, feed, interrupted, callback_on_step_end
        )
        _save(outputs, requests)  # the videos that were made are saved even if one failed
        first_error = next((e for e in errors if e is not None), None)
        if first_error is not None:
            raise first_error
        return outputs[0] if single else outputs  # type: ignore[return-value]

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
            for p in sampling_param:
                _check_param(p)
            return [p.copy().update(**overrides) for p in sampling_param]
        if sampling_param is not None:
            _check_param(sampling_param)
        base = (sampling_param or self.default_sampling_param).copy().update(**overrides)
        if len(prompts) == 1:
            return [base]
        if not isinstance(base.seed, int) or isinstance(base.seed, bool):
            raise TypeError(f"seed must be an int, got {type(base.seed).__name__} {base.seed!r}")
        params = [base.copy().update(seed=base.seed + i) for i in range(len(prompts))]
        logger.info(
            "seeds %d..%d for %d prompts (base seed %d + index)",
            base.seed,
            base.seed + len(prompts) - 1,
            len(prompts),
            base.seed,
        )
        return params

    # --- LoRA ------------------------------------------------------------------------------
    def load_lora(self, path: str, scale: float = 1.0, name: str | None = None) -> str:
        """Merge a LoRA (safetensors: diffusers/PEFT, the family's original names, kohya)
        into the DiT on every worker; later requests use it. Returns its name."""
        return lora_load(self.core, path, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        lora_set_scale(self.core, name, scale)

    def unload_lora(self, name: str) -> None:
        """Remove a LoRA; the weights are bitwise what they were without it."""
        self.core.control("lora_unload", {"name": name})

    def loras(self) -> dict[str, float]:
        """Loaded LoRAs: name -> scale."""
        return self.core.control("lora_list", {})

    def shutdown(self) -> None:
        self.core.shutdown()

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _lora_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def lora_load(core: EngineCore, path: object, scale: object, name: object) -> str:
    """Validate on the driver, then load on every worker."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).expanduser().exists():
        raise ValueError(f"lora path: no such file {path!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"lora name must be a non-empty str, got {name!r}")
    name = name or Path(path).stem
    args = {"path": str(Path(path).expanduser()), "scale": _lora_scale(scale), "name": name}
    core.control("lora_load", args)
    return name


def lora_set_scale(core: EngineCore, name: str, scale: object) -> None:
    core.control("lora_set_scale", {"name": name, "scale": _lora_scale(scale)})


def _repeat(
    prompts: list[str], params: list[SamplingParam]
) -> tuple[list[str], list[SamplingParam]]:
    """Each prompt ``num_videos_per_prompt`` times, with seeds seed, seed+1, ..."""
    out_prompts, out_params = [], []
    for prompt, param in zip(prompts, params, strict=True):
        n = param.num_videos_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_VIDEOS_PER_PROMPT:
            raise ValueError(
                f"num_videos_per_prompt must be an int in [1, {MAX_VIDEOS_PER_PROMPT}], got {n!r}"
            )
        if n > 1 and (isinstance(param.seed, bool) or not isinstance(param.seed, int)):
            raise TypeError(f"seed must be an int, got {type(param.seed).__name__}")
        for i in range(n):
            out_prompts.append(prompt)
            out_params.append(param if n == 1 else param.copy().update(seed=param.seed + i))
    return out_prompts, out_params


def _check_param(param: object) -> None:
    if not isinstance(param, SamplingParam):
        raise TypeError(f"sampling_param must be a SamplingParam, got {type(param).__name__}")


def _save(outputs: list[VideoOutput | None], requests: list[Request]) -> None:
    """Write every output that has a planned file; a failure loses no other output (all
    are returned through OutputSaveError)."""
    errors = []
    for out, request in zip(outputs, requests, strict=True):
        path = request.output_file
        if path is None or out is None or out.frames is None:
            release_output_file(path)
            continue
        try:
            out.output_path = write_video(out.numpy(), path, out.fps)
            logger.info("saved %s", path)
        except Exception as e:  # noqa: BLE001 - reported below, with every output
            errors.append(f"{path}: {type(e).__name__}: {e}")
        finally:
            release_output_file(path)
    if errors:
        raise OutputSaveError(
            f"{len(errors)} of {len(outputs)} video(s) could not be saved: " + "; ".join(errors),
            outputs,
        )


def _collect(
    events: queue.Queue,
    count: int,
    steps: int,
    feed: Callable[[], None],
    interrupted: Callable[[], None],
    callback: Callable[[ProgressEvent], None] | None = None,
) -> tuple[list[VideoOutput | None], list[BaseException | None]]:
    """Wait for ``count`` requests' outputs (in index order), calling ``feed`` to queue
    more whenever one finishes (the queue is bounded); a tqdm bar counts denoising steps
    of all of them and finished videos. Returns (outputs, errors) by index; on
    KeyboardInterrupt calls ``interrupted`` and re-raises."""
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
                    if callback is not None and event.step > 0:
                        callback(event)
                continue
            finished += 1
            feed()
            if isinstance(event, BaseException):
                errors[index] = event
            else:
                outputs[index] = event
            if count > 1:
                bar.set_postfix(videos=f"{finished}/{count}")
    except BaseException:  # Ctrl-C, or the caller's callback raised: stop this call's work
        interrupted()
        raise
    finally:
        bar.close()
    return outputs, errors
