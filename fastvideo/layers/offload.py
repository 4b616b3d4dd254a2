"""CPU offload of model weights, generic over ``nn.Module``.

Three placements, each keeping weights in host memory (pinned on a CUDA machine, so copies
to the GPU are asynchronous) between uses:

* :class:`LayerwiseOffload` (a DiT): the blocks' weights live on the host; a forward
  pre-hook makes block i resident and starts copying block i + 1 on a side stream, so the
  copy overlaps block i's compute; a forward hook drops block i's device copy. Everything
  outside the blocks (embeddings, norms, head) stays on the device. On a CPU device the
  "copy" is a host-to-host clone through the same code, which is what the CPU tests run.
* :class:`OnDemand` (a text encoder, a VAE): the whole component moves to the device for
  each call of one of its methods (or for a :func:`resident` block) and back afterwards.
* :func:`park` / :func:`unpark`: move one module's weights to the host and back, e.g. the
  inactive expert of a two-expert DiT. ``park`` writes device weights back to the host only
  when they were changed in place since ``unpark`` (a LoRA merge), else it just drops them.

:func:`plan_offload` is the automatic mode's rule: what to offload from the free memory and
the components' sizes. Weights are only read in inference, so a host copy stays valid.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from fastvideo.distributed.runtime import indexed
from fastvideo.layers.flat_params import FlatParams, move_buffers
from fastvideo.logger import init_logger

logger = init_logger(__name__)

HOST = torch.device("cpu")


def pin_host_memory(device: torch.device) -> bool:
    """Pinned host buffers make host<->GPU copies asynchronous; they need CUDA."""
    return device.type == "cuda" and torch.cuda.is_available()


_CAPS: dict[int, int] = {}  # CUDA device index -> the bytes this process may allocate there


def cap_device_memory(device: torch.device, limit_gb: float | None) -> None:
    """At most ``limit_gb`` GiB on ``device`` for this process (``device_memory_gb``): the
    caching allocator refuses beyond it, and :func:`free_memory_bytes` and
    :func:`total_memory_bytes` plan within it. None: no cap. A CPU device is not capped
    (its memory is the host's)."""
    if limit_gb is None or device.type != "cuda":
        return
    total = int(torch.cuda.get_device_properties(device).total_memory)
    limit = int(limit_gb * GiB)
    if limit > total:
        raise ValueError(f"device_memory_gb={limit_gb} is more than {device}'s "
                         f"{total / GiB:.1f} GiB")  # fmt: skip
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    _CAPS[indexed(device).index] = limit
    logger.info("%s: this process may use %.1f of its %.1f GiB", device, limit / GiB, total / GiB)


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can still get: free GPU memory plus what the
    caching allocator holds unused (within the process's cap, if any), or the host's
    available RAM for a CPU device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        available = free + torch.cuda.memory_reserved(device) - allocated
        cap = _CAPS.get(indexed(device).index)
        if cap is not None:
            available = min(available, cap - allocated)
        return max(0, int(available))
    return int(psutil.virtual_memory().available)


def total_memory_bytes(device: torch.device) -> int:
    """The device's memory (its cap, if this process has one), or the host's RAM."""
    if device.type == "cuda":
        total = int(torch.cuda.get_device_properties(device).total_memory)
        return min(total, _CAPS.get(indexed(device).index, total))
    return int(psutil.virtual_memory().total)


# --- layerwise offload ---------------------------------------------------------------------
def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's repeated blocks in the order they run: ``model.memory_blocks`` when the
    model names them, else every top-level ``nn.ModuleList`` of two or more modules in
    registration order (Wan: ``blocks``; HunyuanVideo: double-stream, then single-stream)."""
    named = getattr(model, "memory_blocks", None)
    if named is not None:
        return list(named)
    return [m for m in model.children() if isinstance(m, nn.ModuleList) and len(m) > 1]


def _non_block_params(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Parameter]:
    inside = {id(p) for b in blocks for p in b.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


class LayerwiseOffload:
    """Keeps ``blocks``' weights in host memory and streams them to ``device`` one block
    ahead of the compute. Built on a model whose weights are anywhere (host or device)."""

    def __init__(self, model: nn.Module, device: torch.device, blocks: list[nn.Module]) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        pin = pin_host_memory(device)
        for p in _non_block_params(model, blocks):
            p.data = p.data.to(device)
        move_buffers(model, device)
        # Packing frees each block's original tensors (a device copy, or the loaded host one).
        self.homes = [FlatParams(b, HOST, pin=pin) for b in blocks]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.resident: dict[int, tuple[dict[torch.dtype, torch.Tensor], Any]] = {}
        self.copies = 0  # blocks copied to the device (counted for tests and logs)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    @classmethod
    def apply(cls, model: nn.Module, device: torch.device) -> nn.Module:
        """Offload ``model``'s blocks (:func:`block_lists`); returns the model."""
        blocks = [b for blocks in block_lists(model) for b in blocks]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no block list to offload layerwise")
        model._fastvideo_offload = cls(model, device, blocks)  # type: ignore[assignment]
        return model

    def _fetch(self, i: int) -> None:
        home = self.homes[i]
        self.copies += 1
        if self.stream is None:  # CPU device: the same bookkeeping, a host clone
            self.resident[i] = ({dt: b.clone() for dt, b in home.buffers.items()}, None)
            return
        with torch.cuda.stream(self.stream):
            flats = home.empty_like(self.device)
            for dt, buf in home.buffers.items():
                flats[dt].copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.resident[i] = (flats, event)

    def _before(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if i not in self.resident:
                self._fetch(i)
            flats, event = self.resident[i]
            if event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                for t in flats.values():  # freed only after the compute stream used it
                    t.record_stream(compute)
            self.homes[i].bind(flats)
            following = (i + 1) % len(self.homes)
            for stale in [k for k in self.resident if k not in (i, following)]:
                del self.resident[stale]  # a prefetch the run did not use (order changed)
            if following not in self.resident:
                self._fetch(following)

        return hook

    def _after(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.homes[i].bind(self.homes[i].buffers)
            self.resident.pop(i, None)

        return hook


# --- park / unpark -------------------------------------------------------------------------
@dataclass
class _Parking:
    home: FlatParams
    on_device: dict[torch.dtype, torch.Tensor] | None = None
    versions: list[int] | None = None


def park(module: nn.Module) -> nn.Module:
    """Move ``module``'s weights to (pinned) host memory, freeing their device memory.
    The first call copies them; later calls only drop the device copy (and write it back
    first if a parameter was changed in place since :func:`unpark`)."""
    state: _Parking | None = getattr(module, "_fastvideo_parking", None)
    if state is None:
        device = next((p.device for p in module.parameters()), HOST)
        home = FlatParams(module, HOST, pin=pin_host_memory(device))
        module._fastvideo_parking = _Parking(home)  # type: ignore[assignment]
    elif state.on_device is not None:
        params = state.home.params
        assert state.versions is not None
        if [p._version for p in params] != state.versions:
            for dt, flat in state.on_device.items():
                state.home.buffers[dt].copy_(flat)
        state.home.bind(state.home.buffers)
        state.on_device = state.versions = None
    move_buffers(module, HOST)
    return module


def unpark(module: nn.Module, device: torch.device, non_blocking: bool = False) -> nn.Module:
    """Copy a parked module's weights to ``device`` (no-op when it is not parked)."""
    state: _Parking | None = getattr(module, "_fastvideo_parking", None)
    if state is None or state.on_device is not None:
        return module
    flats = state.home.empty_like(device)
    for dt, buf in state.home.buffers.items():
        flats[dt].copy_(buf, non_blocking=non_blocking)
    state.home.bind(flats)
    state.on_device = flats
    state.versions = [p._version for p in state.home.params]
    move_buffers(module, device)
    return module


def is_parked(module: nn.Module) -> bool:
    state: _Parking | None = getattr(module, "_fastvideo_parking", None)
    return state is not None and state.on_device is None


# --- whole-component offload ---------------------------------------------------------------
def modules_of(component: Any) -> list[nn.Module]:
    """The component itself when it is a module, else the modules among its attributes
    (e.g. a prompt encoder holding a tokenizer and an encoder)."""
    if isinstance(component, nn.Module):
        return [component]
    return [v for v in vars(component).values() if isinstance(v, nn.Module)]


class OnDemand:
    """A component parked in host memory, moved to ``device`` for every method call.

    Attributes are forwarded; bound methods (and calling the component) run with the
    weights resident. :meth:`resident` keeps them there across several calls.
    """

    def __init__(self, component: Any, device: torch.device) -> None:
        modules = modules_of(component)
        if not modules:
            raise ValueError(f"{type(component).__name__} holds no nn.Module to offload")
        object.__setattr__(self, "_component", component)
        object.__setattr__(self, "_modules", modules)
        object.__setattr__(self, "_device", device)
        object.__setattr__(self, "_depth", 0)
        object.__setattr__(self, "moves", 0)  # times the weights went to the device
        for module in modules:
            park(module)

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        if self._depth == 0:
            object.__setattr__(self, "moves", self.moves + 1)
            for module in self._modules:
                unpark(module, self._device)
        object.__setattr__(self, "_depth", self._depth + 1)
        try:
            yield
        finally:
            object.__setattr__(self, "_depth", self._depth - 1)
            if self._depth == 0:
                for module in self._modules:
                    park(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.resident():
            return self._component(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._component, name)
        if not inspect.ismethod(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.resident():
                return attr(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._component, name, value)


def unwrapped(component: Any) -> Any:
    """The component behind an :class:`OnDemand` (for calls that need no weights)."""
    return component._component if isinstance(component, OnDemand) else component


def resident(component: Any) -> contextlib.AbstractContextManager[None]:
    """Keep an :class:`OnDemand` component on its device for a block (no-op otherwise)."""
    return component.resident() if isinstance(component, OnDemand) else contextlib.nullcontext()


# --- automatic mode ------------------------------------------------------------------------
@dataclass(frozen=True)
class OffloadPlan:
    """Which components are kept in host memory, and why (one log line)."""

    whole: tuple[str, ...]  # on the device only while used
    layerwise: tuple[str, ...]  # DiTs streamed block by block
    summary: str


GiB = 1 << 30


def plan_offload(
    requested: dict[str, bool | str],
    sizes: dict[str, int],
    free: int,
    headroom: int,
    layerwise: set[str],
    resident_fraction: float = 0.1,
) -> OffloadPlan:
    """Decide each component's placement.

    Args:
        requested: component -> True (offload), False (keep resident) or "auto".
        sizes: component -> bytes of its weights at their load dtype (this rank's share).
        free: bytes free on the device now; headroom: bytes kept free for activations.
        layerwise: the components offloaded block by block (the DiTs), the rest whole.
        resident_fraction: the share of a layerwise-offloaded DiT still on the device.

    "auto" components are offloaded, cheapest first (text and image encoders run once a
    request, then the VAE, then the DiTs, which run every step), until the resident weights
    plus the headroom fit in ``free``.
    """

    def on_device(name: str, offloaded: bool) -> int:
        if not offloaded:
            return sizes.get(name, 0)
        return int(sizes.get(name, 0) * resident_fraction) if name in layerwise else 0

    chosen = {n: requested.get(n) is True for n in sizes}
    # Encoders first, then the VAE, then the DiTs (sorted() is stable within each group).
    autos = sorted(
        (n for n in sizes if requested.get(n) == "auto"), key=lambda n: (n in layerwise, n == "vae")
    )
    picked = []
    for name in autos:
        if sum(on_device(n, chosen[n]) for n in sizes) + headroom <= free:
            break
        chosen[name] = True
        picked.append(name)
    resident = sum(on_device(n, chosen[n]) for n in sizes)
    offloaded = [n for n in sizes if chosen[n]]
    summary = (
        f"weights {sum(sizes.values()) / GiB:.2f} GiB ("
        + ", ".join(f"{n} {sizes[n] / GiB:.2f}" for n in sizes)
        + f"), free {free / GiB:.2f} GiB, headroom {headroom / GiB:.2f} GiB: "
        + (
            "offloading "
            + ", ".join(
                f"{n} ({'auto' if n in picked else 'asked'})" for n in offloaded
            )  # fmt: skip
            if offloaded
            else "all resident"
        )
        + f"; {resident / GiB:.2f} GiB on the device"
    )
    return OffloadPlan(
        whole=tuple(n for n in offloaded if n not in layerwise),
        layerwise=tuple(n for n in offloaded if n in layerwise),
        summary=summary,
    )
