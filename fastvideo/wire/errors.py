"""Errors either side raises about the engine, a request or a message. Pure Python."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (a worker died or hung, or it was shut
    down)."""


class RequestFailedError(RuntimeError):
    """A request failed on the workers; the engine keeps serving others."""

    def __init__(self, request_id: str, rank: int, error_type: str, message: str, tb: str = ""):
        super().__init__(f"request {request_id} failed on rank {rank}: {error_type}: {message}")
        self.request_id = request_id
        self.rank = rank
        self.error_type = error_type
        self.worker_traceback = tb


class RequestAbortedError(RuntimeError):
    """The request was aborted by its caller before it finished."""


class RequestTimeoutError(RequestFailedError):
    """The request ran longer than its ``request_timeout_s`` and was aborted."""

    def __init__(self, request_id: str, timeout_s: float):
        RuntimeError.__init__(
            self, f"request {request_id} did not finish within request_timeout_s={timeout_s:g}"
        )
        self.request_id = request_id
        self.rank = -1
        self.error_type = "Timeout"
        self.worker_traceback = ""


class WorkerStartupError(RuntimeError):
    """A worker failed to start; the message keeps the first line of its error (the whole
    traceback is in the log and in ``worker_traceback``)."""

    def __init__(self, message: str, worker_traceback: str = ""):
        super().__init__(message)
        self.worker_traceback = worker_traceback


class MalformedMessage(ValueError):
    """Bytes that are not a valid message of the expected type."""


class OutputSaveError(OSError):
    """Videos were generated but at least one could not be written; ``outputs`` holds every
    generated video (those that were saved have ``output_path`` set)."""

    def __init__(self, message: str, outputs: list):
        super().__init__(message)
        self.outputs = outputs
