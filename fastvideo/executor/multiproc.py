"""The multi-process executor: one worker process per GPU (or CPU rank), joined by
torch.distributed, fed over ZeroMQ.

Everything lives in a private 0700 temporary folder: the ipc:// sockets (one PUSH socket
per worker for batches, one PULL socket for everything workers send back) and the
rendezvous FileStore, so nothing listens on a network port. Workers start in their own
session (a terminal's Ctrl-C reaches the driver only). Every message carries a random
per-engine token; the driver drops what lacks it. An I/O thread turns worker messages into
future results and progress callbacks; a monitor thread waits on the workers' process
sentinels and watches their heartbeats, and fails every pending batch with
``EngineDeadError`` the moment a worker dies, falls silent or stalls.
"""

from __future__ import annotations

import atexit
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq

from fastvideo import envs
from fastvideo.config import PipelineConfig
from fastvideo.executor import forked
from fastvideo.executor.base import Executor, ProgressCallback
from fastvideo.executor.forked import ForkedWorker
from fastvideo.logger import init_logger
from fastvideo.wire.codec import Decoder, Encoder
from fastvideo.wire.errors import (
    EngineDeadError,
    MalformedMessage,
    RequestFailedError,
    WorkerStartupError,
)
from fastvideo.wire.messages import (
    AbortItems,
    BatchResult,
    Control,
    ControlReply,
    FromWorker,
    GenerateBatch,
    Heartbeat,
    Progress,
    Shutdown,
    WorkerArgs,
    WorkerFailure,
    WorkerReady,
)
from fastvideo.worker.main import ATTENTION_HINT, DEVICE_HINT, encode_args

if TYPE_CHECKING:
    WorkerProcess = subprocess.Popen | ForkedWorker

logger = init_logger(__name__)

HEARTBEAT_S = 0.5
SEND_TIMEOUT_MS = 2000

_live_executors: weakref.WeakSet[MultiprocExecutor] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for executor in list(_live_executors):
        executor.shutdown()


def _on_sigterm(signum: int, frame: object) -> None:
    """Shut every engine down cleanly, then die of SIGTERM as the process would have."""
    _shutdown_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_handler() -> None:
    """Only where nobody else handles SIGTERM, and only from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def loopback_interface() -> str:
    """The name of the loopback network interface ('lo' on Linux, 'lo0' on macOS)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(getattr(a, "address", "") == "127.0.0.1" for a in addrs):
                return name
    except Exception:  # noqa: BLE001 - fall back to the usual Linux name
        pass
    return "lo"


@dataclass
class _Pending:
    future: Future[BatchResult]
    on_progress: ProgressCallback | None
    ranks: list[int]  # the replica's ranks; ranks[0] reports for it


