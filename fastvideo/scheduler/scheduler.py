"""The request scheduler: which waiting requests run next, batched how, on which replica.

Pure Python (no torch), single-threaded: the engine core calls it from its one loop.

Each call to ``schedule`` fills every free replica with one batch. A batch starts with
the best waiting request (lowest priority value, then earliest arrival, then insertion
order), so the head of the queue is never starved, and is then topped up with further
waiting requests of the same ``batch_key``, best first, up to ``max_batch_size``.

Modes: in LATENCY mode one replica (index 0) spans every GPU; in THROUGHPUT mode
``throughput_replicas`` data-parallel replicas each run their own batch. The GPU split
differs between the two, so the mode is only re-decided while nothing runs.

Data structures (all operations O(log n) per request moved):

* ``_waiting``: request id -> request, the source of truth for "is this still waiting".
* ``_heap``: (priority, arrival, seq, request) over all waiting requests, to find the head.
* ``_by_key``: batch_key -> a heap of the same entries, to fill a batch without scanning.

Removing from the middle of a heap is O(n), so a request leaving the queue (scheduled
through the other heap, or aborted) only leaves ``_waiting``; its heap entries go stale
(the request is no longer the one ``_waiting`` holds under its id) and are skipped when
they surface. The heaps are rebuilt when stale entries outnumber live ones, which keeps
memory bounded and the cost amortised O(1) per request.

History: final requests stay reachable through ``get`` until more than
``max_finished_history`` newer requests have become final; the oldest are then
forgotten, so a long-running server does not grow without bound.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from fastvideo.logger import init_logger
from fastvideo.scheduler.request import Batch, Mode, RequestState, ScheduledRequest

logger = init_logger(__name__)

_MODES = ("auto", "latency", "throughput")
# Stale heap entries tolerated beyond the live count before a rebuild; the slack stops a
# small queue from being rebuilt on every abort.
_STALE_SLACK = 64

# (priority, arrival, seq, request): seq is unique, so the request is never compared.
_Entry = tuple[int, float, int, ScheduledRequest]


class QueueFullError(RuntimeError):
    """``Scheduler.add`` was called with ``max_waiting_requests`` requests already waiting."""


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler batches requests and splits the GPUs."""

    max_batch_size: int = 1
    """Most requests (of equal ``batch_key``) in one batched forward."""
    max_waiting_requests: int = 256
    """Most requests waiting at once; ``add`` raises ``QueueFullError`` beyond it."""
    mode: str = "auto"
    """'latency' (one replica on every GPU), 'throughput' (data-parallel replicas) or
    'auto' (throughput while the queue is deep, latency otherwise)."""
    throughput_replicas: int = 1
    """Data-parallel replicas in throughput mode (1 = no data parallelism)."""
    throughput_queue_depth: int | None = None
    """Auto mode goes to throughput when at least this many requests wait;
    None: ``max(2, throughput_replicas)``."""
    max_finished_history: int = 10_000
    """Final requests kept for ``Scheduler.get`` before the oldest are forgotten."""

    def __post_init__(self) -> None:
        _check_positive_int("max_batch_size", self.max_batch_size)
        _check_positive_int("max_waiting_requests", self.max_waiting_requests)
        _check_positive_int("throughput_replicas", self.throughput_replicas)
        if self.throughput_queue_depth is not None:
            _check_positive_int("throughput_queue_depth", self.throughput_queue_depth)
        if not isinstance(self.max_finished_history, int) or self.max_finished_history < 0:
            raise ValueError(
                "max_finished_history must be a non-negative integer, "
                f"got {self.max_finished_history!r}"
            )
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}; got {self.mode!r}")

    @property
    def queue_depth(self) -> int:
        """The resolved ``throughput_queue_depth``."""
        if self.throughput_queue_depth is not None:
            return self.throughput_queue_depth
        return max(2, self.throughput_replicas)


