"""The one codec for every hop: msgpack (msgspec) for the message, raw frames for tensors.

A tensor field is encoded as ``[dtype, shape, frame_index]`` and its bytes are sent as
their own ZeroMQ frame (zero-copy on send). Decoding never executes anything: a message
that does not parse into the declared types raises ``MalformedMessage``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from fastvideo.wire.errors import MalformedMessage

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8,
              torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
}  # fmt: skip
# Bounds on a received tensor's shape: anything beyond is malformed, whatever its bytes.
_MAX_DIMS = 8
_MAX_DIM = 2**40


class Encoder:
    """Encodes a Struct into ``[header, *tensor_frames]``. Thread-safe."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._lock = threading.Lock()
        self._frames: list[Any] = []

    def encode(self, msg: msgspec.Struct) -> list[Any]:
        with self._lock:
            self._frames = []
            try:
                header = self._encoder.encode(msg)
                return [header, *self._frames]
            finally:
                self._frames = []

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise TypeError(f"cannot send tensors of dtype {t.dtype}")
            self._frames.append(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
            return [dtype, list(t.shape), len(self._frames)]
        raise TypeError(f"cannot encode {type(obj).__name__}")


class Decoder:
    """Decodes ``[header, *tensor_frames]`` into one of ``types``. Thread-safe."""

    def __init__(self, types: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(types, dec_hook=self._dec_hook)
        self._lock = threading.Lock()
        self._frames: Sequence[Any] = ()

    def decode(self, frames: Sequence[Any]) -> Any:
        if not frames:
            raise MalformedMessage("empty message")
        with self._lock:
            self._frames = frames
            try:
                return self._decoder.decode(_as_buffer(frames[0]))
            except Exception as e:  # noqa: BLE001 - whatever the bytes do, they are malformed
                raise MalformedMessage(f"{type(e).__name__}: {e}") from None
            finally:
                self._frames = ()

    def _dec_hook(self, typ: type, obj: Any) -> Any:
        if typ is not torch.Tensor:
            raise TypeError(f"unsupported type {typ}")
        if not (isinstance(obj, list) and len(obj) == 3):
            raise ValueError("tensor reference must be [dtype, shape, frame]")
        dtype_name, shape, index = obj
        if dtype_name not in _DTYPES or not isinstance(index, int):
            raise ValueError(f"bad tensor reference {obj!r}")
        if not 1 <= index < len(self._frames):
            raise ValueError(f"tensor frame {index} missing")
        dtype = _DTYPES[dtype_name]
        buf = _as_buffer(self._frames[index])
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
            raise ValueError(f"bad tensor shape {shape!r}")
        numel = 1
        for s in shape:
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= _MAX_DIM:
                raise ValueError(f"bad tensor shape {shape!r}")
            numel *= s
        if len(buf) != numel * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"tensor frame {index} has {len(buf)} bytes for shape {shape}")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        # One copy into writable memory: the receive buffer belongs to ZeroMQ.
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape)


def _as_buffer(frame: Any) -> memoryview:
    """A ZeroMQ Frame, bytes or memoryview as a flat byte view."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).cast("B")
