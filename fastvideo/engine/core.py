"""EngineCore: the one engine behind ``VideoGenerator`` and ``AsyncVideoEngine``.

schedule -> execute -> update, on one background thread. A request is built once from a
``SamplingParam`` into a ``RequestItem`` and validated when submitted (before it is
queued); it waits in the scheduler, runs in a batch on the executor's workers, and ends
finished, failed, aborted or timed out: its sink gets progress events and then exactly
one output or error. Nothing one request does (a bad result, a raising sink) can stop the
core thread or another request.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fastvideo.config import PipelineConfig, SamplingParam
from fastvideo.distributed.plan import ParallelPlan, choose_plan
from fastvideo.engine.images import load_image, request_size
from fastvideo.engine.model_info import ModelInfo
from fastvideo.engine.output import (
    VideoOutput,
    check_fps,
    plan_output_file,
    release_output_file,
    to_frames,
)
from fastvideo.executor.base import Executor
from fastvideo.logger import init_logger
from fastvideo.scheduler import (
    Batch,
    Mode,
    QueueFullError,
    RequestState,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)
from fastvideo.wire.errors import (
    EngineDeadError,
    RequestAbortedError,
    RequestFailedError,
    RequestTimeoutError,
)
from fastvideo.wire.messages import BatchResult, GenerateBatch, Progress, RequestItem
from fastvideo.wire.spec import ModelSpec
from fastvideo.wire.validation import batch_key, check_image, uses_cfg, validate_item

logger = init_logger(__name__)


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
class Request:
    """What the engine keeps of one request (the scheduler's opaque payload)."""

    item: RequestItem
    fps: int
    output_file: Path | None
    sink: RequestSink
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its batch was launched (monotonic)
    # Set by a successful abort or a timeout: no progress is reported from then on.
    aborted: bool = False

    @property
    def request_id(self) -> str:
        return self.item.request_id


class EngineCore:
    """Scheduler + executor, driven by one background thread."""

    def __init__(self, info: ModelInfo, config: PipelineConfig, executor: Executor, device: str):
        self.info = info
        self.config = config
        self.executor = executor
        self.device = device
        self.limits = config.engine_config.limits()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=config.max_batch_size,
                max_waiting_requests=config.max_waiting_requests,
                mode=config.parallel_mode,
                throughput_replicas=config.replicas(),
                max_finished_history=0,  # finished requests are the caller's, not ours
            )
        )
        self._cond = threading.Condition()
        self._dirty = False
        self._stopped = False
        self._dead: BaseException | None = None
        self._last_plan: tuple[Mode, ParallelPlan] | None = None
        self._running: dict[str, Batch] = {}  # batch id -> running batch
        self._timed_out: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="fastvideo-core", daemon=True)
        self._thread.start()

    @property
    def default_sampling_param(self) -> SamplingParam:
        """A fresh SamplingParam with the model's defaults."""
        return SamplingParam().update(**self.info.variant.sampling_defaults)

    # --- building requests ---------------------------------------------------------------
    def build_item(self, prompt: object, param: SamplingParam, request_id: str) -> RequestItem:
        """The request's item, validated (TypeError/ValueError naming the first bad field)."""
        return build_item(self.info.spec, self.config, prompt, param, request_id)

    def new_request(
        self,
        prompt: object,
        param: SamplingParam,
        sink: RequestSink,
        request_id: str | None = None,
        save: bool = True,
    ) -> Request:
        """Build and validate one request; with ``save``, its output file is planned (and
        reserved) now, so a bad path fails before any work."""
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        item = self.build_item(prompt, param, request_id or uuid.uuid4().hex)
        output_file = None
        if save and item.output_type != "latent":
            output_file = plan_output_file(param.output_path, item.prompt, item.seed)
        return Request(item, param.fps, output_file, sink)

    # --- submitting ----------------------------------------------------------------------
    def submit(self, request: Request, priority: int = 0) -> str:
        """Queue one request; raises at once if the queue is full or the engine is dead."""
        self._check_priority(priority)
        self._enqueue([self._scheduled(request, priority)], partial=False)
        return request.request_id

    def submit_many(self, requests: list[Request], partial: bool = True) -> int:
        """Queue several requests at once (so they can share batches).

        With ``partial``, queues as many as fit (maybe none) and returns that count: the
        caller submits the rest later. Otherwise all or none (``QueueFullError``).
        """
        return self._enqueue([self._scheduled(r, 0) for r in requests], partial)

    @staticmethod
    def _check_priority(priority: object) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__}")

    def _scheduled(self, request: Request, priority: int) -> ScheduledRequest:
        key = batch_key(self.info.spec, request.item)
        return ScheduledRequest(request.request_id, key, priority, request)

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
            for i, request in enumerate(accepted):
                try:
                    self.scheduler.add(request)
                except ValueError:  # a duplicate id: the ones before it stay queued
                    if i == 0 or not partial:
                        raise
                    accepted = accepted[:i]
                    break
            self._dirty = True
            self._cond.notify()
        return len(accepted)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting request now, or a running one at its next step boundary. Once
        this returns True the engine starts no more progress reports of it (one already
        being handed to its sink may still arrive; the async stream drops even that), only
        its end: the abort error, or its output when it finished first. Returns False
        when the request is unknown or already over."""
        with self._cond:
            scheduled = self.scheduler.abort(request_id)
        if scheduled is None:
            return False
        scheduled.payload.aborted = True
        if scheduled.state is RequestState.ABORTED:  # it was still waiting
            self._deliver(
                scheduled.payload, RequestAbortedError(f"request {request_id} was aborted")
            )
            with self._cond:
                self._dirty = True
                self._cond.notify()
        elif scheduled.batch_id is not None:
            self.executor.abort(scheduled.batch_id, [request_id])
        return True

    # --- changing the model --------------------------------------------------------------
    def control(self, op: str, args: dict, timeout_s: float = 600.0) -> dict[str, float]:
        """Run a model-changing command on every worker (between batches: batches already
        sent finish as they were, later ones see the change); raises on any rank's error."""
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(str(self._dead))
        replies = self.executor.control(op, args).result(timeout=timeout_s)
        errors = [f"rank {r.rank}: {r.error}" for r in replies if r.error]
        if errors:
            raise RuntimeError(f"{op} failed: " + "; ".join(errors))
        return dict(replies[0].value) if replies else {}

    # --- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        tick = 0.2 if self.config.request_timeout_s is not None else None
        while True:
            with self._cond:
                while not self._dirty and not self._stopped:
                    if not self._cond.wait(timeout=tick) and tick is not None:
                        break  # time to look for overdue requests
                if self._stopped:
                    return
                self._dirty = False
                batches = self.scheduler.schedule() if self._dead is None else []
                wires = []
                for batch in batches:
                    try:
                        wires.append((batch, self._wire_batch(batch)))
                    except Exception as e:  # noqa: BLE001 - that batch fails, not the loop
                        logger.exception("could not build batch %s", batch.batch_id)
                        self._finish(batch, failed={r.request_id: e for r in batch.requests})
            for batch, wire in wires:
                self._launch(batch, wire)
            if tick is not None:
                self._abort_overdue()

    def plan_for(self, use_cfg: bool, mode: Mode) -> ParallelPlan:
        """The parallel plan a batch runs with (forced options apply to latency mode)."""
        world, heads = self.config.num_gpus, self.info.spec.num_heads
        if mode is Mode.THROUGHPUT:
            return choose_plan(world, heads, use_cfg, dp_degree=self.config.replicas())
        return choose_plan(world, heads, use_cfg, **self.config.parallel_config.forced())

    def _wire_batch(self, batch: Batch) -> GenerateBatch:
        items = [r.payload.item for r in batch.requests]
        plan = self.plan_for(uses_cfg(self.info.spec, items[0]), batch.mode)
        if self._last_plan != (batch.mode, plan):
            self._last_plan = (batch.mode, plan)
            logger.info(
                "parallel plan: %s on %d %s rank(s) (%s mode)",
                plan.describe(),
                plan.world_size,
                self.device,
                batch.mode.value,
            )
        return GenerateBatch(batch.batch_id, items, plan, batch.replica)

    def _launch(self, batch: Batch, wire: GenerateBatch) -> None:
        def on_progress(event: Progress) -> None:
            for r in batch.requests:
                if not r.state.is_final and not r.payload.aborted:
                    update = ProgressEvent(
                        r.request_id, event.stage, event.step, event.total_steps, event.elapsed
                    )
                    self._safe(r.payload.sink.progress, update)

        now = time.monotonic()
        for r in batch.requests:
            r.payload.started = now
        self._running[batch.batch_id] = batch
        future = self.executor.submit(wire, on_progress)
        future.add_done_callback(lambda f: self._on_done(batch, f))

    def _abort_overdue(self) -> None:
        limit = self.config.request_timeout_s
        now = time.monotonic()
        for batch in list(self._running.values()):
            overdue = [
                r
                for r in batch.requests
                if not r.state.is_final
                and r.request_id not in self._timed_out
                and r.payload.started is not None
                and now - r.payload.started > limit
            ]
            if overdue:
                ids = [r.request_id for r in overdue]
                logger.warning("request(s) %s ran over request_timeout_s=%g", ids, limit)
                self._timed_out.update(ids)
                for r in overdue:
                    r.payload.aborted = True  # no more progress: only its timeout error
                self.executor.abort(batch.batch_id, ids)

    # --- completion --------------------------------------------------------------------
    def _on_done(self, batch: Batch, future: Future) -> None:
        try:
            result: BatchResult = future.result()
        except EngineDeadError as e:
            self._engine_died(e)
            return
        except BaseException as e:  # the whole batch failed on the workers
            self._finish(batch, failed={r.request_id: e for r in batch.requests})
            return
        try:
            failed: dict[str, BaseException] = {
                item: RequestFailedError(item, 0, "NonFiniteLatents", why)
                for item, why in result.failures.items()
            }
            aborted = set(result.aborted_ids)
            self._finish(batch, failed=failed, aborted=aborted, result=result)
        except Exception as e:  # noqa: BLE001 - a malformed result fails its batch alone
            logger.exception("could not complete batch %s", batch.batch_id)
            self._finish(batch, failed={r.request_id: e for r in batch.requests})

    def _finish(
        self,
        batch: Batch,
        failed: dict[str, BaseException],
        aborted: set[str] = frozenset(),  # type: ignore[assignment]
        result: BatchResult | None = None,
    ) -> None:
        with self._cond:
            self._running.pop(batch.batch_id, None)
            try:
                done = self.scheduler.finish(batch.batch_id, failed=failed, aborted=aborted)
            except KeyError:  # already failed with the whole engine (it died meanwhile)
                return
            self._dirty = True
            self._cond.notify()
        index = {item: i for i, item in enumerate(result.item_ids)} if result else {}
        for r in done:
            rid = r.request_id
            timed_out = rid in self._timed_out
            self._timed_out.discard(rid)
            if rid in aborted and timed_out:
                outcome: VideoOutput | BaseException = RequestTimeoutError(
                    rid, self.config.request_timeout_s or 0.0
                )
            elif rid in aborted:
                outcome = RequestAbortedError(f"request {rid} was aborted")
            elif rid in failed:
                outcome = failed[rid]
            elif result is None or rid not in index:
                why = "the workers' result did not include this request"
                outcome = RequestFailedError(rid, -1, "IncompleteResult", why)
            else:
                outcome = self._output(result, index[rid], r.payload)
            self._deliver(r.payload, outcome)

    def _output(self, result: BatchResult, index: int, request: Request) -> VideoOutput | Exception:
        try:
            output = to_video_output(result, index, request)
        except Exception as e:  # noqa: BLE001 - e.g. frames of the wrong shape
            return RequestFailedError(request.request_id, -1, type(e).__name__, str(e))
        output.timings["end_to_end"] = time.perf_counter() - request.submitted
        return output

    def _deliver(self, request: Request, outcome: VideoOutput | BaseException) -> None:
        if isinstance(outcome, BaseException):
            release_output_file(request.output_file)
            self._safe(request.sink.fail, outcome)
        else:
            self._safe(request.sink.finish, outcome)

    @staticmethod
    def _safe(call: Callable[[object], None], value: object) -> None:
        try:
            call(value)
        except Exception:  # a caller's sink must not stop the engine
            logger.exception("a request's event handler raised")

    def _engine_died(self, error: BaseException) -> None:
        with self._cond:
            if self._dead is None:
                self._dead = error
            doomed = self.scheduler.fail_all(error)
            self._running.clear()
            self._dirty = True
            self._cond.notify()
        for r in doomed:
            self._deliver(r.payload, error)

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


