"""The multi-process executor: one spawned worker per GPU (or CPU rank), joined by
torch.distributed, fed over ZeroMQ.

Sockets live in a private 0700 temporary directory (ipc://), one PUSH socket per worker
for requests and one PULL socket for everything workers send back. The driver hosts the
rendezvous TCPStore on a free loopback port. An I/O thread turns worker messages into
future results and progress callbacks; a monitor thread waits on the worker processes'
sentinels and fails every pending request with ``EngineDeadError`` the moment one dies.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from fastvideo import envs
from fastvideo.engine.configs import PipelineConfig
from fastvideo.engine.protocol import (
    AbortRequest,
    FromWorker,
    GenerateRequest,
    GenerateResult,
    Progress,
    Shutdown,
    WorkerFailure,
    WorkerReady,
)
from fastvideo.engine.serial import Decoder, Encoder, MalformedMessage
from fastvideo.logger import init_logger
from fastvideo.workers.executor import (
    EngineDeadError,
    Executor,
    ProgressCallback,
    RequestFailedError,
)
from fastvideo.workers.worker_proc import WorkerArgs, encode_args

logger = init_logger(__name__)

_live_executors: weakref.WeakSet[MultiprocExecutor] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for executor in list(_live_executors):
        executor.shutdown()


class WorkerStartupError(RuntimeError):
    """A worker failed to start; carries its traceback."""


@dataclass
class _Pending:
    future: Future[GenerateResult]
    on_progress: ProgressCallback | None
    leader: int  # the rank that reports for the request's replica


class MultiprocExecutor(Executor):
    def __init__(self, model_dir: Path, config: PipelineConfig, device: str):
        self.world_size = config.num_gpus
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._dead_reason: str | None = None
        self._closed = False
        self._encoder = Encoder()
        self._decoder = Decoder(FromWorker)
        self._dir = tempfile.mkdtemp(prefix="fastvideo-")  # created 0700
        self._ctx = zmq.Context()
        self._store = None
        self._procs: list[subprocess.Popen] = []
        self._io_thread: threading.Thread | None = None
        self._shutdown_done = threading.Event()
        try:
            self._start(model_dir, config, device)
        except BaseException:
            self.shutdown()
            raise
        _live_executors.add(self)

    # --- start-up ----------------------------------------------------------------------
    def _endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self._dir, name)}"

    def _start(self, model_dir: Path, config: PipelineConfig, device: str) -> None:
        import torch.distributed as dist

        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self._endpoint("out"))
        self._inputs = []
        for rank in range(self.world_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self._endpoint(f"in{rank}"))
            self._inputs.append(sock)
        # The driver hosts the rendezvous store: port 0 lets the OS pick a free port.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        config_dict = msgspec.to_builtins(config)
        for rank in range(self.world_size):
            args = WorkerArgs(
                rank=rank,
                world_size=self.world_size,
                device=f"cuda:{rank}" if device == "cuda" else "cpu",
                model_dir=str(model_dir),
                config=config_dict,
                store_host="127.0.0.1",
                store_port=self._store.port,
                request_addr=self._endpoint(f"in{rank}"),
                output_addr=self._endpoint("out"),
            )
            # stdin carries the arguments, then stays open as the worker's death pipe.
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastvideo.workers.worker_proc"],
                stdin=subprocess.PIPE,
                close_fds=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(encode_args(args))
            proc.stdin.flush()
            self._procs.append(proc)
        timeout = config.ready_timeout_s or envs.worker_ready_timeout_s()
        self._wait_ready(timeout)
        self._io_thread = threading.Thread(target=self._recv_loop, name="fastvideo-io", daemon=True)
        self._io_thread.start()
        threading.Thread(target=self._monitor, name="fastvideo-monitor", daemon=True).start()

    def _wait_ready(self, timeout: float) -> None:
        ready: dict[int, WorkerReady] = {}
        deadline = time.monotonic() + timeout
        while len(ready) < self.world_size:
            if time.monotonic() > deadline:
                raise WorkerStartupError(
                    f"workers {sorted(set(range(self.world_size)) - set(ready))} not ready after "
                    f"{timeout:.0f}s"
                )
            if self._output.poll(200):
                msg = self._decoder.decode(self._output.recv_multipart(copy=False))
                if isinstance(msg, WorkerFailure):
                    raise WorkerStartupError(
                        f"worker rank {msg.rank} failed to start: {msg.error_type}: "
                        f"{msg.message}\n--- worker traceback ---\n{msg.traceback}"
                    )
                if isinstance(msg, WorkerReady):
                    ready[msg.rank] = msg
                continue
            for rank, proc in enumerate(self._procs):
                if proc.poll() is not None and rank not in ready:
                    raise WorkerStartupError(
                        f"worker rank {rank} (pid {proc.pid}) exited with code {proc.returncode} "
                        f"during start-up"
                    )
        slowest = max(r.load_seconds for r in ready.values())
        logger.info(
            "%d worker(s) ready on %s (load %.1fs)",
            self.world_size,
            ", ".join(r.device for r in sorted(ready.values(), key=lambda r: r.rank)),
            slowest,
        )

    # --- requests ----------------------------------------------------------------------
    def submit(
        self, request: GenerateRequest, on_progress: ProgressCallback | None = None
    ) -> Future[GenerateResult]:
        future: Future[GenerateResult] = Future()
        future.set_running_or_notify_cancel()  # a submitted request cannot be withdrawn
        with self._lock:
            if self._dead_reason is not None:
                future.set_exception(EngineDeadError(self._dead_reason))
                return future
            replica_size = self.world_size // request.dp_degree
            ranks = range(request.replica * replica_size, (request.replica + 1) * replica_size)
            self._pending[request.request_id] = _Pending(future, on_progress, ranks[0])
            frames = self._encoder.encode(request)
            for rank in ranks:
                self._inputs[rank].send_multipart(frames, copy=False)
        return future

    def abort(self, request_id: str, item_ids: list[str]) -> None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or self._closed:
                return
            frames = self._encoder.encode(AbortRequest(list(item_ids)))
            self._inputs[pending.leader].send_multipart(frames, copy=False)

    def send_raw(self, rank: int, frames: list[bytes]) -> None:
        """Send raw bytes to one worker (tests use it to check malformed-message handling)."""
        with self._lock:
            self._inputs[rank].send_multipart(frames)

    # --- background threads ------------------------------------------------------------
    def _recv_loop(self) -> None:
        while not self._closed:
            try:
                if not self._output.poll(200):
                    continue
                frames = self._output.recv_multipart(copy=False)
            except zmq.ZMQError:
                return
            try:
                msg = self._decoder.decode(frames)
            except MalformedMessage as e:
                logger.warning("dropped a malformed message from a worker: %s", e)
                continue
            try:
                self._dispatch(msg)
            except Exception:  # the I/O thread must outlive any one message
                logger.exception("error while handling a %s from a worker", type(msg).__name__)

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, Progress):
            pending = self._pending.get(msg.request_id)
            if pending is not None and pending.on_progress is not None:
                try:
                    pending.on_progress(msg)
                except Exception:
                    logger.exception("progress callback of request %s raised", msg.request_id)
        elif isinstance(msg, GenerateResult):
            pending = self._pop(msg.request_id)
            if pending is not None:
                pending.future.set_result(msg)
        elif isinstance(msg, WorkerFailure) and msg.request_id is not None:
            dead = [r for r, p in enumerate(self._procs) if p.poll() is not None]
            if dead:  # a peer's death surfaced here first (e.g. a reset connection)
                self._fail_all(f"worker rank {dead[0]} died; the engine has shut down")
                return
            pending = self._pop(msg.request_id)
            if pending is not None:
                pending.future.set_exception(
                    RequestFailedError(
                        msg.request_id, msg.rank, msg.error_type, msg.message, msg.traceback
                    )
                )

    def _pop(self, request_id: str) -> _Pending | None:
        with self._lock:
            return self._pending.pop(request_id, None)

    def _monitor(self) -> None:
        rank = _wait_first_exit(self._procs, lambda: self._closed)
        if rank is None or self._closed:
            return
        proc = self._procs[rank]
        self._fail_all(
            f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.returncode}; "
            f"the engine has shut down. Create a new generator to continue."
        )
        self.shutdown(grace=1.0)  # the others are likely stuck in a collective

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._dead_reason is None:
                self._dead_reason = reason
            pending, self._pending = list(self._pending.values()), {}
        if pending:
            logger.error("%s (%d request(s) failed)", reason, len(pending))
        for p in pending:
            if not p.future.done():
                p.future.set_exception(EngineDeadError(reason))

    # --- shutdown ----------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead_reason is None and not self._closed

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop workers (shutdown message, then terminate, then kill) and remove every
        socket file and the rendezvous port. Safe to call more than once, from any thread;
        returns once everything is gone."""
        with self._lock:
            first, self._closed = not self._closed, True
        if not first:
            self._shutdown_done.wait(timeout=grace + 10)
            return
        try:
            self._fail_all("the engine was shut down")
            frames = self._encoder.encode(Shutdown())
            for sock in getattr(self, "_inputs", []):
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            _stop_processes(self._procs, grace)
            io = self._io_thread
            if io is not None and io is not threading.current_thread():
                io.join(timeout=2.0)  # it owns the output socket until it sees _closed
            for sock in [*getattr(self, "_inputs", []), getattr(self, "_output", None)]:
                if sock is not None:
                    sock.close(linger=0)
            self._ctx.term()
            self._store = None
            shutil.rmtree(self._dir, ignore_errors=True)
            _live_executors.discard(self)
        finally:
            self._shutdown_done.set()


def _wait_first_exit(procs: list[subprocess.Popen], stop: Callable[[], bool]) -> int | None:
    """Block until a worker exits; its rank (None once ``stop()`` is true).

    Uses pidfds (Linux) so a death is seen at once; elsewhere polls every 100 ms.
    """
    pidfds = {}
    if hasattr(os, "pidfd_open"):
        for rank, proc in enumerate(procs):
            try:
                pidfds[os.pidfd_open(proc.pid)] = rank
            except OSError:
                pidfds = {}
                break
    try:
        while not stop():
            if pidfds:
                select.select(list(pidfds), [], [], 0.5)
            else:
                time.sleep(0.1)
            for rank, proc in enumerate(procs):
                if proc.poll() is not None:
                    return rank
        return None
    finally:
        for fd in pidfds:
            os.close(fd)


def _stop_processes(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Ask, then terminate, then kill; closing stdin also tells each worker to exit."""
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=2.0)
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
