"""Load safetensors checkpoints straight into modules built on the meta device.

No weight is initialised twice: the module is created on ``meta`` (shapes only), every
tensor is read once onto the target device in its file dtype (``weight_reader``: a thread
pool, single copy), cast once on the device where its target dtype differs, and assigned.
Missing files, truncated files, missing or unexpected keys and shape mismatches raise
``CheckpointError`` naming the file and the keys, before any tensor is read.

Reads can start before the modules exist: a ``WeightSource`` reads whole component folders
in the background (``prefetch``), and ``load_checkpoint`` run inside ``reading_from(source)``
takes its tensors from there instead of reading again.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.nn as nn

from fastvideo.logger import init_logger
from fastvideo.models.weight_reader import CheckpointError, TensorRecord, WeightReader, read_header

logger = init_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "DTYPES",
    "CheckpointError",
    "WeightSource",
    "checkpoint_files",
    "load_checkpoint",
    "meta_module",
    "readahead",
    "reading_from",
]


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it.

    Uses ``*.safetensors.index.json`` when present (sharded checkpoints), else the single
    ``*.safetensors`` file of the folder.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {folder}")
    plain = [f for f in files if f.name.count(".") == 1]  # not a variant like x.fp16.safetensors
    if len(files) > 1 and len(plain) == 1:
        files = plain
    if len(files) > 1:
        raise CheckpointError(
            f"{folder} holds several safetensors files ({', '.join(f.name for f in files)}) "
            f"but no *.safetensors.index.json saying which tensor is where"
        )
    return dict.fromkeys(read_header(files[0]), files[0])


def _by_file(where: dict[str, Path], keys: list[str] | None = None) -> dict[Path, list[str] | None]:
    """path -> the keys to read from it (None: all of them)."""
    if keys is None:
        return dict.fromkeys(sorted(set(where.values())))
    out: dict[Path, list[str] | None] = {}
    for key in keys:
        out.setdefault(where[key], []).append(key)  # type: ignore[union-attr]
    return out


class WeightSource:
    """Component folders being read in the background, for ``load_checkpoint`` to take.

    ``prefetch(folders)`` plans and starts the reads on a thread of its own (planning
    allocates every tensor on the device, which also creates the CUDA context: neither
    should hold up the caller). A folder no loader takes is released by ``close()`` (and
    logged), so a wrong guess costs reading time, never memory.
    """

    def __init__(self, reader: WeightReader):
        self.reader = reader
        self._pending: dict[Path, Future[dict[str, torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self._planner: threading.Thread | None = None

    def prefetch(self, folders: list[Path]) -> None:
        """Start reading every tensor of ``folders``. A folder that cannot be read is left
        for its loader to report, in the loader's own words and order."""

        def plan() -> None:
            for folder in folders:
                try:
                    files = _by_file(checkpoint_files(folder))
                except (CheckpointError, OSError, ValueError, KeyError):
                    continue
                future = self.reader.submit(files)
                with self._lock:
                    self._pending[Path(folder)] = future

        self._planner = threading.Thread(target=plan, name="fastvideo-read-plan", daemon=True)
        self._planner.start()

    def take(
        self, folder: Path, where: dict[str, Path], keys: list[str]
    ) -> dict[str, torch.Tensor]:
        """The tensors of ``folder`` (prefetched, else read now), waiting for them."""
        if self._planner is not None:
            self._planner.join()
        with self._lock:
            future = self._pending.pop(Path(folder), None)
        if future is None:
            future = self.reader.submit(_by_file(where, keys))
        return future.result()

    def close(self) -> None:
        if self._planner is not None:
            self._planner.join()
        with self._lock:
            unclaimed, self._pending = list(self._pending), {}
        if unclaimed:
            logger.info("read but not loaded by any component: %s", ", ".join(map(str, unclaimed)))
        self.reader.close()


READAHEAD_WINDOW = 1 << 20


