"""Concurrent, single-copy weight loading: the same bytes as the old sequential path,
the same errors, and a start-up breakdown reported by every worker.

The oracle is the old loader's own recipe, written out here: safetensors' ``get_tensor``
for every key, then ``.to(dtype)`` once (the dtype each parameter has after loading).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastvideo import VideoGenerator
from fastvideo.models.loader import CheckpointError, WeightSource, reading_from
from fastvideo.models.weight_reader import TensorRecord, WeightReader, plan_ranges, read_header
from fastvideo.wire.codec import Decoder, Encoder
from fastvideo.wire.messages import FromWorker, WorkerReady

COMPONENTS = {  # component -> its weights file in the diffusers layout
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
BF16 = {"dit_precision": "bf16", "text_encoder_precision": "bf16"}


def _old_path(path: Path, loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the sequential loader produced: each file tensor, cast once to its dtype."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k).to(v.dtype) for k, v in loaded.items() if k in f.keys()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert set(a) == set(b), set(a) ^ set(b)
    return sorted(
        k for k in a if a[k].shape != b[k].shape or not torch.equal(_bits(a[k]), _bits(b[k]))
    )


def _component_states(gen: VideoGenerator) -> dict[str, dict[str, torch.Tensor]]:
    parts = gen.executor._worker.pipeline.components
    return {
        "transformer": parts["transformer"].state_dict(),
        "vae": parts["vae"].state_dict(),
        "text_encoder": parts["text_encoder"].encoder.state_dict(),
    }


@pytest.fixture
def ckpt(tiny_a, tmp_path):
    return Path(shutil.copytree(tiny_a[0], tmp_path / "ckpt"))


def test_concurrent_load_is_bitwise_the_old_path(tiny_a):
    """DiT, VAE and text encoder through the worker's real path (prefetch in the
    background, loaders in parallel), in bf16 so that casts and kept-fp32 tensors occur."""
    folder = tiny_a[0]
    with VideoGenerator.from_pretrained(str(folder), executor="inproc", **BF16) as gen:
        states = _component_states(gen)
        breakdown = gen.executor._worker.breakdown
    for name, state in states.items():
        oracle = _old_path(folder / COMPONENTS[name], state)
        assert not _differing({k: state[k] for k in oracle}, oracle), name
    # The encoder's embedding is tied to the shared one (whether its file repeats it or not).
    encoder = states["text_encoder"]
    left_out = set(encoder) - set(_old_path(folder / COMPONENTS["text_encoder"], encoder))
    assert left_out <= {"encoder.embed_tokens.weight"}
    assert encoder["encoder.embed_tokens.weight"].data_ptr() == encoder["shared.weight"].data_ptr()
    dtypes = {t.dtype for t in states["transformer"].values()}
    assert dtypes == {torch.bfloat16, torch.float32}  # cast and kept: both paths ran
    on_cpu = next(iter(states["vae"].values())).device.type == "cpu"
    file_gb = sum((folder / f).stat().st_size for f in COMPONENTS.values()) / 1e9
    # CPU: zero-copy views of the files; GPU: every tensor byte once, nothing twice.
    assert breakdown["weights_gb"] == 0.0 if on_cpu else 0 < breakdown["weights_gb"] < file_gb


@pytest.mark.parametrize("chunk", [96, 4096, 1 << 20])
def test_ranged_reads_split_anywhere_give_the_same_bytes(ckpt, chunk):
    """The ranged reader (the CUDA path's planning, here into CPU tensors) with ranges
    that cut through tensors, against the file; a changed byte in the file shows up."""
    path = ckpt / COMPONENTS["transformer"]
    # Copies: load_file's tensors map the file, and would see the byte flipped below.
    reference = {k: v.clone() for k, v in load_file(str(path)).items()}
    reader = WeightReader(torch.device("cpu"), threads=3, chunk_bytes=chunk, cpu_mode="read")
    try:
        got = reader.submit({path: None}).result()
        assert not _differing(got, reference)
        assert reader.bytes_read == sum(t.nbytes for t in reference.values())
        # Power: one flipped byte in the middle of a tensor reaches exactly that tensor.
        record = read_header(path)["blocks.1.ffn.net.0.proj.weight"]
        with open(path, "r+b") as f:
            f.seek(record.start + record.nbytes // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        changed = reader.submit({path: None}).result()
    finally:
        reader.close()
    assert _differing(changed, reference) == ["blocks.1.ffn.net.0.proj.weight"]


def test_loader_inside_a_source_reads_ranged_and_prefetched_alike(ckpt):
    """A component loaded with reads taken from a prefetching source equals one loaded
    with plain reads, which equals the old path."""
    from fastvideo.distributed.runtime import ParallelRuntime
    from fastvideo.models.wan import components
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.pipelines.base import PipelineRuntime

    cpu = torch.device("cpu")
    dtypes = {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16}
    env = PipelineRuntime(ParallelRuntime(0, 1, cpu), cpu, read_wan_spec(ckpt), dtypes)
    folder = ckpt / "transformer"
    plain = components.load_transformer(folder, env).state_dict()
    source = WeightSource(WeightReader(cpu, threads=2, chunk_bytes=512, cpu_mode="read"))
    source.prefetch([folder])
    with reading_from(source):
        prefetched = components.load_transformer(folder, env).state_dict()
    source.close()
    assert source.reader.bytes_read > 0  # the module's tensors came through the reader
    assert not _differing(prefetched, plain)
    assert not _differing(plain, _old_path(ckpt / COMPONENTS["transformer"], plain))


def test_plan_ranges_covers_every_byte_once():
    rng = random.Random(0)
    for trial in range(200):
        records, pos = [], 64
        for i in range(rng.randint(1, 12)):
            pos += rng.choice([0, 0, 8])  # sometimes a gap between tensors
            n = rng.choice([0, 2, 4, rng.randint(1, 300) * 4])
            records.append(TensorRecord(f"t{i}", torch.float32, (n // 4,), pos, n))
            pos += n
        chunk = rng.randint(1, 200)
        ranges = plan_ranges(Path("x"), rng.sample(records, len(records)), chunk)
        covered = {r.key: bytearray(r.nbytes) for r in records}
        for r in ranges:
            assert 0 < r.length <= chunk
            offset = 0
            for key, at, in_range, n in r.parts:
                assert in_range == offset  # parts tile the range in file order
                record = next(x for x in records if x.key == key)
                assert record.start + at == r.start + in_range  # the right bytes
                covered[key][at : at + n] = b"\x01" * n
                offset += n
            assert offset == r.length
        assert all(all(c) for c in covered.values()), trial


def test_missing_and_truncated_files_fail_the_read_naming_the_file(ckpt, tmp_path):
    path = ckpt / COMPONENTS["vae"]
    reader = WeightReader(torch.device("cpu"), threads=2, cpu_mode="read")
    try:
        gone = tmp_path / "gone.safetensors"
        with pytest.raises(CheckpointError, match="missing") as missing:
            reader.submit({gone: None}).result()
        assert str(gone) in str(missing.value)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 10)
        with pytest.raises(CheckpointError, match="truncated") as truncated:
            reader.submit({path: None}).result()
        assert str(path) in str(truncated.value)
    finally:
        reader.close()


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_truncated_file_raises_through_the_prefetching_worker(ckpt, component):
    """The worker reads ahead of the loaders; a damaged file still fails as a
    CheckpointError naming it (in the loader's words), whichever component it is."""
    path = ckpt / COMPONENTS[component]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)
    with pytest.raises(CheckpointError, match="truncated") as err:
        with VideoGenerator.from_pretrained(str(ckpt), executor="inproc"):
            pass
    assert str(path) in str(err.value)


def test_sharded_checkpoint_loads_bitwise_through_the_prefetch(ckpt):
    """An index over two shards: the prefetch reads both files concurrently."""
    import json

    path = ckpt / COMPONENTS["transformer"]
    state = load_file(str(path))
    path.unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(ckpt / "transformer" / name))
        weight_map.update(dict.fromkeys(part, name))
    index = ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with VideoGenerator.from_pretrained(str(ckpt), executor="inproc", **BF16) as gen:
        loaded = _component_states(gen)["transformer"]
    oracle = {k: state[k].to(loaded[k].dtype) for k in loaded}
    assert not _differing(loaded, oracle)


