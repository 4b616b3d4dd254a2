"""EngineCore: the one engine behind ``VideoGenerator`` and ``AsyncVideoEngine``.

schedule -> execute -> update, on one background thread. Requests are validated when
submitted (before they are queued), wait in the scheduler, run in batches on the
executor's workers, and every request ends finished, failed or aborted: its sink gets
progress events and then exactly one output or error.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from fastvideo.distributed.plan import ParallelPlan, choose_plan
from fastvideo.engine.configs import PipelineConfig, SamplingParam
from fastvideo.engine.model_info import ModelInfo
from fastvideo.engine.output import VideoOutput
from fastvideo.engine.protocol import GenerateRequest, GenerateResult, Progress
from fastvideo.logger import init_logger
from fastvideo.pipelines.validation import check_teacache, validate_generation
from fastvideo.scheduler import (
    Batch,
    Mode,
    QueueFullError,
    RequestState,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)
from fastvideo.workers.executor import EngineDeadError, Executor, RequestFailedError

logger = init_logger(__name__)


class RequestAbortedError(RuntimeError):
    """The request was aborted by its caller before it finished."""


@dataclass(frozen=True)
class ProgressEvent:
    """Where a request is: ``stage`` ('text_encoding', 'denoising', ...) and, while
    denoising, ``step`` of ``total_steps``; ``elapsed`` seconds since its batch started."""

    request_id: str
    stage: str
    step: int
    total_steps: int
    elapsed: float


class RequestSink(Protocol):
    """Receives one request's events (called from engine threads; must not block long)."""

    def progress(self, event: ProgressEvent) -> None: ...
    def finish(self, output: VideoOutput) -> None: ...
    def fail(self, error: BaseException) -> None: ...


class EventSink:
    """A RequestSink that hands every event (progress, output or error) to one function."""

    def __init__(self, put: Callable[[object], None]):
        self._put = put

    def progress(self, event: ProgressEvent) -> None:
        self._put(event)

    def finish(self, output: VideoOutput) -> None:
        self._put(output)

    def fail(self, error: BaseException) -> None:
        self._put(error)


@dataclass
class _Item:
    """What the engine keeps of one request (the scheduler's opaque payload)."""

    prompt: str
    param: SamplingParam
    sink: RequestSink
    submitted: float


def check_sampling(
    info: ModelInfo, prompt: str, param: SamplingParam, config: PipelineConfig | None = None
) -> None:
    """Raise TypeError/ValueError naming the first invalid field of a request (``config``:
    the engine's, for options the request needs from it)."""
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
    check_teacache(param.enable_teacache, param.teacache_thresh)
    if param.enable_teacache and config is not None and not config.teacache_coefficients:
        raise ValueError(
            "enable_teacache=True but this engine has no TeaCache calibration "
            "(PipelineConfig.teacache_coefficients is None; the registered Wan2.1 models "
            "set it, a custom PipelineConfig must too)"
        )


def batch_key(param: SamplingParam) -> tuple:
    """Requests with equal keys can share one batched forward."""
    teacache = param.teacache_thresh if param.enable_teacache else None
    return (param.height, param.width, param.num_frames, param.num_inference_steps,
            param.guidance_scale > 1.0, param.output_type, teacache)  # fmt: skip