def _check_positive_int(name: str, value: object) -> None:
    # bool is an int subclass; True as a batch size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Scheduler:
    """Waiting queue, running batches and replica slots of one engine."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._mode = Mode.THROUGHPUT if config.mode == "throughput" else Mode.LATENCY
        self._seq = itertools.count()
        self._batch_seq = itertools.count()
        self._waiting: dict[str, ScheduledRequest] = {}  # by id, in insertion order
        self._heap: list[_Entry] = []
        self._by_key: dict[Hashable, list[_Entry]] = {}
        self._key_entries = 0  # total entries in all _by_key heaps, live or stale
        self._live: dict[str, ScheduledRequest] = {}  # waiting or running, by id
        self._running: dict[str, Batch] = {}  # by batch id, in scheduling order
        self._busy: dict[int, str] = {}  # replica -> batch id
        self._history: OrderedDict[str, ScheduledRequest] = OrderedDict()

    # --- properties ----------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests (not batches) in running batches."""
        return len(self._live) - len(self._waiting)

    @property
    def running_batches(self) -> list[Batch]:
        """Running batches in the order they were scheduled."""
        return list(self._running.values())

    @property
    def num_replicas(self) -> int:
        """Replicas in the current mode."""
        return self.config.throughput_replicas if self._mode is Mode.THROUGHPUT else 1

    @property
    def free_replicas(self) -> list[int]:
        """Replicas of the current mode with no running batch, in index order."""
        return [r for r in range(self.num_replicas) if r not in self._busy]

    @property
    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return bool(self._live)

    # --- requests in ---------------------------------------------------------------------
    def add(self, request: ScheduledRequest) -> None:
        """Queue a new request.

        Raises ValueError if a waiting or running request has the same id, or the request
        is not in state WAITING; QueueFullError if ``max_waiting_requests`` already wait.
        """
        rid = request.request_id
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already waiting or running")
        if request.state is not RequestState.WAITING:
            raise ValueError(
                f"request {rid!r} is {request.state.value}; only a new (waiting) request can "
                "be added"
            )
        limit = self.config.max_waiting_requests
        if len(self._waiting) >= limit:
            raise QueueFullError(
                f"the scheduler's waiting queue is full ({limit} requests); retry later or "
                f"raise SchedulerConfig.max_waiting_requests (now {limit})"
            )
        # A reused id replaces the old, final request in the history.
        self._history.pop(rid, None)
        seq = next(self._seq)
        entry = (request.priority, request.arrival, seq, request)
        self._waiting[rid] = request
        self._live[rid] = request
        heapq.heappush(self._heap, entry)
        heapq.heappush(self._by_key.setdefault(request.batch_key, []), entry)
        self._key_entries += 1

    def abort(self, request_id: str) -> ScheduledRequest | None:
        """Abort a request; returns it, or None if it is unknown or already final.

        A waiting request becomes ABORTED at once and leaves the queue. A running one only
        gets ``abort_requested``: the engine stops it at the next step boundary and reports
        it through ``finish(..., aborted=[request_id])``.
        """
        request = self._live.get(request_id)
        if request is None:
            return None
        if request.state is RequestState.RUNNING:
            request.abort_requested = True
            return request
        del self._waiting[request_id]
        self._make_final(request, RequestState.ABORTED)
        self._maybe_compact()
        return request

    # --- scheduling ----------------------------------------------------------------------
    def schedule(self) -> list[Batch]:
        """Start one batch on every free replica that has work; returns the new batches."""
        if not self._running:
            self._decide_mode()
        batches: list[Batch] = []
        for replica in self.free_replicas:
            if not self._waiting:
                break
            batches.append(self._start_batch(replica))
        if batches:
            self._maybe_compact()
        return batches

    def _decide_mode(self) -> None:
        """Pick the mode for the next batches; only called while nothing runs."""
        cfg = self.config
        if cfg.mode != "auto":
            return  # fixed modes were set in __init__ and never change
        deep = len(self._waiting) >= cfg.queue_depth and cfg.throughput_replicas > 1
        mode = Mode.THROUGHPUT if deep else Mode.LATENCY
        if mode is self._mode:
            return
        self._mode = mode
        logger.info(
            "Scheduler mode -> %s (%d replica(s), %d request(s) waiting)",
            mode.value,
            self.num_replicas,
            len(self._waiting),
        )

    def _start_batch(self, replica: int) -> Batch:
        """Take the head of the queue plus same-key requests; mark them running."""
        head = self._pop_head()
        picked = [head]
        self._fill(head, picked)
        batch_id = f"batch-{next(self._batch_seq)}"
        for request in picked:
            request.state = RequestState.RUNNING
            request.batch_id = batch_id
        batch = Batch(batch_id, tuple(picked), replica, self._mode)
        self._running[batch_id] = batch
        self._busy[replica] = batch_id
        # Ids, not the requests: a request's repr would include its (possibly large) payload.
        logger.debug(
            "Scheduled %s on replica %d (%s): %d request(s) headed by %s",
            batch_id,
            replica,
            self._mode.value,
            len(picked),
            head.request_id,
        )
        return batch

    def _pop_head(self) -> ScheduledRequest:
        """Remove and return the best waiting request (the queue must not be empty)."""
        while True:
            request = heapq.heappop(self._heap)[3]
            if self._is_waiting(request):
                del self._waiting[request.request_id]
                return request

    def _fill(self, head: ScheduledRequest, picked: list[ScheduledRequest]) -> None:
        """Append waiting requests with ``head``'s batch key, best first, to ``picked``."""
        key = head.batch_key
        heap = self._by_key[key]
        # The head is also the best entry of its key heap, so it (now stale) and any stale
        # entries above it surface first. Popping them even when the batch is already full
        # keeps max_batch_size=1 from piling stale entries up in the key heaps.
        while heap:
            request = heap[0][3]
            live = self._is_waiting(request)
            if live and len(picked) >= self.config.max_batch_size:
                break
            heapq.heappop(heap)
            self._key_entries -= 1
            if live:
                del self._waiting[request.request_id]
                picked.append(request)
        if not heap:
            del self._by_key[key]

    def _is_waiting(self, request: ScheduledRequest) -> bool:
        # Identity, not id: a final request's id may be reused by a newer waiting request.
        return self._waiting.get(request.request_id) is request

    # --- requests out --------------------------------------------------------------------
    def finish(
        self,
        batch_id: str,
        failed: Mapping[str, BaseException] | None = None,
        aborted: Iterable[str] = (),
    ) -> list[ScheduledRequest]:
        """Close a running batch and free its replica; returns the batch's requests.

        Each request becomes FAILED (with its error) if its id is in ``failed``, else
        ABORTED if in ``aborted``, else FINISHED. Ids of other batches are ignored, so the
        engine may pass one mapping for a whole step. Raises KeyError for an unknown batch.
        """
        batch = self._running.pop(batch_id, None)
        if batch is None:
            raise KeyError(f"no running batch {batch_id!r}")
        del self._busy[batch.replica]
        failed = failed or {}
        aborted_ids = set(aborted)
        for request in batch.requests:
            rid = request.request_id
            if rid in failed:
                request.error = failed[rid]
                self._make_final(request, RequestState.FAILED)
            elif rid in aborted_ids:
                self._make_final(request, RequestState.ABORTED)
            else:
                self._make_final(request, RequestState.FINISHED)
        return list(batch.requests)

    def fail_all(self, error: BaseException) -> list[ScheduledRequest]:
        """Fail every waiting and running request (the engine died); returns them.

        Running requests come first, in batch order, then waiting ones in the order they
        were added.
        """
        doomed = [r for batch in self._running.values() for r in batch.requests]
        doomed.extend(self._waiting.values())
        self._waiting.clear()
        self._heap.clear()
        self._by_key.clear()
        self._key_entries = 0
        self._running.clear()
        self._busy.clear()
        for request in doomed:
            request.error = error
            self._make_final(request, RequestState.FAILED)
        if doomed:
            logger.warning("Failed %d request(s): %s", len(doomed), error)
        return doomed

    def get(self, request_id: str) -> ScheduledRequest | None:
        """A waiting, running or recently final request; None if unknown or forgotten."""
        request = self._live.get(request_id)
        return request if request is not None else self._history.get(request_id)

    # --- bookkeeping ---------------------------------------------------------------------
    def _make_final(self, request: ScheduledRequest, state: RequestState) -> None:
        request.state = state
        self._live.pop(request.request_id, None)
        limit = self.config.max_finished_history
        if limit == 0:
            return
        self._history[request.request_id] = request
        while len(self._history) > limit:
            self._history.popitem(last=False)

    def _maybe_compact(self) -> None:
        """Rebuild the heaps once stale entries outnumber live ones (plus some slack)."""
        bound = 2 * len(self._waiting) + _STALE_SLACK
        if len(self._heap) <= bound and self._key_entries <= bound:
            return
        entries = [(r.priority, r.arrival, next(self._seq), r) for r in self._waiting.values()]
        self._heap = list(entries)
        heapq.heapify(self._heap)
        self._by_key = {}
        for entry in entries:
            self._by_key.setdefault(entry[3].batch_key, []).append(entry)
        for heap in self._by_key.values():
            heapq.heapify(heap)
        self._key_entries = len(entries)
