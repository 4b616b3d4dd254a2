"""Worker processes forked from the driver, where that is safe.

A spawned worker (``python -m fastvideo.worker.main``) spends its first seconds starting
Python and importing torch (3.7 s of a 7 s start-up measured on the H200 machine). A forked
one starts with the driver's imports already done. Forking is only safe while nothing in
the driver can have left state the child cannot use:

- CUDA: once the driver API is initialised (``cuInit``: any CUDA call, including
  ``torch.cuda.is_available()``), a forked child cannot use the GPU;
- threads: a lock another Python thread holds at the fork stays held in the child for
  ever (so ``auto`` forks only from a process running one Python thread);
- OpenMP: GNU OpenMP's thread pool does not survive a fork, and a child that asks it for
  more than one thread hangs; so a forked worker runs torch's CPU ops on one thread (a
  GPU worker's work is on the GPU; CPU workers are spawned unless fork is asked for).

``start_method(device)`` says which start a worker gets (``FASTVIDEO_WORKER_START``:
``auto`` forks CUDA workers when the checks pass, ``spawn`` never forks, ``fork`` forks
unless CUDA is initialised). ``ForkedWorker`` has the part of ``subprocess.Popen`` the
executor uses.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from fastvideo import envs
from fastvideo.logger import init_logger

logger = init_logger(__name__)

CUDA_ERROR_NOT_INITIALIZED = 3

# The driver's ends of the forked workers' stdin pipes. A child closes every one it
# inherits, or a worker's death pipe would stay open while a later-forked worker lives.
_driver_ends: set[int] = set()
_driver_ends_lock = threading.Lock()


def cuda_driver_initialized() -> bool:
    """Whether this process has initialised the CUDA driver API, without initialising it:
    no ``libcuda`` mapped means no; otherwise ``cuDeviceGetCount`` answers
    ``CUDA_ERROR_NOT_INITIALIZED`` until ``cuInit`` has run. True where it cannot tell."""
    try:
        import torch

        if torch.cuda.is_initialized():
            return True
    except ImportError:
        return False
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" not in f.read():
                return False
        count = ctypes.c_int()
        lib = ctypes.CDLL("libcuda.so.1")
        return lib.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED
    except OSError:
        return True


def other_python_threads() -> bool:
    """Whether a Python thread besides this one is alive."""
    return threading.active_count() > 1


def start_method(device: str) -> tuple[str, str]:
    """('fork' or 'spawn', why) for a worker on ``device`` ('cuda' or 'cpu')."""
    asked = envs.worker_start()
    if asked == "spawn":
        return "spawn", "FASTVIDEO_WORKER_START=spawn"
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return "spawn", "fork is used on Linux only"
    if cuda_driver_initialized():
        if asked == "fork":
            raise RuntimeError(
                "FASTVIDEO_WORKER_START=fork, but CUDA is already initialised in this "
                "process (a forked worker could not use the GPU): unset it, or make no "
                "CUDA call before from_pretrained"
            )
        return "spawn", "CUDA is initialised in this process"
    if asked == "fork":
        return "fork", "FASTVIDEO_WORKER_START=fork"
    if device != "cuda":
        return "spawn", "CPU workers use all their threads (set FASTVIDEO_WORKER_START=fork)"
    if other_python_threads():
        return "spawn", "this process runs other Python threads"
    return "fork", "CUDA is not initialised and no other thread runs"


class ForkedWorker:
    """A forked child, with ``subprocess.Popen``'s ``pid``, ``stdin``, ``returncode``,
    ``poll``, ``wait``, ``terminate`` and ``kill``."""

    def __init__(self, pid: int, stdin_fd: int):
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = _DriverEnd(stdin_fd)
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped by someone else: its status is gone
                    self.returncode = -1
                else:
                    if pid == self.pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked worker {self.pid}", timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _DriverEnd(io.BufferedWriter):
    """The driver's end of a forked worker's stdin; closing it also drops it from the ends
    later children close."""

    def __init__(self, fd: int):
        super().__init__(io.FileIO(fd, "wb"))
        self._fd = fd

    def close(self) -> None:
        with _driver_ends_lock:
            _driver_ends.discard(self._fd)
        super().close()


def fork_worker(env: dict[str, str], target: Callable[[int], object] | None = None) -> ForkedWorker:
    """Fork a child that runs ``target(stdin_fd)`` (default: the worker's ``main``) in its
    own session and exits with ``os._exit``; its stdin is a pipe the driver writes."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()  # or the child would write the driver's buffered output again
    sys.stderr.flush()
    with _driver_ends_lock:
        inherited = _driver_ends - {0, 1, 2, read_end}
        pid = os.fork()
        if pid != 0:
            _driver_ends.add(write_end)
    if pid == 0:  # the child
        code = 1
        try:
            os.setsid()  # a terminal's Ctrl-C reaches the driver only
            for fd in (write_end, *inherited):
                try:
                    os.close(fd)
                except OSError:
                    pass
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.environ.update(env)
            _child_reset()
            if target is None:
                from fastvideo.worker.main import main as target
            target(read_end)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported on stderr, the exit code says it
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(read_end)
    return ForkedWorker(pid, write_end)


def _child_reset() -> None:
    """What the driver's state must not carry into the worker."""
    from fastvideo.executor import multiproc
    from fastvideo.worker.worker import keep_one_cpu_thread

    keep_one_cpu_thread()  # the parent's OpenMP pool is gone (see the module notes)

    multiproc.forget_inherited_executors()
