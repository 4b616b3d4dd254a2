"""The worker process: a ``Worker`` behind ZeroMQ sockets.

Started as ``python -m fastvideo.worker.main`` in its own session (a terminal's Ctrl-C
reaches the driver only; the driver decides what to stop), not through multiprocessing, so
the user's script is never re-imported in the child. Its arguments arrive on stdin as one
length-prefixed msgspec message; stdin then stays open as the death pipe: EOF means the
driver is gone, and the worker exits at once.

Start-up: a CUDA worker starts FA4's import while it waits for its arguments; then decode
the arguments, start the death watch and the heartbeat thread, start reading this rank's
weights (threads), load the plugins, join the process group, build and fill the modules,
then send ``WorkerReady`` with the seconds each part took (or ``WorkerFailure``).
Then serve batches until ``Shutdown``. A message that does not decode, or does not carry
the engine's token, is dropped and counted; an exception in a batch is reported for that
batch and the worker keeps serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import sys
import threading
import time
import traceback
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq

from fastvideo.logger import init_logger
from fastvideo.pipelines.base import ForwardBatch, RanksOutOfStepError
from fastvideo.wire.codec import Decoder, Encoder
from fastvideo.wire.errors import MalformedMessage
from fastvideo.wire.messages import (
    AbortItems,
    Control,
    ControlReply,
    GenerateBatch,
    Heartbeat,
    Progress,
    Shutdown,
    ToWorker,
    WorkerArgs,
    WorkerFailure,
    WorkerReady,
)

if TYPE_CHECKING:
    import torch.distributed as dist

logger = init_logger(__name__)

POLL_MS = 500
# Set by the driver that starts a worker before its arguments exist: the device it will be
# given ("cuda:i" for the i-th worker started, or "cpu"), and the attention backend its
# configuration asks for ("auto", "fa4", "sdpa", ...).
DEVICE_HINT = "FASTVIDEO_WORKER_DEVICE"
ATTENTION_HINT = "FASTVIDEO_WORKER_ATTENTION"


def _watch_parent(stdin_fd: int, socket_dir: str | None) -> None:
    """Exit as soon as the driver is gone (stdin reaches EOF), even mid-batch.

    Rank 0 also removes the driver's socket directory, which a killed driver leaves behind.
    """
    try:
        while os.read(stdin_fd, 4096):
            pass
    except OSError:
        pass
    if socket_dir is not None:
        shutil.rmtree(socket_dir, ignore_errors=True)
    os._exit(1)


def _process_start() -> float:
    """When this process started (time.time(); a forked one: at the fork)."""
    import psutil

    return psutil.Process().create_time()


def _since_exec() -> float:
    """Seconds since this process started (the interpreter's own start-up included)."""
    return time.time() - _process_start()


# What prepare_before_args did, in seconds from the process start (the start-up breakdown).
_before_args: dict[str, float] = {}


def prepare_before_args(hint: str | None, attention: str | None = None) -> None:
    """What a worker started before its arguments exist does while it waits for them (they
    come once the driver has resolved the model, about a second after a fork): on CUDA,
    start FA4's import on a thread (the longest part of a warm start) unless the
    configuration asks for another backend, and create the CUDA context of the device the
    driver named. A wrong or failing guess costs only time: the arguments decide, and
    start-up reports any real error."""
    if not hint or not hint.startswith("cuda"):
        return
    from fastvideo.kernels_bridge.attention import preload_before_args

    preload_before_args(attention)
    try:
        import torch

        torch.cuda.set_device(torch.device(hint))  # creates the context (CUDA 12+)
        _before_args["cuda_context_done"] = _since_exec()
    except Exception as e:  # noqa: BLE001 - the real start-up reports what is wrong
        logger.debug("CUDA context before the arguments: %s", e)


def encode_args(args: WorkerArgs) -> bytes:
    payload = msgspec.msgpack.encode(args)
    return struct.pack("<I", len(payload)) + payload


def _read_args(stdin_fd: int) -> WorkerArgs:
    def read_exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(stdin_fd, n - len(data))
            if not chunk:
                raise SystemExit("driver closed stdin before sending the worker arguments")
            data += chunk
        return data

    (size,) = struct.unpack("<I", read_exact(4))
    return msgspec.msgpack.decode(read_exact(size), type=WorkerArgs)


class _BatchControl:
    """The StepControl of one batch: progress to the driver (leader only), aborts from the
    socket, plugin hooks; every boundary counts as progress for the heartbeat."""

    def __init__(self, loop: _WorkerLoop, batch_id: str, leader: bool):
        self.loop = loop
        self.batch_id = batch_id
        self.leader = leader
        self.start = time.perf_counter()

    def progress(self, stage: str, step: int, total: int) -> None:
        self.loop.progress_count += 1
        if self.leader:
            elapsed = time.perf_counter() - self.start
            self.loop.send(Progress(self.batch_id, stage, step, total, elapsed))

    def abort_requested(self) -> set[str]:
        return self.loop.poll_aborts()

    def at_step(self, batch: ForwardBatch, step: int) -> None:
        self.loop.progress_count += 1
        self.loop.worker.run_step_hooks(batch, step)


class _WorkerLoop:
    def __init__(self, args: WorkerArgs):
        self.args = args
        self.ctx = zmq.Context()
        self.requests = self.ctx.socket(zmq.PULL)
        self.requests.connect(args.request_addr)
        self.output = self.ctx.socket(zmq.PUSH)
        self.output.setsockopt(zmq.LINGER, 2000)
        self.output.connect(args.output_addr)
        self.encoder = Encoder()
        self.decoder = Decoder(ToWorker)
        self.worker = None
        self.store = None
        self.handlers = {
            GenerateBatch: self._generate,
            AbortItems: self._abort,
            Shutdown: self._shutdown,
            Control: self._control,
        }
        self.running = True
        self.exit_code = 0
        # Messages that arrived while a batch ran (read at step boundaries for aborts).
        self.backlog: deque[msgspec.Struct] = deque()
        self.aborts: set[str] = set()
        self.running_items: list[str] = []  # the items of the batch being run
        self.dropped = 0
        self.busy = False
        self.progress_count = 0
        self._stop_beats = threading.Event()
        self._beats: threading.Thread | None = None

    def send(self, msg: msgspec.Struct) -> None:
        msg.token = self.args.token  # type: ignore[attr-defined]
        self.output.send_multipart(self.encoder.encode(msg), copy=False)

    # --- start-up ----------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Heartbeats from their own thread and socket, so they go on while the main thread
        computes; they stop when the process is stopped or wedged."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.args.output_addr)
        encoder = Encoder()

        def beat() -> None:
            while self.running:
                msg = Heartbeat(self.args.rank, self.busy, self.progress_count, self.args.token)
                try:
                    sock.send_multipart(encoder.encode(msg), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                self._stop_beats.wait(self.args.heartbeat_s)
            sock.close(linger=0)

        self._beats = threading.Thread(target=beat, name="fastvideo-heartbeat", daemon=True)
        self._beats.start()

    def start(self, store: dist.Store | None = None) -> bool:
        """Start-up, in the order that overlaps most: the weight reads start as soon as the
        worker module is imported and run (in threads) while the plugins load, the process
        group forms and the modules are built. ``store``: a rendezvous the caller made (the
        TCPStore a Ray actor hosts for rank 0); else the one ``args.store_path`` names.
        False (the failure already reported) if start-up failed."""
        a = self.args
        # Python's start, this module's imports (torch), and the wait for the arguments
        # (the driver spawns workers before it has resolved the model).
        breakdown = {"until_args": _since_exec()}
        switch = sys.getswitchinterval()
        # The read threads need the GIL for a moment per range while the main thread runs
        # Python for seconds (imports, module building): hand it over sooner.
        sys.setswitchinterval(min(switch, 0.0005))
        try:
            import torch

            from fastvideo.config import PipelineConfig
            from fastvideo.worker.worker import Worker, set_cpu_threads

            breakdown["import_worker"] = _since_exec() - breakdown["until_args"]
            config = msgspec.convert(a.config, PipelineConfig)
            device = torch.device(a.device)
            if device.type == "cpu":
                set_cpu_threads(a.world_size)
            self.worker = Worker(a.rank, a.world_size, device, Path(a.model_dir), config)
            self.worker.start_reading()
            self.worker.load_plugins(a.plugins)
            if a.world_size > 1:
                self.store = store if store is not None else self._open_store()
                self.store.set_timeout(timedelta(seconds=max(60.0, a.arrival_timeout_s)))
            self.worker.init_distributed(self.store)
            seconds = self.worker.load()
        except BaseException as e:  # report anything, including import errors
            self.send(WorkerFailure(None, a.rank, type(e).__name__, str(e), traceback.format_exc()))
            return False
        finally:
            sys.setswitchinterval(switch)
        breakdown.update(self.worker.breakdown)
        breakdown.update(_before_args)
        from fastvideo.kernels_bridge.attention import fa4_import_times

        start = _process_start()
        breakdown.update({f"fa4_import_{k}": t - start for k, t in fa4_import_times.items()})
        breakdown["total"] = time.time() - start
        memory = self.worker.memory_bytes()
        ready = WorkerReady(
            a.rank,
            os.getpid(),
            a.device,
            seconds,
            memory,
            host_rss_bytes=self.worker.host_rss_bytes(),
            load_breakdown=breakdown,
        )
        self.send(ready)
        return True

    def _open_store(self) -> dist.Store:
        """``tcp://HOST:PORT``: a client of the TCPStore another rank hosts (Ray actors,
        possibly on other nodes); otherwise the FileStore at that path (one machine)."""
        import torch.distributed as dist

        a = self.args
        if a.store_path.startswith("tcp://"):
            host, _, port = a.store_path.removeprefix("tcp://").rpartition(":")
            timeout = timedelta(seconds=max(60.0, a.arrival_timeout_s))
            return dist.TCPStore(host.strip("[]"), int(port), a.world_size, False, timeout)
        return dist.FileStore(a.store_path, a.world_size)

    # --- serving -----------------------------------------------------------------------
    def serve(self) -> None:
        while self.running:
            msg = self.backlog.popleft() if self.backlog else self._receive(POLL_MS)
            if msg is not None:
                self.handlers[type(msg)](msg)

    def _receive(self, timeout_ms: int) -> msgspec.Struct | None:
        """The next well-formed message carrying the engine's token, or None."""
        if not self.requests.poll(timeout_ms):
            return None
        frames = self.requests.recv_multipart(copy=False)
        try:
            msg = self.decoder.decode(frames)
        except MalformedMessage as e:
            self.dropped += 1
            logger.warning("rank %d dropped a malformed message: %s", self.args.rank, e)
            return None
        if msg.token != self.args.token:
            self.dropped += 1
            logger.warning("rank %d dropped a %s without the engine's token", self.args.rank,
                           type(msg).__name__)  # fmt: skip
            return None
        return msg

    def poll_aborts(self) -> set[str]:
        """Called at step boundaries: take in what arrived, keep all but aborts for later.
        A Shutdown aborts the running batch (every rank gets it; the ranks agree on aborts
        at the boundary), so the worker exits at its next step, not after the batch."""
        while self.requests.poll(0):
            msg = self._receive(0)
            if isinstance(msg, AbortItems):
                self.aborts.update(msg.item_ids)
            elif msg is not None:
                self.backlog.append(msg)
                if isinstance(msg, Shutdown):
                    self.aborts.update(self.running_items)
        return self.aborts

    def _abort(self, msg: AbortItems) -> None:
        # Arrived between batches: the items may still be in the backlog.
        self.aborts.update(msg.item_ids)

    def _generate(self, msg: GenerateBatch) -> None:
        item_ids = [item.request_id for item in msg.items]
        try:
            ranks = msg.plan.replica_ranks(msg.replica)
            if not self._arrived(msg, ranks):
                return
            control = _BatchControl(self, msg.batch_id, ranks[0] == self.args.rank)
            self.busy, self.running_items = True, item_ids
            result = self.worker.execute(msg, control)
        except RanksOutOfStepError as e:
            # Peers may wait in a collective this rank will never join: report, then exit,
            # so the driver fails everything with EngineDeadError instead of hanging.
            cause = e.__cause__ or e
            logger.error("rank %d: %s; exiting (ranks out of step)", self.args.rank, e)
            message = f"{e} (fatal on a multi-rank engine: it shuts down)"
            self._fail(msg, type(cause).__name__, message, fatal=True)
            self.running, self.exit_code = False, 1
            return
        except Exception as e:
            logger.exception("rank %d: batch %s failed", self.args.rank, msg.batch_id)
            self._fail(msg, type(e).__name__, str(e))
            return
        finally:
            self.busy, self.running_items = False, []
            self.aborts.difference_update(item_ids)
        if result is not None:
            self.send(result)

    def _arrived(self, msg: GenerateBatch, ranks: list[int]) -> bool:
        """Every rank of the replica has this batch (else it is dropped, never half-run:
        ranks that run it alone would wait in its first collective forever).

        Each rank marks its arrival in the rendezvous store; the leader waits for all of
        them (``arrival_timeout_s``), then rules go or drop; the others wait for the ruling,
        or drop the batch once their leader has moved past it (it never got it).
        """
        if len(ranks) == 1 or self.store is None:
            return True
        key, rank = f"batch/{msg.batch_id}", self.args.rank
        self.store.set(f"{key}/{rank}", "1")
        lead_key = "lead/" + "-".join(map(str, ranks))
        if rank == ranks[0]:
            self.store.set(lead_key, str(msg.seq))
            arrived = self._wait(lambda: self.store.check([f"{key}/{r}" for r in ranks]),
                                 self.args.arrival_timeout_s)  # fmt: skip
            self.store.set(f"{key}/verdict", "go" if arrived else "drop")
            if not arrived:
                missing = [r for r in ranks if not self.store.check([f"{key}/{r}"])]
                message = (f"batch {msg.batch_id} did not reach ranks {missing} of its replica "
                           f"{ranks} within {self.args.arrival_timeout_s:g}s; dropped")  # fmt: skip
                self.send(WorkerFailure(msg.batch_id, rank, "IncompleteBatch", message))
            return arrived

        def ruled_or_passed() -> bool:
            if self.store.check([f"{key}/verdict"]):
                return True
            return self.store.check([lead_key]) and int(self.store.get(lead_key)) > msg.seq

        self._wait(ruled_or_passed, None)
        return self.store.check([f"{key}/verdict"]) and self.store.get(f"{key}/verdict") == b"go"

    def _wait(self, done, timeout_s: float | None) -> bool:
        """Poll ``done()`` (backing off to 20 ms) until true or ``timeout_s``; a Shutdown
        arriving meanwhile ends the wait (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.001
        while not done():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.poll_aborts()
            if any(isinstance(m, Shutdown) for m in self.backlog):
                self.running = False
                return False
            time.sleep(pause)
            pause = min(0.02, pause * 2)
        return True

    def _control(self, msg: Control) -> None:
        try:
            value = self.worker.control(msg.op, dict(msg.args))
            reply = ControlReply(msg.command_id, self.args.rank, "", value)
        except Exception as e:  # noqa: BLE001 - the command fails, the worker serves on
            logger.exception("rank %d: control %s failed", self.args.rank, msg.op)
            reply = ControlReply(msg.command_id, self.args.rank, f"{type(e).__name__}: {e}")
        self.send(reply)

    def _fail(self, msg: GenerateBatch, error_type: str, message: str, fatal: bool = False) -> None:
        tb = traceback.format_exc()
        failure = WorkerFailure(msg.batch_id, self.args.rank, error_type, message, tb, fatal=fatal)
        self.send(failure)

    def _shutdown(self, _: Shutdown) -> None:
        self.running = False

    def close(self) -> None:
        self.running = False
        self._stop_beats.set()
        if self._beats is not None:
            self._beats.join(timeout=5)
        if self.worker is not None:
            self.worker.close()
        self.requests.close(linger=0)
        self.output.close()
        self.ctx.term()


def main(stdin_fd: int | None = None) -> None:
    """``stdin_fd``: where the arguments arrive (a forked worker's pipe; default stdin)."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    prepare_before_args(os.environ.get(DEVICE_HINT), os.environ.get(ATTENTION_HINT))
    args = _read_args(stdin_fd)
    socket_dir = None
    if args.rank == 0 and args.output_addr.startswith("ipc://"):
        socket_dir = os.path.dirname(args.output_addr.removeprefix("ipc://"))
    threading.Thread(target=_watch_parent, args=(stdin_fd, socket_dir), daemon=True).start()
    loop = _WorkerLoop(args)
    loop.start_heartbeat()
    try:
        if loop.start():
            loop.serve()
    finally:
        loop.close()
    # Everything is closed: skip the interpreter's teardown (a second or so with torch
    # loaded), which only frees memory the OS takes back anyway.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(loop.exit_code)


if __name__ == "__main__":
    main()
