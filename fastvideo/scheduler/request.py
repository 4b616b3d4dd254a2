"""What the scheduler knows about a request and the batches it hands out. Pure Python (no torch).

The scheduler never looks inside a request's ``payload``: it sees only an id, a priority,
an arrival time and a ``batch_key``. Requests whose keys compare equal may run in one
batched forward; the engine decides what goes into the key (model, resolution, frame
count, step count, ...), so the scheduler needs no knowledge of video shapes.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


class RequestState(enum.Enum):
    """Where a request is in its life: waiting -> running -> one of the three final states."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """True once the request can no longer change state (finished, aborted or failed)."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED})


# eq=False: two requests are the same only if they are the same object. Value equality
# would compare payloads (possibly large or not comparable) and make requests unhashable.
@dataclass(eq=False)
class ScheduledRequest:
    """One generation request as the scheduler sees it.

    The scheduler owns ``state``, ``error`` and ``batch_id``; the engine sets the other
    fields when it creates the request and reads the rest back.
    """

    request_id: str
    batch_key: Hashable
    """Requests with equal keys may share one batched forward."""
    priority: int = 0
    """Lower values run first; ties run in arrival (FIFO) order."""
    payload: Any = None
    """The engine's request data; opaque to the scheduler."""
    arrival: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request was created; orders requests of equal priority."""
    state: RequestState = RequestState.WAITING
    abort_requested: bool = False
    """Set by ``Scheduler.abort`` on a running request: stop it at the next step boundary."""
    error: BaseException | None = None
    """Why the request failed (state FAILED only)."""
    batch_id: str | None = None
    """The batch that ran (or runs) the request; None while it waits."""


class Mode(enum.Enum):
    """How the GPUs are used.

    LATENCY: one replica spanning every GPU (sequence/CFG parallel), so one request
    finishes as soon as possible. THROUGHPUT: several data-parallel replicas, each on a
    slice of the GPUs, so a deep queue drains faster at the cost of per-request latency.
    """

    LATENCY = "latency"
    THROUGHPUT = "throughput"


@dataclass(frozen=True)
class Batch:
    """Requests that run together as one batched forward on one replica."""

    batch_id: str
    """Unique within one scheduler, e.g. ``batch-7``."""
    requests: tuple[ScheduledRequest, ...]
    """In the order they were picked: best first."""
    replica: int
    """Which data-parallel replica runs the batch (always 0 in latency mode)."""
    mode: Mode
    """The mode the batch was scheduled in; it tells the engine how the GPUs are split."""

    @property
    def request_ids(self) -> list[str]:
        return [request.request_id for request in self.requests]

    def __len__(self) -> int:
        return len(self.requests)
