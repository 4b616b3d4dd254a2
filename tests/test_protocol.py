"""The wire codec (``wire/codec.py``) and the messages (``wire/messages.py``).

Every message type must survive encode -> (ZeroMQ) -> decode unchanged, tensors included;
anything that is not a valid message must raise ``MalformedMessage`` (never execute
anything, never crash with another exception type); nothing in the package may pickle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import msgspec
import pytest
import torch
import zmq

from fastvideo.distributed.plan import ParallelPlan
from fastvideo.wire.codec import Decoder, Encoder, MalformedMessage
from fastvideo.wire.messages import (
    AbortItems,
    BatchResult,
    FromWorker,
    GenerateBatch,
    Heartbeat,
    Progress,
    RequestItem,
    Shutdown,
    ToWorker,
    WorkerFailure,
    WorkerReady,
)

PACKAGE = Path(__file__).resolve().parents[1] / "fastvideo"


def _as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def _assert_same(a, b) -> None:
    """Field-by-field equality of two messages; tensors by dtype, shape and exact values."""
    assert type(a) is type(b)
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), name
            assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype)
            assert torch.equal(x.cpu(), y), name
        else:
            assert x == y and type(x) is type(y), (name, x, y)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return (torch.randn(shape, generator=g) * 100).to(dtype)


TO_WORKER = [
    GenerateBatch(
        "batch-1",
        [
            RequestItem("a", "a fox", "blurry", 0, 5.0, 480, 832, 81, 50, "latent", "teacache",
                        0.2),
            RequestItem("b", "ünïcødé 🦊", "", 2**63 - 1, 1.0, 480, 832, 81, 50, "latent"),
        ],
        ParallelPlan(2, 2, 2),
        replica=0,
        seq=3,
        token="t0k",
    ),
    GenerateBatch("batch-2", [RequestItem("c", "p")], ParallelPlan()),  # defaults omitted
    AbortItems("batch-1", ["a"], "t0k"),
    Shutdown(),
]  # fmt: skip

FROM_WORKER = [
    WorkerReady(0, 1234, "cuda:0", 12.5, 3 * 2**30),
    WorkerReady(3, 99, "cpu", 0.0),
    Progress("req-1", "denoising", 3, 50, 1.25),
    Progress("req-1", "decoding", 0, 0, 0.0),
    WorkerFailure(None, 1, "CheckpointError", "truncated", "Traceback (most recent call last):"),
    WorkerFailure("req-1", 0, "ValueError", "bad height"),
    Heartbeat(2, True, 17, "t0k"),
    BatchResult("req-1", "CFG 2 x Ulysses 2", {"total": 1.5, "denoising": 1.0}),
    BatchResult(
        "req-2",
        "ring 3",
        {},
        frames=_tensor(torch.uint8, (1, 5, 16, 24, 3)),
        latents=_tensor(torch.float32, (1, 16, 2, 2, 3)),
        peak_memory_bytes=[1, 2**40, 0],
    ),
]


@pytest.mark.parametrize("msg", TO_WORKER, ids=lambda m: type(m).__name__)
def test_round_trip_to_worker(msg):
    frames = Encoder().encode(msg)
    _assert_same(Decoder(ToWorker).decode(_as_bytes(frames)), msg)


@pytest.mark.parametrize("msg", FROM_WORKER, ids=lambda m: type(m).__name__)
def test_round_trip_from_worker(msg):
    frames = Encoder().encode(msg)
    tensors = sum(isinstance(getattr(msg, f), torch.Tensor) for f in msg.__struct_fields__)
    assert len(frames) == 1 + tensors, "each tensor travels as its own frame"
    _assert_same(Decoder(FromWorker).decode(_as_bytes(frames)), msg)


TENSOR_CASES = [
    (torch.float32, (2, 3, 4)),
    (torch.bfloat16, (1, 16, 2, 3, 5)),
    (torch.uint8, (1, 3, 8, 8, 3)),
    (torch.int64, (7,)),
    (torch.float16, (3, 1)),
    (torch.float64, (2, 2)),
    (torch.bool, (5,)),
    (torch.int32, (2, 5)),
    (torch.float32, (0,)),  # empty tensors of several shapes and dtypes
    (torch.bfloat16, (2, 0, 3)),
    (torch.uint8, (0, 4, 4, 3)),
    (torch.int64, (0,)),
    (torch.float32, ()),  # a 0-d scalar
]


@pytest.mark.parametrize("dtype, shape", TENSOR_CASES, ids=lambda x: str(x))
def test_tensor_round_trip(dtype, shape):
    t = _tensor(dtype, shape, seed=len(shape))
    msg = BatchResult("r", "single rank", {}, frames=t, latents=t.flip(0) if t.ndim else t)
    out = Decoder(FromWorker).decode(_as_bytes(Encoder().encode(msg)))
    _assert_same(out, msg)
    if out.frames.numel():
        out.frames.view(-1)[0] = out.frames.view(-1)[-1]  # the decoded tensor is writable


def test_tensor_round_trip_non_contiguous_and_independent_of_the_buffer():
    base = _tensor(torch.float32, (4, 6))
    strided = base.t()[::2]  # neither contiguous nor starting at offset 0 in memory order
    assert not strided.is_contiguous()
    frames = _as_bytes(Encoder().encode(BatchResult("r", "p", {}, latents=strided)))
    buffer = bytearray(frames[1])
    out = Decoder(FromWorker).decode([frames[0], buffer])
    assert torch.equal(out.latents, strided)
    buffer[:] = b"\xff" * len(buffer)  # the receive buffer is reused by the transport
    assert torch.equal(out.latents, strided), "the decoded tensor aliases the frame"


def test_round_trip_over_zeromq():
    """The real path: zero-copy send, zero-copy receive (``zmq.Frame`` objects)."""
    msg = FROM_WORKER[-1]
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://codec-test")
        push.connect("inproc://codec-test")
        push.send_multipart(Encoder().encode(msg), copy=False)
        assert pull.poll(5000)
        frames = pull.recv_multipart(copy=False)
        _assert_same(Decoder(FromWorker).decode(frames), msg)
        pull.close(linger=0)
        push.close(linger=0)
    finally:
        ctx.term()


def test_encoder_refuses_what_it_cannot_send():
    with pytest.raises(TypeError):
        Encoder().encode(BatchResult("r", "p", {}, latents=torch.zeros(2, dtype=torch.cfloat)))
    with pytest.raises(TypeError):
        Encoder().encode(BatchResult("r", "p", {"t": object()}))  # no pickling fallback


# --- malformed input -------------------------------------------------------------------------
def _result_header(tensor_ref) -> bytes:
    return msgspec.msgpack.encode(["result", "r", "p", {}, tensor_ref])


_VALID = _as_bytes(Encoder().encode(FROM_WORKER[-1]))  # [header, frames bytes, latents bytes]

MALFORMED = {
    "no-frames": [],
    "garbage": [b"\x00garbage"],
    "random-bytes": [bytes(range(256)) * 3],
    "empty-header": [b""],
    "truncated-header": [_VALID[0][:-5], *_VALID[1:]],
    "trailing-bytes": [_VALID[0] + b"\x00", *_VALID[1:]],
    "wrong-tag": [msgspec.msgpack.encode(["no-such-tag", "r"])],
    "request-sent-to-driver": _as_bytes(Encoder().encode(TO_WORKER[0])),
    "not-an-array": [msgspec.msgpack.encode({"tag": "result"})],
    "missing-required-field": [msgspec.msgpack.encode(["result", "r"])],
    "wrong-field-type": [msgspec.msgpack.encode(["progress", "r", "denoising", "3", 50, 1.0])],
    "truncated-frame-list": _VALID[:2],  # the latents frame is missing
    "header-only": _VALID[:1],
    "reference-to-missing-frame": [_result_header(["float32", [2], 5]), b"\x00" * 8],
    "reference-to-header-frame": [_result_header(["uint8", [len(_VALID[0])], 0])],
    "negative-frame-index": [_result_header(["float32", [2], -1]), b"\x00" * 8],
    "frame-too-short": [_result_header(["float32", [2, 3], 1]), b"\x00" * 23],
    "frame-too-long": [_result_header(["float32", [2, 3], 1]), b"\x00" * 25],
    "bytes-for-empty-tensor": [_result_header(["float32", [0, 3], 1]), b"\x00" * 4],
    "unknown-dtype": [_result_header(["complex64", [2], 1]), b"\x00" * 16],
    "dtype-with-torch-prefix": [_result_header(["torch.float32", [2], 1]), b"\x00" * 8],
    "dtype-not-a-string": [_result_header([["float32"], [2], 1]), b"\x00" * 8],
    "negative-dim": [_result_header(["uint8", [-2], 1]), b""],
    "float-dim": [_result_header(["uint8", [2.0], 1]), b"\x00" * 2],
    "shape-not-a-list": [_result_header(["uint8", {"n": 2}, 1]), b"\x00" * 2],
    "huge-dim": [_result_header(["uint8", [2**64 - 1, 0], 1]), b""],
    "huge-dim-of-empty-tensor": [_result_header(["uint8", [0, 2**62, 4], 1]), b""],
    "too-many-dims": [_result_header(["uint8", [1] * 9, 1]), b"\x00"],
    "reference-too-short": [_result_header(["float32", [2]]), b"\x00" * 8],
    "reference-not-a-list": [_result_header("float32"), b"\x00" * 8],
    "float-frame-index": [_result_header(["float32", [2], 1.0]), b"\x00" * 8],
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_input_raises_malformed_message(kind):
    with pytest.raises(MalformedMessage):
        Decoder(FromWorker).decode(MALFORMED[kind])


@pytest.mark.parametrize(
    "frames",
    [[b"\x00garbage"], [msgspec.msgpack.encode(["result", "r", "p", {}])], []],
    ids=["garbage", "result-sent-to-worker", "no-frames"],
)
def test_worker_side_decoder_rejects_malformed_input(frames):
    with pytest.raises(MalformedMessage):
        Decoder(ToWorker).decode(frames)


def test_decoder_recovers_after_malformed_input():
    decoder = Decoder(FromWorker)
    for frames in MALFORMED.values():
        with pytest.raises(MalformedMessage):
            decoder.decode(frames)
    _assert_same(decoder.decode(_VALID), FROM_WORKER[-1])


# --- nothing pickles -------------------------------------------------------------------------
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal"}
FORBIDDEN_CALLS = {"recv_pyobj", "send_pyobj"}


def test_no_module_uses_pickle():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"did not find the package sources under {PACKAGE}"
    offenders = []
    for path in files:
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_MODULES:
                    offenders.append(f"{path}:{node.lineno}: imports {name}")
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
                offenders.append(f"{path}:{node.lineno}: uses {node.attr}")
            if isinstance(node, ast.Constant) and node.value in FORBIDDEN_MODULES:
                offenders.append(f"{path}:{node.lineno}: names module {node.value!r}")
        # and a plain grep, for anything the AST walk could miss
        for lineno, line in enumerate(source.splitlines(), 1):
            if re.search(r"_pyobj\b|\bimport\s+(c?pickle|dill|cloudpickle)\b", line):
                offenders.append(f"{path}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
