"""Concurrent, single-copy reads of safetensors checkpoints onto one device.

A ``WeightReader`` owns a small thread pool. ``submit({path: keys})`` reads the tensors of
those files onto the device, each in its file dtype (the loader casts the few that need
another dtype once, on the device), and returns a future of ``{key: tensor}``. Everything
submitted is read concurrently: a worker submits all of its components' files before it
builds any module (``loader.WeightSource``).

How a tensor gets there:

- CUDA: the file's data is cut into ranges of about ``chunk_bytes``; a pool thread reads a
  range with one ``preadv`` into its own pinned buffer, then copies each tensor's part
  straight into that tensor (allocated once, in its final place) with one
  ``_foreach_copy_`` on the thread's own stream, and waits for the copy before reusing the
  buffer. One host copy (page cache -> pinned), one DMA; ``preadv`` and the copies
  release the GIL, so the threads run concurrently with each other and with the Python
  work of building modules. Large sequential reads also suit a cold page cache. Measured
  (H200, numbers above ``CHUNK_BYTES``) about 7x safetensors' own ``device="cuda"`` reads
  on one thread and 1.8x them on 8 threads, hence this path rather than those.
- CPU, ``cpu_mode="mmap"`` (the default): safetensors' zero-copy views of the mapped file;
  pages are read on first use, no copy at all.
- CPU, ``cpu_mode="read"``: the ranges are read with ``preadv`` straight into each tensor's
  memory (one copy, eager). The same range splitting as on CUDA, so a CPU test checks it.

Headers are parsed here (``read_header``): the offsets are needed for ranged reads, and a
missing or truncated file fails before any read with ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastvideo.distributed.runtime import indexed
from fastvideo.logger import init_logger

logger = init_logger(__name__)

# Measured on one H200 host (16 cores), warm page cache, 14.7 GB of bf16/fp32 weights:
# 8 threads x 16 MB ranges 29 GB/s, 8 x 64 MB 24, 4 x 16 MB 18; safetensors' own
# get_tensor(device="cuda") 4.3 GB/s on one thread, 17 on 8 (benchmarks/load.py --reads).
CHUNK_BYTES = 16 << 20
MAX_THREADS = 8
_MAX_SEGMENTS = 512  # preadv takes at most IOV_MAX (1024) buffers
_HEADER_LIMIT = 100 << 20  # safetensors' own bound on the JSON header

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # unsigned types beyond uint8 came with torch 2.3
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


class CheckpointError(RuntimeError):
    """A component's weights are missing, truncated or do not fit its architecture."""


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's bytes are in its file (``start`` is an absolute file offset)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorRecord]:
    """Every tensor of one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"cannot read {path} (truncated or not safetensors): {e}") from None
    base = 8 + length
    records = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} has a bad header entry: {e}") from None
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for {shape}")
        if base + end > size:
            raise CheckpointError(
                f"cannot read {path} (truncated): tensor {key!r} ends at byte {base + end}, "
                f"the file has {size}"
            )
        records[key] = TensorRecord(key, dtype, shape, base + begin, end - begin)
    return records


@dataclass
class _Range:
    """A contiguous byte range of one file and the tensor parts it holds, in file order:
    (tensor key, offset in the tensor's bytes, offset in the range, length)."""

    path: Path
    start: int
    length: int = 0
    parts: list[tuple[str, int, int, int]] = field(default_factory=list)


def plan_ranges(path: Path, records: Iterable[TensorRecord], chunk: int) -> list[_Range]:
    """Cut the tensors' bytes into ranges of at most ``chunk`` bytes: a large tensor spans
    several ranges, small neighbours share one, a gap between tensors starts a new one."""
    ranges: list[_Range] = []
    current = _Range(path, -1)
    for rec in sorted(records, key=lambda r: r.start):
        done = 0
        while done < rec.nbytes:
            pos = rec.start + done
            full = current.length >= chunk or len(current.parts) >= _MAX_SEGMENTS
            if full or current.start + current.length != pos:
                current = _Range(path, pos)
                ranges.append(current)
            take = min(rec.nbytes - done, chunk - current.length)
            current.parts.append((rec.key, done, current.length, take))
            current.length += take
            done += take
    return ranges


class WeightReader:
    """Reads safetensors files onto ``device`` on a pool of ``threads`` threads."""

    def __init__(
        self,
        device: torch.device,
        threads: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        cpu_mode: str = "mmap",
    ):
        if cpu_mode not in ("mmap", "read"):
            raise ValueError(f"cpu_mode must be 'mmap' or 'read', got {cpu_mode!r}")
        self.device = indexed(torch.device(device))  # the reading threads set it
        self.chunk_bytes = chunk_bytes
        self.cpu_mode = cpu_mode
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4
        self.threads = threads or max(2, min(MAX_THREADS, cores))
        self._pool = ThreadPoolExecutor(
            self.threads, thread_name_prefix="fastvideo-read", initializer=self._init_thread
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.busy_s = 0.0  # wall time with at least one submission in flight
        self._in_flight = 0
        self._busy_since = 0.0

    def _init_thread(self) -> None:
        if self.device.type == "cuda":  # else pinned buffers would make a context on cuda:0
            torch.cuda.set_device(self.device)

    @property
    def mmap(self) -> bool:
        return self.device.type == "cpu" and self.cpu_mode == "mmap"

    def submit(self, files: dict[Path, list[str] | None]) -> Future[dict[str, torch.Tensor]]:
        """Start reading ``files`` (path -> keys to read, None: all of them); a future of
        ``{key: tensor}`` in file dtypes. A bad file fails the future, not this call."""
        future: Future[dict[str, torch.Tensor]] = Future()
        try:
            out, jobs = self._plan(files)
            _Join(self, jobs, out, future).start()
        except BaseException as e:  # header (and open) errors travel like read errors
            if not future.done():
                future.set_exception(e)
        return future

    def close(self) -> None:
        """Wait for the reads in flight, stop the threads, give back the pinned buffers."""
        self._pool.shutdown(wait=True)
        self._local = threading.local()
        if self.device.type == "cuda":
            accelerator = getattr(torch, "accelerator", None)
            release = getattr(accelerator, "empty_host_cache", None)
            (release or getattr(torch._C, "_host_emptyCache", lambda: None))()

    # --- planning (the submitting thread) -------------------------------------------------
    def _plan(self, files: dict[Path, list[str] | None]) -> tuple[dict[str, torch.Tensor], list]:
        """Parse every header first (a bad file fails before any read), allocate each
        tensor once in its final place, and cut the reads into jobs for the pool."""
        out: dict[str, torch.Tensor] = {}
        jobs: list[tuple] = []
        for path, keys in files.items():
            records = read_header(path)
            if keys is not None:
                absent = [k for k in keys if k not in records]
                if absent:
                    raise CheckpointError(f"{path} holds no tensor {absent[0]!r}")
                records = {k: records[k] for k in keys}
            if self.mmap:
                jobs.append((self._read_mmap, path, list(records)))
                continue
            for rec in records.values():
                out[rec.key] = torch.empty(rec.shape, dtype=rec.dtype, device=self.device)
            jobs += [
                (self._read_range, r) for r in plan_ranges(path, records.values(), self.chunk_bytes)
            ]
        return out, jobs

    # --- reading (pool threads) -----------------------------------------------------------
    def _read_mmap(self, out: dict[str, torch.Tensor], fds: dict, path: Path, keys: list[str]):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys:
                out[key] = f.get_tensor(key)

    def _read_range(self, out: dict[str, torch.Tensor], fds: dict, rng: _Range) -> None:
        fd = fds[rng.path]
        if self.device.type == "cpu":  # straight into the tensors, one buffer per part
            views = [_bytes(out[k])[a : a + n].numpy() for k, a, _, n in rng.parts]
            got = os.preadv(fd, views, rng.start)
        else:
            buf, stream = self._staging()
            got = os.preadv(fd, [buf.numpy()[: rng.length]], rng.start)
            if got == rng.length:
                dsts = [_bytes(out[k])[a : a + n] for k, a, _, n in rng.parts]
                srcs = [buf[o : o + n] for _, _, o, n in rng.parts]
                with torch.cuda.stream(stream):
                    torch._foreach_copy_(dsts, srcs, non_blocking=True)
                stream.synchronize()  # the buffer takes this thread's next range
        if got != rng.length:
            raise CheckpointError(
                f"cannot read {rng.path} (truncated?): got {got} of {rng.length} bytes at "
                f"offset {rng.start}"
            )
        with self._lock:
            self.bytes_read += rng.length

    def _staging(self) -> tuple[torch.Tensor, torch.cuda.Stream]:
        """This thread's pinned buffer and copy stream (made on first use)."""
        local = self._local
        if getattr(local, "buf", None) is None:
            local.buf = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True)
            local.stream = torch.cuda.Stream(self.device)
        return local.buf, local.stream

    def _busy(self, delta: int) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += delta
            if self._in_flight == 0:
                self.busy_s += now - self._busy_since


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's memory as flat bytes (a view: writes land in ``t``)."""
    return t.reshape(-1).view(torch.uint8)


class _Join:
    """Runs one submission's jobs on the pool and settles its future when the last one
    ends (with the first error, if any; later jobs are skipped once one failed)."""

    def __init__(self, reader: WeightReader, jobs: list[tuple], out: dict, future: Future):
        self.reader, self.jobs, self.out, self.future = reader, jobs, out, future
        self.left = len(jobs)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.fds: dict[Path, int] = {}

    def start(self) -> None:
        if not self.jobs:
            self.future.set_result(self.out)
            return
        if not self.reader.mmap:
            try:
                for path in {job[1].path for job in self.jobs}:
                    self.fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                for fd in self.fds.values():
                    os.close(fd)
                raise CheckpointError(
                    f"checkpoint file {e.filename} cannot be opened: {e}"
                ) from None
        self.reader._busy(+1)
        for job in self.jobs:
            self.reader._pool.submit(self._run, job)

    def _run(self, job: tuple) -> None:
        try:
            if self.error is None:
                job[0](self.out, self.fds, *job[1:])
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            if not isinstance(e, CheckpointError):
                path = getattr(job[1], "path", job[1])
                e = CheckpointError(f"cannot read {path} (truncated or corrupt?): {e}")
            with self.lock:
                self.error = self.error or e
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if not last:
            return
        for fd in self.fds.values():
            os.close(fd)
        self.reader._busy(-1)
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.out)