def build_item(
    spec: ModelSpec, config: PipelineConfig, prompt: object, param: SamplingParam, request_id: str
) -> RequestItem:
    """One request's item from its SamplingParam, validated against the model and the
    engine's limits (TypeError/ValueError naming the first bad field)."""
    if not isinstance(param, SamplingParam):
        raise TypeError(f"sampling_param must be a SamplingParam, got {type(param).__name__}")
    cache_config = config.cache_config
    thresh = param.cache_thresh
    if thresh is None and param.cache in cache_config.calibrated():
        thresh = cache_config.default_thresh(param.cache)
    negative = param.negative_prompt
    image = None
    if param.image is not None:
        if spec.image_input == "none":
            check_image(spec, param.image)  # refuses it before reading it
        image = load_image(param.image)
    height, width = request_size(spec, image, param.height, param.width)
    item = RequestItem(
        request_id=request_id,
        prompt=prompt,  # type: ignore[arg-type] - validated below
        negative_prompt="" if negative is None else negative,
        seed=param.seed,
        guidance_scale=param.guidance_scale,
        height=height,
        width=width,
        num_frames=param.num_frames,
        num_inference_steps=param.num_inference_steps,
        output_type=param.output_type,
        cache=param.cache,
        cache_thresh=0.0 if thresh is None else thresh,
        image=image,
        guidance_scale_2=param.guidance_scale_2,
        true_cfg_scale=param.true_cfg_scale,
        max_sequence_length=param.max_sequence_length,
    )
    validate_item(spec, item, config.engine_config.limits(), cache_config.calibrated())
    check_fps(param.fps)
    # Numbers travel as the wire's declared types (an int scale would decode as a float).
    item.guidance_scale = float(item.guidance_scale)
    item.cache_thresh = float(item.cache_thresh)
    item.true_cfg_scale = float(item.true_cfg_scale)
    item.height, item.width = int(item.height), int(item.width)  # not DefaultSize on the wire
    if item.guidance_scale_2 is not None:
        item.guidance_scale_2 = float(item.guidance_scale_2)
    return item


def to_video_output(result: BatchResult, index: int, request: Request) -> VideoOutput:
    """Item ``index`` of a batch result as a VideoOutput."""
    item = request.item
    frames = result.frames[index].numpy() if result.frames is not None else None
    if frames is not None and frames.shape != (item.num_frames, item.height, item.width, 3):
        raise ValueError(
            f"the workers returned frames of shape {frames.shape}, expected "
            f"{(item.num_frames, item.height, item.width, 3)}"
        )
    latents = result.latents[index] if result.latents is not None else None
    return VideoOutput(
        frames=None if frames is None else to_frames(frames, item.output_type),
        fps=request.fps,
        seed=item.seed,
        prompt=item.prompt,
        negative_prompt=item.negative_prompt or None,
        timings=dict(result.timings),
        latents=latents,
        request_id=item.request_id,
        plan=result.plan,
        peak_memory_bytes=list(result.peak_memory_bytes),
        stats=dict(result.stats),
    )
