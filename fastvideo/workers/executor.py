"""Executors run requests on the workers: in this process (debugging, fast tests) or in
one worker process per GPU (the default; see ``mp_executor.py``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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

    @abstractmethod
    def abort(self, request_id: str, item_ids: list[str]) -> None:
        """Ask the workers running ``request_id`` to drop ``item_ids`` at the next step."""

    @abstractmethod
    def shutdown(self) -> None: ...

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...


class InProcessExecutor(Executor):
    """One rank in this process, on one background thread. Initialises the device here:
    for debugging and fast tests."""

    def __init__(self, model_dir: Path, config: PipelineConfig, device: str):
        import torch

        from fastvideo.workers.worker import Worker

        self._worker = Worker(0, 1, torch.device(device), model_dir, config)
        self._worker.init_distributed("", 0)
        self._worker.load()
        self._aborts: set[str] = set()
        self._worker.abort_source = lambda: set(self._aborts)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fastvideo-inproc")
        self._alive = True

    def submit(
        self, request: GenerateRequest, on_progress: ProgressCallback | None = None
    ) -> Future[GenerateResult]:
        if not self._alive:
            future: Future[GenerateResult] = Future()
            future.set_exception(EngineDeadError("the engine was shut down"))
            return future
        return self._thread.submit(self._run, request, on_progress)

    def _run(
        self, request: GenerateRequest, on_progress: ProgressCallback | None
    ) -> GenerateResult:
        start = time.perf_counter()

        def progress(stage: str, step: int, total: int) -> None:
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                on_progress(Progress(request.request_id, stage, step, total, elapsed))

        try:
            result = self._worker.execute(request, progress)
        except Exception as e:  # same contract as the worker processes: this request fails
            raise RequestFailedError(request.request_id, 0, type(e).__name__, str(e)) from e
        finally:
            self._aborts.difference_update(request.item_ids)
        assert result is not None
        return result

    def abort(self, request_id: str, item_ids: list[str]) -> None:
        self._aborts.update(item_ids)

    def shutdown(self) -> None:
        self._alive = False
        self._thread.shutdown(wait=True)
        self._worker.close()

    @property
    def is_alive(self) -> bool:
        return self._alive


def create_executor(model_dir: Path, config: PipelineConfig, device: str) -> Executor:
    if config.executor == "inproc":
        return InProcessExecutor(model_dir, config, device)
    from fastvideo.workers.mp_executor import MultiprocExecutor

    return MultiprocExecutor(model_dir, config, device)