class EngineCore:
    """Scheduler + executor, driven by one background thread."""

    def __init__(self, info: ModelInfo, config: PipelineConfig, executor: Executor, device: str):
        self.info = info
        self.config = config
        self.executor = executor
        self.device = device
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=config.max_batch_size,
                max_waiting_requests=config.max_waiting_requests,
                mode=config.parallel_mode,
                throughput_replicas=config.replicas(),
            )
        )
        self._cond = threading.Condition()
        self._dirty = False
        self._stopped = False
        self._dead: BaseException | None = None
        self._last_plan: tuple[Mode, ParallelPlan] | None = None
        self._batch_requests: dict[str, str] = {}  # batch id -> wire request id
        self._thread = threading.Thread(target=self._loop, name="fastvideo-core", daemon=True)
        self._thread.start()

    @property
    def default_sampling_param(self) -> SamplingParam:
        """A fresh SamplingParam with the model's defaults."""
        return SamplingParam().update(**self.info.variant.sampling_defaults)

    # --- requests ----------------------------------------------------------------------
    def submit(
        self,
        prompt: str,
        param: SamplingParam,
        sink: RequestSink,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Validate and queue one request; raises at once if invalid or the queue is full."""
        request = self._new_request(prompt, param, sink, request_id, priority)
        self._enqueue([request], partial=False)
        return request.request_id

    def submit_many(
        self, requests: list[tuple[str, SamplingParam, RequestSink]], partial: bool = True
    ) -> int:
        """Validate and queue several requests at once (so they can share batches).

        With ``partial``, queues as many as fit (maybe none) and returns that count: the
        caller submits the rest later. Otherwise all or none (``QueueFullError``).
        """
        new = [self._new_request(p, param, sink, None, 0) for p, param, sink in requests]
        return self._enqueue(new, partial)

    def _new_request(
        self,
        prompt: str,
        param: SamplingParam,
        sink: RequestSink,
        request_id: str | None,
        priority: int,
    ) -> ScheduledRequest:
        check_sampling(self.info, prompt, param, self.config)
        item = _Item(prompt, param.copy(), sink, time.perf_counter())
        return ScheduledRequest(request_id or uuid.uuid4().hex, batch_key(param), priority, item)

    def _enqueue(self, requests: list[ScheduledRequest], partial: bool) -> int:
        limit = self.config.max_waiting_requests
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(str(self._dead))
            if self._stopped:
                raise EngineDeadError("the engine was shut down")
            room = limit - self.scheduler.num_waiting
            if partial and room <= 0:
                return 0
            if room <= 0 or (not partial and room < len(requests)):
                raise QueueFullError(
                    f"{self.scheduler.num_waiting} requests are already waiting; retry later or "
                    f"raise PipelineConfig.max_waiting_requests (now {limit})"
                )
            accepted = requests[:room]
            for request in accepted:
                self.scheduler.add(request)
            self._dirty = True
            self._cond.notify()
        return len(accepted)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting request now, or a running one at its next step boundary.
        Returns False when the request is unknown or already over."""
        with self._cond:
            request = self.scheduler.abort(request_id)
            wire_id = self._batch_requests.get(request.batch_id or "") if request else None
        if request is None:
            return False
        if request.state is RequestState.ABORTED:  # it was still waiting
            request.payload.sink.fail(RequestAbortedError(f"request {request_id} was aborted"))
            with self._cond:
                self._dirty = True
                self._cond.notify()
        elif wire_id is not None:
            self.executor.abort(wire_id, [request_id])
        return True

    # --- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                self._dirty = False
                batches = self.scheduler.schedule() if self._dead is None else []
                wires = [(b, self._wire_request(b)) for b in batches]
            for batch, wire in wires:
                self._launch(batch, wire)

    def plan_for(self, use_cfg: bool, mode: Mode) -> ParallelPlan:
        """The parallel plan a batch runs with (forced options apply to latency mode)."""
        world, heads = self.config.num_gpus, self.info.spec.num_heads
        if mode is Mode.THROUGHPUT:
            return choose_plan(world, heads, use_cfg, dp_degree=self.config.replicas())
        return choose_plan(world, heads, use_cfg, **self.config.plan_kwargs())

    def _wire_request(self, batch: Batch) -> GenerateRequest:
        items = [r.payload for r in batch.requests]
        plan = self.plan_for(items[0].param.guidance_scale > 1.0, batch.mode)
        if self._last_plan != (batch.mode, plan):
            self._last_plan = (batch.mode, plan)
            logger.info(
                "parallel plan: %s on %d %s rank(s) (%s mode)",
                plan.describe(),
                plan.world_size,
                self.device,
                batch.mode.value,
            )
        wire = wire_request(
            f"{batch.batch_id}-{uuid.uuid4().hex[:8]}",
            [(i.prompt, i.param) for i in items],
            batch.request_ids,
            plan,
            batch.replica,
        )
        self._batch_requests[batch.batch_id] = wire.request_id
        return wire

    def _launch(self, batch: Batch, wire: GenerateRequest) -> None:
        def on_progress(event: Progress) -> None:
            for r in batch.requests:
                if not r.state.is_final:
                    r.payload.sink.progress(
                        ProgressEvent(
                            r.request_id, event.stage, event.step, event.total_steps, event.elapsed
                        )
                    )

        future = self.executor.submit(wire, on_progress)
        future.add_done_callback(lambda f: self._on_done(batch, wire, f))

    # --- completion --------------------------------------------------------------------
    def _on_done(self, batch: Batch, wire: GenerateRequest, future: Future) -> None:
        try:
            result: GenerateResult = future.result()
        except EngineDeadError as e:
            self._engine_died(e)
            return
        except BaseException as e:  # the whole batch failed on the workers
            self._finish(batch, failed={r.request_id: e for r in batch.requests})
            return
        failed: dict[str, BaseException] = {
            item: RequestFailedError(item, 0, "NonFiniteLatents", why)
            for item, why in result.failures.items()
        }
        self._finish(batch, failed=failed, aborted=set(result.aborted_ids), result=result)

    def _finish(
        self,
        batch: Batch,
        failed: dict[str, BaseException],
        aborted: set[str] = frozenset(),  # type: ignore[assignment]
        result: GenerateResult | None = None,
    ) -> None:
        with self._cond:
            self._batch_requests.pop(batch.batch_id, None)
            try:
                requests = self.scheduler.finish(batch.batch_id, failed=failed, aborted=aborted)
            except KeyError:  # already failed with the whole engine (it died meanwhile)
                return
            self._dirty = True
            self._cond.notify()
        index = {item: i for i, item in enumerate(result.item_ids)} if result else {}
        for r in requests:
            item: _Item = r.payload
            if r.request_id in aborted:
                item.sink.fail(RequestAbortedError(f"request {r.request_id} was aborted"))
            elif r.request_id in failed:
                item.sink.fail(failed[r.request_id])
            else:
                assert result is not None
                output = to_video_output(result, index[r.request_id], item.prompt, item.param)
                output.request_id = r.request_id
                output.timings["end_to_end"] = time.perf_counter() - item.submitted
                item.sink.finish(output)

    def _engine_died(self, error: BaseException) -> None:
        with self._cond:
            if self._dead is None:
                self._dead = error
            requests = self.scheduler.fail_all(error)
            self._dirty = True
            self._cond.notify()
        for r in requests:
            r.payload.sink.fail(error)

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead is None and not self._stopped and self.executor.is_alive

    def shutdown(self) -> None:
        """Stop the loop and the workers; every unfinished request fails."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify()
        self.executor.shutdown()
        self._engine_died(EngineDeadError("the engine was shut down"))
        self._thread.join(timeout=5)


def wire_request(
    request_id: str,
    items: list[tuple[str, SamplingParam]],
    item_ids: list[str],
    plan: ParallelPlan,
    replica: int = 0,
) -> GenerateRequest:
    """The message that runs ``items`` (prompt, param) as one batch under ``plan``; the
    shared fields (size, frames, steps, output type) come from the first item."""
    first = items[0][1]
    return GenerateRequest(
        request_id=request_id,
        prompts=[prompt for prompt, _ in items],
        negative_prompts=[param.negative_prompt or "" for _, param in items],
        seeds=[param.seed for _, param in items],
        guidance_scales=[float(param.guidance_scale) for _, param in items],
        height=first.height,
        width=first.width,
        num_frames=first.num_frames,
        num_inference_steps=first.num_inference_steps,
        output_type=first.output_type,
        cfg_degree=plan.cfg_degree,
        ulysses_degree=plan.ulysses_degree,
        ring_degree=plan.ring_degree,
        item_ids=list(item_ids),
        dp_degree=plan.dp_degree,
        replica=replica,
        teacache_thresh=first.teacache_thresh if first.enable_teacache else None,
    )


def to_video_output(
    result: GenerateResult, index: int, prompt: str, param: SamplingParam
) -> VideoOutput:
    """Item ``index`` of a batch result as a VideoOutput."""
    frames = result.frames[index].numpy() if result.frames is not None else None
    latents = result.latents[index] if result.latents is not None else None
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
        stats=dict(result.stats),
    )