@dataclass
class _Beat:
    last: float = field(default_factory=time.monotonic)
    busy: bool = False
    progress: int = 0
    progress_since: float = field(default_factory=time.monotonic)


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank`` on this machine: ``cuda:rank``, or ``cpu``."""
    return f"cuda:{rank}" if device == "cuda" else "cpu"


def spawn_workers(count: int, device: str = "cpu", attention: str = "auto") -> list[WorkerProcess]:
    """Start ``count`` worker processes before their arguments exist: forked from this
    process where ``forked.start_method`` finds that safe (torch is imported already),
    else ``python -m fastvideo.worker.main`` (which imports torch and fastvideo
    meanwhile). Each then waits for its arguments on stdin, which
    ``MultiprocExecutor(..., spawned=...)`` writes. ``stop_spawned`` ends unused ones.
    ``attention``: the backend the configuration asks for (what a worker may prepare)."""
    # gloo's pairs and NCCL's bootstrap listen on loopback only (one machine).
    loopback = loopback_interface()
    sockets = {k: os.environ.get(k, loopback) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    # The device each will get (rank i: the i-th started) and the attention backend asked
    # for, which it prepares for while it waits for its arguments (worker.main's
    # prepare_before_args).
    hints = [{**sockets, DEVICE_HINT: rank_device(device, i), ATTENTION_HINT: attention}
             for i in range(count)]  # fmt: skip
    method, why = forked.start_method(device)
    logger.debug("starting %d %s worker(s) by %s: %s", count, device, method, why)
    if method == "fork":
        return [forked.fork_worker(env) for env in hints]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "fastvideo.worker.main"],
            stdin=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
            env={**os.environ, **env},
        )
        for env in hints
    ]


def forget_inherited_executors() -> None:
    """In a forked worker: the driver's executors are not this process's to stop."""
    _live_executors.clear()


def stop_spawned(procs: list[WorkerProcess]) -> None:
    """End workers that ``spawn_workers`` started and no executor took."""
    _stop_processes(procs, grace=0.0)


class MultiprocExecutor(Executor):
    def __init__(
        self,
        model_dir: Path,
        config: PipelineConfig,
        device: str,
        spawned: list[WorkerProcess] | None = None,
    ):
        """``spawned``: ``config.num_gpus`` processes from ``spawn_workers`` to use (they
        already import while the driver prepares); None: start them here."""
        self.world_size = config.num_gpus
        self.worker_timeout_s = config.engine_config.worker_timeout_s
        self.stall_timeout_s = config.engine_config.stall_timeout_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._controls: dict[str, tuple[Future, list[ControlReply]]] = {}
        self._seq: dict[tuple[int, ...], int] = {}
        self._dead_reason: str | None = None
        self._closed = False
        self._token = secrets.token_hex(16)
        self._encoder = Encoder()
        self._decoder = Decoder(FromWorker)
        self._dir = tempfile.mkdtemp(prefix="fastvideo-")  # created 0700
        self._ctx = zmq.Context()
        # Taken at once, so that shutdown() stops them whatever fails from here on.
        self._procs: list[WorkerProcess] = list(spawned or [])
        self._beats: dict[int, _Beat] = {}
        self._io_thread: threading.Thread | None = None
        self._shutdown_done = threading.Event()
        self.dropped_messages = 0
        self.ready: dict[int, WorkerReady] = {}  # rank -> its WorkerReady (load facts)
        self.load_breakdown: dict[str, float] = {}  # the slowest rank's WorkerReady's
        try:
            self._start(model_dir, config, device)
        except BaseException:
            self.shutdown()
            raise
        _live_executors.add(self)
        _install_sigterm_handler()

    # --- start-up ----------------------------------------------------------------------
    def _endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self._dir, name)}"

    def _start(self, model_dir: Path, config: PipelineConfig, device: str) -> None:
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self._endpoint("out"))
        self._inputs = []
        for rank in range(self.world_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self._endpoint(f"in{rank}"))
            self._inputs.append(sock)
        config_dict = msgspec.to_builtins(config)
        if not self._procs:
            backend = config.attention_config.resolved_backend()
            self._procs = spawn_workers(self.world_size, device, backend)
        if len(self._procs) != self.world_size:
            raise ValueError(f"{len(self._procs)} spawned workers for num_gpus={self.world_size}")
        for rank, proc in enumerate(self._procs):
            args = self._worker_args(
                rank, rank_device(device, rank), model_dir, config_dict,
                self._endpoint(f"in{rank}"), self._endpoint("out"),
                os.path.join(self._dir, "store"),
            )  # fmt: skip
            # stdin carries the arguments, then stays open as the worker's death pipe.
            assert proc.stdin is not None
            proc.stdin.write(encode_args(args))
            proc.stdin.flush()
        self._serve_once_ready(config)

    def _worker_args(
        self,
        rank: int,
        device: str,
        model_dir: Path,
        config_dict: dict,
        request_addr: str,
        output_addr: str,
        store_path: str,
    ) -> WorkerArgs:
        return WorkerArgs(
            rank=rank,
            world_size=self.world_size,
            device=device,
            model_dir=str(model_dir),
            config=config_dict,
            request_addr=request_addr,
            output_addr=output_addr,
            token=self._token,
            heartbeat_s=HEARTBEAT_S,
            plugins=envs.worker_plugins(),
            store_path=store_path,
            arrival_timeout_s=self.worker_timeout_s,
        )

    def _serve_once_ready(self, config: PipelineConfig) -> None:
        """Wait for every rank's WorkerReady, then start the I/O and monitor threads."""
        self._wait_ready(config.engine_config.ready_timeout_s or envs.worker_ready_timeout_s())
        now = time.monotonic()
        self._beats = {rank: _Beat(now, False, 0, now) for rank in range(self.world_size)}
        self._io_thread = threading.Thread(target=self._recv_loop, name="fastvideo-io", daemon=True)
        self._io_thread.start()
        threading.Thread(target=self._monitor, name="fastvideo-monitor", daemon=True).start()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ready) < self.world_size:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(self.ready))
                raise WorkerStartupError(f"workers {missing} not ready after {timeout:.0f}s")
            if self._output.poll(200):
                msg = self._decode(self._output.recv_multipart(copy=False))
                if isinstance(msg, WorkerFailure):
                    first = (msg.message.strip().splitlines() or [""])[0]
                    logger.error("worker rank %d failed to start:\n%s", msg.rank, msg.traceback)
                    raise WorkerStartupError(
                        f"worker rank {msg.rank} failed to start: {msg.error_type}: {first} "
                        f"(the worker's traceback is in the log)",
                        msg.traceback,
                    )
                if isinstance(msg, WorkerReady):
                    self.ready[msg.rank] = msg
                continue
            ended = self._ended_during_startup()
            if ended is not None:
                raise WorkerStartupError(f"{ended} during start-up")
        self.ready = dict(sorted(self.ready.items()))
        slowest = max(self.ready.values(), key=lambda r: r.load_seconds)
        self._log_ready(slowest)
        self.load_breakdown = dict(slowest.load_breakdown)
        if self.load_breakdown:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in self.load_breakdown.items())
            logger.info("rank %d start-up, seconds from its process start: %s", slowest.rank, parts)

    def _ended_during_startup(self) -> str | None:
        """Why a rank that is not ready yet is gone (None while all live)."""
        for rank, proc in enumerate(self._procs):
            if proc.poll() is not None and rank not in self.ready:
                return f"worker rank {rank} (pid {proc.pid}) exited with code {proc.returncode}"
        return None

    def _log_ready(self, slowest: WorkerReady) -> None:
        logger.info(
            "%d worker(s) ready on %s (load %.1fs, peak host RSS %s GiB)",
            self.world_size,
            ", ".join(r.device for r in self.ready.values()),
            slowest.load_seconds,
            "/".join(f"{r.host_rss_bytes / (1 << 30):.2f}" for r in self.ready.values()),
        )

    # --- batches -----------------------------------------------------------------------
    def submit(
        self, batch: GenerateBatch, on_progress: ProgressCallback | None = None
    ) -> Future[BatchResult]:
        future: Future[BatchResult] = Future()
        future.set_running_or_notify_cancel()  # a submitted batch cannot be withdrawn
        with self._lock:
            if self._dead_reason is not None:
                future.set_exception(EngineDeadError(self._dead_reason))
                return future
            ranks = batch.plan.replica_ranks(batch.replica)
            key = tuple(ranks)
            batch.seq = self._seq[key] = self._seq.get(key, 0) + 1
            batch.token = self._token
            try:
                frames = self._encoder.encode(batch)
                self._send_all(ranks, frames)
            except Exception as e:  # noqa: BLE001 - this batch fails alone, nothing was sent
                future.set_exception(
                    RequestFailedError(batch.batch_id, -1, type(e).__name__, str(e))
                )
                return future
            self._pending[batch.batch_id] = _Pending(future, on_progress, ranks)
        return future

    def _send_all(self, ranks: list[int], frames: list) -> None:
        """Send to every rank of a replica or to none: wait until each socket can take the
        message, then send to all."""
        poller = zmq.Poller()
        for rank in ranks:
            poller.register(self._inputs[rank], zmq.POLLOUT)
        writable = dict(poller.poll(SEND_TIMEOUT_MS))
        stuck = [r for r in ranks if self._inputs[r] not in writable]
        if stuck:
            raise RuntimeError(f"worker ranks {stuck} are not taking messages; nothing sent")
        for rank in ranks:
            self._inputs[rank].send_multipart(frames, copy=False)

    def control(self, op: str, args: dict) -> Future[list[ControlReply]]:
        future: Future[list[ControlReply]] = Future()
        command = Control(secrets.token_hex(8), op, dict(args), self._token)
        with self._lock:
            if self._dead_reason is not None:
                future.set_exception(EngineDeadError(self._dead_reason))
                return future
            try:
                self._send_all(list(range(self.world_size)), self._encoder.encode(command))
            except Exception as e:  # noqa: BLE001 - nothing was sent
                future.set_exception(e)
                return future
            self._controls[command.command_id] = (future, [])
        return future

    def _on_control_reply(self, msg: ControlReply) -> None:
        with self._lock:
            entry = self._controls.get(msg.command_id)
            if entry is None:
                self.dropped_messages += 1
                return
            entry[1].append(msg)
            if len(entry[1]) < self.world_size:
                return
            del self._controls[msg.command_id]
        entry[0].set_result(sorted(entry[1], key=lambda r: r.rank))

    def abort(self, batch_id: str, item_ids: list[str]) -> None:
        with self._lock:
            pending = self._pending.get(batch_id)
            if pending is None or self._closed or self._dead_reason is not None:
                return
            frames = self._encoder.encode(AbortItems(batch_id, list(item_ids), self._token))
            for rank in pending.ranks:
                try:
                    self._inputs[rank].send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    logger.warning("could not send an abort of %s to rank %d", batch_id, rank)

    # --- background threads ------------------------------------------------------------
    def _decode(self, frames: list) -> msgspec.Struct | None:
        """A worker message carrying this engine's token; None (counted) otherwise."""
        try:
            msg = self._decoder.decode(frames)
        except MalformedMessage as e:
            self.dropped_messages += 1
            logger.warning("dropped a malformed message from a worker: %s", e)
            return None
        if not secrets.compare_digest(msg.token, self._token):
            self.dropped_messages += 1
            logger.warning("dropped a %s without this engine's token", type(msg).__name__)
            return None
        return msg

    def _recv_loop(self) -> None:
        handlers: dict[type, Callable[[msgspec.Struct], None]] = {
            Heartbeat: self._on_heartbeat,
            Progress: self._on_progress,
            BatchResult: self._on_result,
            WorkerFailure: self._on_failure,
            ControlReply: self._on_control_reply,
            WorkerReady: lambda msg: None,
        }
        while not self._closed:
            try:
                if not self._output.poll(200):
                    continue
                frames = self._output.recv_multipart(copy=False)
            except zmq.ZMQError:
                return
            msg = self._decode(frames)
            if msg is None:
                continue
            try:
                handlers[type(msg)](msg)
            except Exception:  # the I/O thread must outlive any one message
                logger.exception("error while handling a %s from a worker", type(msg).__name__)

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        beat = self._beats.get(msg.rank)
        if beat is None:
            return
        now = time.monotonic()
        if msg.progress != beat.progress or msg.busy != beat.busy:
            beat.progress, beat.progress_since = msg.progress, now
        beat.last, beat.busy = now, msg.busy

    def _on_progress(self, msg: Progress) -> None:
        pending = self._pending.get(msg.batch_id)
        if pending is None:
            self.dropped_messages += 1
            return
        if pending.on_progress is not None:
            try:
                pending.on_progress(msg)
            except Exception:
                logger.exception("progress callback of batch %s raised", msg.batch_id)

    def _on_result(self, msg: BatchResult) -> None:
        pending = self._pop(msg.batch_id)
        if pending is None:
            self.dropped_messages += 1
            logger.warning("dropped a result for unknown batch %r", msg.batch_id)
            return
        pending.future.set_result(msg)

    def _on_failure(self, msg: WorkerFailure) -> None:
        if msg.batch_id is None:
            return
        dead = self._dead_ranks(grace_s=0.5 if msg.fatal else 0.0)
        if dead:  # a peer's death surfaced here first (e.g. a reset connection)
            self._fail_all(f"worker rank {dead[0]} died; the engine has shut down")
            return
        if msg.fatal:  # the rank exits after this failure: so does the engine
            self._fail_all(
                f"worker rank {msg.rank} stopped ({msg.error_type}: {msg.message}); "
                "the engine has shut down"
            )
            return
        pending = self._pop(msg.batch_id)
        if pending is not None:
            logger.error("rank %d: batch %s failed:\n%s", msg.rank, msg.batch_id, msg.traceback)
            pending.future.set_exception(
                RequestFailedError(
                    msg.batch_id, msg.rank, msg.error_type, msg.message, msg.traceback
                )  # fmt: skip
            )

    def _dead_ranks(self, grace_s: float = 0.0) -> list[int]:
        """Ranks whose process has exited, waiting up to ``grace_s`` for one (a killed
        peer's sockets close a moment before its exit status is there)."""
        deadline = time.monotonic() + grace_s
        while True:
            dead = [r for r, p in enumerate(self._procs) if p.poll() is not None]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.01)

    def _pop(self, batch_id: str) -> _Pending | None:
        with self._lock:
            return self._pending.pop(batch_id, None)

    def _monitor(self) -> None:
        reason = _wait_for_trouble(self._procs, self._check_beats, lambda: self._closed)
        if reason is None or self._closed:
            return
        self._fail_all(f"{reason}; the engine has shut down. Create a new generator to continue.")
        self.shutdown(grace=1.0)  # the others are likely stuck in a collective

    SILENT_MEANS = "stopped or hung"  # what a rank without heartbeats may be

    def _who(self, rank: int) -> str:
        return f"worker rank {rank} (pid {self._procs[rank].pid})"

    def _check_beats(self) -> str | None:
        """Why a worker counts as dead by its heartbeats (None while all are healthy)."""
        now = time.monotonic()
        for rank, beat in self._beats.items():
            if now - beat.last > self.worker_timeout_s:
                return (
                    f"{self._who(rank)} sent no heartbeat for {now - beat.last:.1f}s "
                    f"(worker_timeout_s={self.worker_timeout_s:g}): {self.SILENT_MEANS}"
                )
            if beat.busy and now - beat.progress_since > self.stall_timeout_s:
                return (
                    f"{self._who(rank)} made no progress for {now - beat.progress_since:.1f}s "
                    f"(stall_timeout_s={self.stall_timeout_s:g}): stuck in a kernel or a "
                    f"collective"
                )
        return None

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._dead_reason is None:
                self._dead_reason = reason
            pending, self._pending = list(self._pending.values()), {}
            controls, self._controls = list(self._controls.values()), {}
        for future, _ in controls:
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        if pending:
            logger.error("%s (%d batch(es) failed)", reason, len(pending))
        for p in pending:
            if not p.future.done():
                p.future.set_exception(EngineDeadError(reason))

    # --- shutdown ----------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead_reason is None and not self._closed

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop workers (shutdown message, then terminate, then kill) and remove every
        socket file and the rendezvous store. Safe to call more than once, from any thread;
        returns once everything is gone."""
        with self._lock:
            first, self._closed = not self._closed, True
        if not first:
            self._shutdown_done.wait(timeout=grace + 10)
            return
        try:
            self._fail_all("the engine was shut down")
            frames = self._encoder.encode(Shutdown(self._token))
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
            shutil.rmtree(self._dir, ignore_errors=True)
            _live_executors.discard(self)
        finally:
            self._shutdown_done.set()


def _wait_for_trouble(
    procs: list[WorkerProcess], check: Callable[[], str | None], stop: Callable[[], bool]
) -> str | None:
    """Block until a worker exits or ``check()`` names a problem; the reason (None once
    ``stop()`` is true). Uses pidfds (Linux) so a death is seen at once."""
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
                select.select(list(pidfds), [], [], 0.25)
            else:
                time.sleep(0.1)
            for rank, proc in enumerate(procs):
                if proc.poll() is not None:
                    return (
                        f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.returncode}"
                    )
            reason = check()
            if reason is not None:
                return reason
        return None
    finally:
        for fd in pidfds:
            os.close(fd)


def _stop_processes(procs: list[WorkerProcess], grace: float = 5.0) -> None:
    """Ask, then terminate, then kill; closing stdin also tells each worker to exit. A
    stopped (SIGSTOP) worker is killed straight away: it cannot act on anything else."""
    deadline = time.monotonic() + grace
    for proc in procs:
        if _is_stopped(proc.pid):
            proc.kill()
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


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False
