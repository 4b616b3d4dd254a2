"""Executors run requests on the workers: in this process (debugging, fast tests) or in
one worker process per GPU (the default; see ``mp_executor.py``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from fastvideo.engine.configs import PipelineConfig
from fastvideo.engine.protocol import GenerateRequest, GenerateResult, Progress

ProgressCallback = Callable[[Progress], None]


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (a worker died, or it was shut down)."""


class RequestFailedError(RuntimeError):
    """A request failed on the workers; the engine keeps serving others."""

    def __init__(self, request_id: str, rank: int, error_type: str, message: str, tb: str = ""):
        super().__init__(f"request {request_id} failed on rank {rank}: {error_type}: {message}")
        self.request_id = request_id
        self.rank = rank
        self.error_type = error_type
        self.worker_traceback = tb


class Executor(ABC):
    """Runs requests on the workers and hands back results as futures."""

    @abstractmethod
    def submit(
        self, request: GenerateRequest, on_progress: ProgressCallback | None = None
    ) -> Future[GenerateResult]: ...

    def execute(
        self, request: GenerateRequest, on_progress: ProgressCallback | None = None
    ) -> GenerateResult:
        return self.submit(request, on_progress).result()

    @abstractmethod
    def shutdown(self) -> None: ...

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...


class InProcessExecutor(Executor):
    """One rank in the calling process. Initialises the device here: for debugging."""

    def __init__(self, model_dir: Path, config: PipelineConfig, device: str):
        import time

        import torch

        from fastvideo.workers.worker import Worker

        self._worker = Worker(0, 1, torch.device(device), model_dir, config)
        self._worker.init_distributed("", 0)
        self._worker.load()
        self._time = time.perf_counter
        self._alive = True

    def submit(
        self, request: GenerateRequest, on_progress: ProgressCallback | None = None
    ) -> Future[GenerateResult]:
        future: Future[GenerateResult] = Future()
        if not self._alive:
            future.set_exception(EngineDeadError("the engine was shut down"))
            return future
        start = self._time()

        def progress(stage: str, step: int, total: int) -> None:
            if on_progress is not None:
                on_progress(Progress(request.request_id, stage, step, total, self._time() - start))

        try:
            result = self._worker.execute(request, progress)
            assert result is not None
            future.set_result(result)
        except Exception as e:  # same contract as the worker processes: this request fails
            future.set_exception(
                RequestFailedError(request.request_id, 0, type(e).__name__, str(e))
            )
        return future

    def shutdown(self) -> None:
        self._alive = False
        self._worker.close()

    @property
    def is_alive(self) -> bool:
        return self._alive


def create_executor(model_dir: Path, config: PipelineConfig, device: str) -> Executor:
    if config.executor == "inproc":
        return InProcessExecutor(model_dir, config, device)
    from fastvideo.workers.mp_executor import MultiprocExecutor

    return MultiprocExecutor(model_dir, config, device)