def readahead(folder: Path, max_fraction: float = 0.5) -> threading.Thread | None:
    """Have the kernel start reading every safetensors file under ``folder`` into the page
    cache, so a cold start's disk reads overlap whatever runs before the loaders read.

    ``POSIX_FADV_WILLNEED`` queues the reads and returns; Linux caps one call at the
    device's readahead size, so it is issued window by window (cheap for cached pages).
    Skipped where unsupported, or when the files would take more than ``max_fraction`` of
    the available memory (they would only evict each other)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = [p for p in Path(folder).rglob("*.safetensors") if p.is_file()]
    try:
        import psutil

        if sum(p.stat().st_size for p in files) > max_fraction * psutil.virtual_memory().available:
            return None
    except (ImportError, OSError):
        return None

    def run() -> None:
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                for offset in range(0, os.fstat(fd).st_size, READAHEAD_WINDOW):
                    os.posix_fadvise(fd, offset, READAHEAD_WINDOW, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=run, name="fastvideo-readahead", daemon=True)
    thread.start()
    return thread


_SOURCE: contextvars.ContextVar[WeightSource | None] = contextvars.ContextVar(
    "fastvideo_weight_source", default=None
)


@contextlib.contextmanager
def reading_from(source: WeightSource | None) -> Iterator[None]:
    """``load_checkpoint`` calls inside this block take their tensors from ``source``."""
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _describe(keys: set[str], limit: int = 8) -> str:
    shown = sorted(keys)[:limit]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_checkpoint(
    module: nn.Module,
    folder: Path,
    device: torch.device,
    dtype_for: Callable[[str], torch.dtype],
    *,
    tied: dict[str, str] | None = None,
    ignore_unexpected: tuple[str, ...] = (),
) -> nn.Module:
    """Fill a meta-device ``module`` from the safetensors of ``folder``.

    Args:
        dtype_for: target dtype of each parameter, by name.
        tied: parameters that share another one's tensor (``{target: source}``); targets
            may be absent from the checkpoint.
        ignore_unexpected: key substrings allowed in the file but unused by the module.
    """
    tied = tied or {}
    marks = [time.perf_counter()]
    expected = dict(module.state_dict(keep_vars=True))
    where = checkpoint_files(folder)
    needed = set(expected) - set(tied)
    missing = needed - set(where)
    unexpected = {
        k for k in set(where) - set(expected) if not any(p in k for p in ignore_unexpected)
    }
    if missing or unexpected:
        files = ", ".join(sorted({p.name for p in where.values()}))
        parts = [f"missing keys: {_describe(missing)}"] if missing else []
        parts += [f"unexpected keys: {_describe(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{folder} ({files}) does not match the model: " + "; ".join(parts))
    keys = sorted(needed | (set(tied) & set(where)))
    _check_shapes(where, keys, expected)
    marks.append(time.perf_counter())
    tensors = _read(folder, where, keys, torch.device(device))
    marks.append(time.perf_counter())
    # Cast once, on the device, where the target dtype differs (a no-op otherwise).
    state = {key: tensors[key].to(dtype_for(key)) for key in keys}
    del tensors  # tensors read but not used (ignored keys, pre-cast copies) go now
    marks.append(time.perf_counter())
    for target, source in tied.items():
        state.setdefault(target, state[source])
    module.load_state_dict(state, strict=True, assign=True)
    _retie(module, tied)
    module.eval().requires_grad_(False)
    marks.append(time.perf_counter())
    spans = zip(("checks", "read", "cast", "assign"), marks[:-1], marks[1:], strict=True)
    logger.debug("%s: %s", folder.name, ", ".join(f"{n} {b - a:.2f}s" for n, a, b in spans))
    return module


def _check_shapes(where: dict[str, Path], keys: list[str], expected: dict) -> None:
    headers: dict[Path, dict[str, TensorRecord]] = {}
    for key in keys:
        path = where[key]
        if path not in headers:
            headers[path] = read_header(path)
        record = headers[path].get(key)
        if record is None:
            raise CheckpointError(f"{path} holds no tensor {key!r} (its index says it does)")
        if record.shape != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {record.shape}, the model expects "
                f"{tuple(expected[key].shape)}"
            )


def _read(
    folder: Path, where: dict[str, Path], keys: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    source = _SOURCE.get()
    if source is not None and source.reader.device == device:
        return source.take(folder, where, keys)
    reader = WeightReader(device)
    try:
        return reader.submit(_by_file(where, keys)).result()
    finally:
        reader.close()


def _retie(module: nn.Module, tied: dict[str, str]) -> None:
    """Make tied targets the *same* Parameter object as their source again."""
    for target, source in tied.items():
        src = module.get_parameter(source)
        parent_name, _, attr = target.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, src)


def meta_module(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` on the meta device: shapes only, no memory, no init."""
    with torch.device("meta"):
        return factory()


_meta_parameters = threading.local()  # per thread: component loaders run concurrently
_plain_register_parameter = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _plain_register_parameter(module, name, param)
    if param is not None and getattr(_meta_parameters, "active", False):
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)


nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """In this thread only: parameters go to meta as soon as they are registered (their
    initialisation then costs nothing), buffers stay real."""
    _meta_parameters.active = True
    try:
        yield
    finally:
        _meta_parameters.active = False


def fill_meta_buffers(model: nn.Module, factory: Callable[[], nn.Module]) -> nn.Module:
    """Buffers a checkpoint does not hold (rotary frequencies, position ids) are still on
    meta after loading: take them from a second ``factory()`` built on the CPU with its
    parameters on meta (no weight memory), and move them to the model's device."""
    missing = [name for name, buf in model.named_buffers() if buf.is_meta]
    if not missing:
        return model
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    with _parameters_on_meta(), torch.device("cpu"):
        fresh = dict(factory().named_buffers())
    for name in missing:
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = fresh[name].to(device)
    return model
