"""One rank in this process, on one background thread. Initialises the device here: for
debugging and fast tests. Same contract as the worker processes."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fastvideo import envs
from fastvideo.config import PipelineConfig
from fastvideo.executor.base import Executor, ProgressCallback
from fastvideo.pipelines.base import ForwardBatch
from fastvideo.wire.errors import EngineDeadError, RequestFailedError
from fastvideo.wire.messages import BatchResult, ControlReply, GenerateBatch, Progress


class _Control:
    def __init__(self, executor: InProcessExecutor, batch_id: str, on_progress):
        self.executor = executor
        self.batch_id = batch_id
        self.on_progress = on_progress
        self.start = time.perf_counter()

    def progress(self, stage: str, step: int, total: int) -> None:
        if self.on_progress is not None:
            elapsed = time.perf_counter() - self.start
            self.on_progress(Progress(self.batch_id, stage, step, total, elapsed))

    def abort_requested(self) -> set[str]:
        return set(self.executor._aborts)

    def at_step(self, batch: ForwardBatch, step: int) -> None:
        self.executor._worker.run_step_hooks(batch, step)


class InProcessExecutor(Executor):
    def __init__(self, model_dir: Path, config: PipelineConfig, device: str):
        import torch

        from fastvideo.worker.worker import Worker

        self._worker = Worker(0, 1, torch.device(device), model_dir, config)
        self._worker.load_plugins(envs.worker_plugins())
        self._worker.init_distributed(None)
        self._worker.load()
        self._aborts: set[str] = set()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fastvideo-inproc")
        self._alive = True

    def submit(
        self, batch: GenerateBatch, on_progress: ProgressCallback | None = None
    ) -> Future[BatchResult]:
        if not self._alive:
            future: Future[BatchResult] = Future()
            future.set_exception(EngineDeadError("the engine was shut down"))
            return future
        return self._thread.submit(self._run, batch, on_progress)

    def _run(self, batch: GenerateBatch, on_progress: ProgressCallback | None) -> BatchResult:
        control = _Control(self, batch.batch_id, on_progress)
        try:
            result = self._worker.execute(batch, control)
        except Exception as e:  # same contract as the worker processes: this batch fails
            raise RequestFailedError(batch.batch_id, 0, type(e).__name__, str(e)) from e
        finally:
            self._aborts.difference_update(item.request_id for item in batch.items)
        assert result is not None
        # What the worker processes hand back: host tensors (the wire copies them there).
        if result.frames is not None:
            result.frames = result.frames.cpu()
        if result.latents is not None:
            result.latents = result.latents.cpu()
        return result

    def abort(self, batch_id: str, item_ids: list[str]) -> None:
        self._aborts.update(item_ids)

    def control(self, op: str, args: dict) -> Future[list[ControlReply]]:
        def run() -> list[ControlReply]:
            try:
                return [ControlReply("inproc", 0, "", self._worker.control(op, args))]
            except Exception as e:  # noqa: BLE001 - reported in the reply, as workers do
                return [ControlReply("inproc", 0, f"{type(e).__name__}: {e}")]

        return self._thread.submit(run)

    def shutdown(self) -> None:
        self._alive = False
        self._thread.shutdown(wait=True)
        self._worker.close()

    @property
    def is_alive(self) -> bool:
        return self._alive
