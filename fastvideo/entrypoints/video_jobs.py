"""Video jobs of the HTTP server (``fastvideo.entrypoints.http``).

A ``VideoJob`` is one ``POST /v1/videos``: its request, its status and progress, and the
background task that drives one ``engine.generate(...)`` iteration for it. A ``JobStore``
keeps at most ``max_jobs`` of them and drops finished ones older than ``max_age_s``
(oldest first, together with their files). Pure asyncio; everything here runs on the
server's event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastvideo import (
    EngineDeadError,
    ProgressEvent,
    RequestAbortedError,
    VideoOutput,
)
from fastvideo.logger import init_logger

logger = init_logger(__name__)

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "queued", "in_progress", "completed", "failed", "cancelled",
)  # fmt: skip
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})

# Progress (0..100) by pipeline stage: the set-up stages, then the denoising steps, then
# decoding; 100 only once the mp4 is on disk.
_SETUP_PROGRESS = 2
_DENOISE_START, _DENOISE_SPAN = 5, 85
_DECODE_PROGRESS = 92


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def progress_percent(event: ProgressEvent) -> int:
    """Where a request is, as 0..99 (100 is reserved for 'the file is written')."""
    if event.stage == "denoising" and event.total_steps > 0:
        return _DENOISE_START + (_DENOISE_SPAN * event.step) // event.total_steps
    if event.stage == "decoding":
        return _DECODE_PROGRESS
    return _SETUP_PROGRESS


@dataclass
class VideoJob:
    """One video job; ``to_dict`` is its public JSON (OpenAI's video object, plus ours)."""

    id: str
    model: str
    prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    overrides: dict[str, Any]  # what goes to engine.generate(prompt, **overrides)
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = QUEUED
    progress: int = 0
    completed_at: int | None = None
    finished_at: float | None = None  # time.time() when it finished (eviction order, age)
    error: dict[str, str] | None = None
    path: Path | None = None  # the mp4, once completed
    image: bytes | None = None  # the reference image, for models that take one
    task: asyncio.Task | None = field(default=None, repr=False)
    cancel_requested: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_dict(self, max_age_s: float | None = None) -> dict[str, Any]:
        expires = (
            int(self.completed_at + max_age_s)
            if self.completed_at is not None and max_age_s is not None
            else None
        )
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": expires,
            "size": f"{self.width}x{self.height}",
            "seconds": f"{self.num_frames / self.fps:g}",
            "num_frames": self.num_frames,
            "fps": self.fps,
            "seed": self.seed,
            "prompt": self.prompt,
            "error": self.error,
        }

    # --- changes -----------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def set_progress(self, percent: int) -> None:
        percent = max(self.progress, min(int(percent), 100))
        changed = percent != self.progress or self.status == QUEUED
        self.progress = percent
        if self.status == QUEUED:
            self.status = IN_PROGRESS
        if changed:
            self._notify()

    def finish(self, status: str, error: dict[str, str] | None = None) -> None:
        if self.finished:
            return
        self.status, self.error = status, error
        self.finished_at = time.time()
        self.completed_at = int(self.finished_at)
        if status == COMPLETED:
            self.progress = 100
        self._notify()

    async def changes(self, timeout: float | None = None) -> AsyncIterator[VideoJob]:
        """Yield the job now and after every change, until it is finished."""
        while True:
            changed = self._changed
            yield self
            if self.finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

    async def wait_finished(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.finished:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


async def start_generation(engine: Any, job: VideoJob) -> tuple[Any, asyncio.Task]:
    """Submit ``job`` to the engine; returns (its event stream, the task for its first
    event). Raises the engine's submission errors (TypeError/ValueError for bad fields,
    QueueFullError, EngineDeadError) here, before the job is accepted.

    ``AsyncVideoEngine.generate`` validates and queues the request when iteration starts,
    before its first await: one turn of the loop runs the first ``__anext__`` up to there.
    """
    overrides = dict(job.overrides)
    if job.image is not None:
        overrides["image"] = job.image
    stream = engine.generate(job.prompt, request_id=job.id, **overrides)
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    if first.done() and first.exception() is not None:
        error = first.exception()
        await stream.aclose()
        raise error  # type: ignore[misc]
    return stream, first


async def discard_generation(stream: Any, first: asyncio.Task) -> None:
    """Take back a submitted request that was not accepted after all (aborts it)."""
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    with contextlib.suppress(Exception):
        await stream.aclose()


async def run_job(
    job: VideoJob, stream: Any, first: asyncio.Task, output_dir: Path, on_dead: Any
) -> None:
    """Drive one job's event stream to its end; write the mp4 under ``output_dir``."""
    try:
        event = await first
        while True:
            if isinstance(event, ProgressEvent):
                # After an abort the emptied batch may still report its later stages.
                if not job.cancel_requested:
                    job.set_progress(progress_percent(event))
            elif isinstance(event, VideoOutput):
                job.set_progress(_DECODE_PROGRESS)
                job.path = await asyncio.to_thread(write_video, event, output_dir, job.id)
                job.finish(COMPLETED)
                logger.info("job %s completed: %s", job.id, job.path)
                return
            event = await stream.__anext__()
    except StopAsyncIteration:
        job.finish(FAILED, _error("internal_error", "the engine ended the request without a video"))
    except RequestAbortedError:
        job.finish(CANCELLED)
    except asyncio.CancelledError:
        job.finish(CANCELLED, _error("server_shutdown", "the server stopped before the job ended"))
        raise
    except EngineDeadError as e:
        on_dead(e)
        job.finish(FAILED, _error("engine_dead", f"the engine died: {e}"))
    except Exception as e:  # the request failed on the workers (e.g. non-finite latents)
        logger.warning("job %s failed: %s: %s", job.id, type(e).__name__, e)
        job.finish(FAILED, _error("generation_failed", f"{type(e).__name__}: {e}"))
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
        with contextlib.suppress(Exception):
            await stream.aclose()  # aborts the request if it is still running


def write_video(output: VideoOutput, output_dir: Path, job_id: str) -> Path:
    """Write ``output`` as ``<output_dir>/<job_id>.mp4``; an existing file is never
    overwritten (the name is claimed exclusively before the video is moved into it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{job_id}.mp4"
    fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # FileExistsError
    os.close(fd)
    partial = output_dir / f".{job_id}.partial.mp4"
    try:
        output.save(partial)
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise
    return final


class StoreFullError(RuntimeError):
    """Every kept job is still queued or running: none can be evicted for a new one."""


class JobStore:
    """Jobs by id in creation order, at most ``max_jobs``; finished ones expire
    ``max_age_s`` after they finished. Evicting a job deletes its file."""

    def __init__(self, max_jobs: int, max_age_s: float):
        if not isinstance(max_jobs, int) or isinstance(max_jobs, bool) or max_jobs < 1:
            raise ValueError(f"max_jobs must be a positive int, got {max_jobs!r}")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s!r}")
        self.max_jobs = max_jobs
        self.max_age_s = float(max_age_s)
        self._jobs: OrderedDict[str, VideoJob] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> VideoJob | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[VideoJob]:
        """Oldest first."""
        return list(self._jobs.values())

    def active(self) -> list[VideoJob]:
        return [j for j in self._jobs.values() if not j.finished]

    def make_room(self) -> None:
        """Evict expired jobs, then the oldest finished ones until one more fits."""
        self.sweep()
        while len(self._jobs) >= self.max_jobs:
            oldest = min(
                (j for j in self._jobs.values() if j.finished),
                key=lambda j: j.finished_at or 0.0,
                default=None,
            )
            if oldest is None:
                raise StoreFullError(
                    f"{len(self._jobs)} jobs are queued or running (the server keeps at most "
                    f"{self.max_jobs}); retry later"
                )
            self.remove(oldest.id)

    def add(self, job: VideoJob) -> None:
        self.make_room()
        self._jobs[job.id] = job

    def remove(self, job_id: str) -> VideoJob | None:
        job = self._jobs.pop(job_id, None)
        if job is not None and job.path is not None:
            with contextlib.suppress(OSError):
                job.path.unlink(missing_ok=True)
            logger.info("removed job %s and %s", job_id, job.path)
        return job

    def sweep(self, now: float | None = None) -> int:
        """Evict finished jobs older than ``max_age_s``; returns how many."""
        now = time.time() if now is None else now
        expired = [
            j.id
            for j in self._jobs.values()
            if j.finished_at is not None and now - j.finished_at > self.max_age_s
        ]
        for job_id in expired:
            self.remove(job_id)
        return len(expired)
