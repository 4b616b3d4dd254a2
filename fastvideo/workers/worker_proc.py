"""The worker process: a ``Worker`` behind ZeroMQ sockets.

Started as ``python -m fastvideo.workers.worker_proc`` (not multiprocessing, so the user's
script is never re-imported in the child: scripts without a ``__main__`` guard work).
Its arguments arrive on stdin as one length-prefixed msgspec message; stdin then stays
open as the death pipe: EOF means the driver is gone.

Start-up: decode the arguments, start the death watch, join the process
group, load, then send ``WorkerReady`` — or ``WorkerFailure`` with the traceback. Then
serve requests until ``Shutdown``. A message that does not decode is logged and dropped;
an exception in a request is reported for that request and the worker keeps serving.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import msgspec
import zmq

from fastvideo.engine.protocol import (
    AbortRequest,
    GenerateRequest,
    Progress,
    Shutdown,
    ToWorker,
    WorkerFailure,
    WorkerReady,
)
from fastvideo.engine.serial import Decoder, Encoder, MalformedMessage
from fastvideo.logger import init_logger
from fastvideo.pipelines.base import RanksOutOfStepError

logger = init_logger(__name__)

POLL_MS = 500


class WorkerArgs(msgspec.Struct, array_like=True):
    """Everything a worker process needs, passed explicitly at spawn (msgspec-encoded)."""

    rank: int
    world_size: int
    device: str
    model_dir: str
    config: dict
    store_host: str
    store_port: int
    request_addr: str
    output_addr: str


def _watch_parent(stdin_fd: int, socket_dir: str | None) -> None:
    """Exit as soon as the driver is gone (stdin reaches EOF), even mid-request.

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
        self.handlers = {
            GenerateRequest: self._generate,
            AbortRequest: self._abort,
            Shutdown: self._shutdown,
        }
        self.running = True
        self.exit_code = 0
        # Messages that arrived while a request ran (read at step boundaries for aborts).
        self.backlog: deque[msgspec.Struct] = deque()
        self.aborts: set[str] = set()

    def send(self, msg: msgspec.Struct) -> None:
        self.output.send_multipart(self.encoder.encode(msg), copy=False)

    def start(self) -> bool:
        import torch

        from fastvideo.engine.configs import PipelineConfig
        from fastvideo.workers.worker import Worker, set_cpu_threads

        a = self.args
        try:
            config = msgspec.convert(a.config, PipelineConfig)
            device = torch.device(a.device)
            if device.type == "cpu":
                set_cpu_threads(a.world_size)
            self.worker = Worker(a.rank, a.world_size, device, Path(a.model_dir), config)
            self.worker.abort_source = self._poll_aborts
            self.worker.init_distributed(a.store_host, a.store_port)
            seconds = self.worker.load()
        except BaseException as e:  # report anything, including import errors
            self.send(WorkerFailure(None, a.rank, type(e).__name__, str(e), traceback.format_exc()))
            return False
        self.send(WorkerReady(a.rank, os.getpid(), a.device, seconds, self.worker.memory_bytes()))
        return True

    def serve(self) -> None:
        while self.running:
            msg = self.backlog.popleft() if self.backlog else self._receive(POLL_MS)
            if msg is not None:
                self.handlers[type(msg)](msg)

    def _receive(self, timeout_ms: int) -> msgspec.Struct | None:
        """The next well-formed message, or None (timeout, or a malformed one dropped)."""
        if not self.requests.poll(timeout_ms):
            return None
        frames = self.requests.recv_multipart(copy=False)
        try:
            return self.decoder.decode(frames)
        except MalformedMessage as e:
            logger.warning("rank %d dropped a malformed message: %s", self.args.rank, e)
            return None

    def _poll_aborts(self) -> set[str]:
        """Called at step boundaries: take in what arrived, keep all but aborts for later."""
        while self.requests.poll(0):
            msg = self._receive(0)
            if isinstance(msg, AbortRequest):
                self.aborts.update(msg.item_ids)
            elif msg is not None:
                self.backlog.append(msg)
        return self.aborts

    def _abort(self, msg: AbortRequest) -> None:
        # Arrived between requests: the items may still be in the backlog.
        self.aborts.update(msg.item_ids)

    def _generate(self, req: GenerateRequest) -> None:
        start = time.perf_counter()

        def progress(stage: str, step: int, total: int) -> None:
            self.send(Progress(req.request_id, stage, step, total, time.perf_counter() - start))

        try:
            result = self.worker.execute(req, progress)
        except RanksOutOfStepError as e:
            # Peers may wait in a collective this rank will never join: report, then exit,
            # so the driver fails everything with EngineDeadError instead of hanging.
            cause = e.__cause__ or e
            logger.error("rank %d: %s; exiting (ranks out of step)", self.args.rank, e)
            message = f"{e} (fatal on a multi-rank engine: it shuts down)"
            self._fail(req, type(cause).__name__, message)
            self.running, self.exit_code = False, 1
            return
        except Exception as e:
            logger.exception("rank %d: request %s failed", self.args.rank, req.request_id)
            self._fail(req, type(e).__name__, str(e))
            return
        finally:
            self.aborts.difference_update(req.item_ids)
        if result is not None:
            self.send(result)

    def _fail(self, req: GenerateRequest, error_type: str, message: str) -> None:
        tb = traceback.format_exc()
        self.send(WorkerFailure(req.request_id, self.args.rank, error_type, message, tb))

    def _shutdown(self, _: Shutdown) -> None:
        self.running = False

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.requests.close(linger=0)
        self.output.close()
        self.ctx.term()


def main() -> None:
    stdin_fd = sys.stdin.fileno()
    args = _read_args(stdin_fd)
    socket_dir = None
    if args.rank == 0 and args.output_addr.startswith("ipc://"):
        socket_dir = os.path.dirname(args.output_addr.removeprefix("ipc://"))
    threading.Thread(target=_watch_parent, args=(stdin_fd, socket_dir), daemon=True).start()
    loop = _WorkerLoop(args)
    try:
        if loop.start():
            loop.serve()
    finally:
        loop.close()
    sys.exit(loop.exit_code)


if __name__ == "__main__":
    main()