def test_worker_ready_carries_the_breakdown_on_the_wire():
    parts = {"until_args": 1.5, "weights_read": 0.25, "total": 3.0}
    msg = WorkerReady(0, 42, "cuda:0", 3.0, 1 << 30, "tok", load_breakdown=parts)
    decoded = Decoder(FromWorker).decode(Encoder().encode(msg))
    assert decoded.load_breakdown == parts
    assert (
        Decoder(FromWorker).decode(Encoder().encode(WorkerReady(1, 7, "cpu", 0.0))).load_breakdown
        == {}
    )


@pytest.mark.slow
def test_worker_reports_its_start_up_breakdown_in_one_log_line(tiny_a, caplog):
    with caplog.at_level(logging.INFO, logger="fastvideo"):
        with VideoGenerator.from_pretrained(str(tiny_a[0]), device="cpu") as gen:
            breakdown = gen.executor.load_breakdown
    for part in ("until_args", "import_worker", "weights_read", "load_transformer"):
        assert breakdown[part] >= 0.0, part
    assert breakdown["total"] >= breakdown["until_args"] + breakdown["import_worker"]
    lines = [r.getMessage() for r in caplog.records if "start-up, seconds" in r.getMessage()]
    assert len(lines) == 1 and "load_text_encoder" in lines[0] and "total" in lines[0], lines


@pytest.mark.slow
def test_workers_start_before_the_model_is_resolved_and_go_when_it_fails(monkeypatch, tmp_path):
    """The driver spawns its workers first (they import while it resolves); a model that
    does not resolve leaves no worker behind."""
    from fastvideo.engine import startup
    from fastvideo.models.hub import ModelNotFoundError

    seen = []

    def resolve(model: str):
        seen.append(len(psutil.Process().children()))
        raise ModelNotFoundError(f"no model {model}")

    before = {p.pid for p in psutil.Process().children()}
    monkeypatch.setattr(startup, "resolve_model", resolve)
    with pytest.raises(ModelNotFoundError):
        VideoGenerator.from_pretrained(str(tmp_path / "nowhere"), num_gpus=2, device="cpu")
    assert seen and seen[0] >= len(before) + 2  # both workers existed while resolving
    left = [p for p in psutil.Process().children() if p.pid not in before and p.is_running()]
    assert not [p for p in left if p.status() != psutil.STATUS_ZOMBIE], left


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_cuda_reads_are_bitwise_safetensors_cuda(tiny_a, chunk):
    """Pinned staging + async copies on CUDA give safetensors' own bytes."""
    device = torch.device("cuda", 0)
    for rel in COMPONENTS.values():
        path = tiny_a[0] / rel
        reader = WeightReader(device, threads=4, chunk_bytes=chunk)
        got = reader.submit({path: None}).result()
        reader.close()
        with safe_open(str(path), framework="pt", device="cuda:0") as f:
            ref = {k: f.get_tensor(k) for k in f.keys()}
        assert not _differing(got, ref), rel
