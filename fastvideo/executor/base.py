"""The executor interface: four methods, results as futures.

Executors run batches on the workers: in this process (debugging, fast tests), in one
worker process per GPU (the default; ``multiproc.py``), or one Ray actor per GPU
(``ray_executor.py``, also across nodes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from fastvideo.config import PipelineConfig
from fastvideo.wire.messages import BatchResult, ControlReply, GenerateBatch, Progress

ProgressCallback = Callable[[Progress], None]


class Executor(ABC):
    """Runs batches on the workers and hands back results as futures.

    A future fails with ``EngineDeadError`` when the engine cannot serve any more,
    ``RequestFailedError`` when the batch alone failed on a worker.
    """

    @abstractmethod
    def submit(
        self, batch: GenerateBatch, on_progress: ProgressCallback | None = None
    ) -> Future[BatchResult]: ...

    @abstractmethod
    def abort(self, batch_id: str, item_ids: list[str]) -> None:
        """Ask the workers running ``batch_id`` to drop ``item_ids`` at the next step."""

    def control(self, op: str, args: dict) -> Future[list[ControlReply]]:
        """Run a model-changing command (``Worker.control``) on every rank, between batches
        in the order sent; the future holds every rank's reply."""
        raise NotImplementedError(f"{type(self).__name__} cannot change the loaded model")

    @abstractmethod
    def shutdown(self) -> None: ...

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...


def create_executor(
    model_dir: Path, config: PipelineConfig, device: str, spawned: list | None = None
) -> Executor:
    """``spawned``: worker processes already started (``multiproc.spawn_workers``)."""
    if config.executor == "inproc":
        from fastvideo.executor.inproc import InProcessExecutor

        return InProcessExecutor(model_dir, config, device)
    if config.executor == "ray":
        from fastvideo.executor.ray_executor import RayExecutor

        return RayExecutor(model_dir, config, device)
    from fastvideo.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(model_dir, config, device, spawned)
