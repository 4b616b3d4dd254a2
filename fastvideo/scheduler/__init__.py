"""Request scheduling: queue, batching and latency/throughput modes. Pure Python (no torch)."""

from fastvideo.scheduler.request import Batch, Mode, RequestState, ScheduledRequest
from fastvideo.scheduler.scheduler import QueueFullError, Scheduler, SchedulerConfig

__all__ = [
    "Batch",
    "Mode",
    "QueueFullError",
    "RequestState",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
]
