"""Broken checkpoints through the real loading path, and mixed-precision loading.

Each case damages a copy of the tiny_a checkpoint and loads it with
``VideoGenerator.from_pretrained``. With ``executor="inproc"`` the loader's
``CheckpointError`` propagates as is; with the default multi-process executor it arrives
as ``WorkerStartupError`` carrying the worker's message and traceback.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo import VideoGenerator
from fastvideo.executor.multiproc import WorkerStartupError
from fastvideo.models.loader import CheckpointError

DIT_FILE = "transformer/diffusion_pytorch_model.safetensors"
MISSING_WORDS = re.compile(r"missing|no such|not found|does not exist|no \S+ file", re.I)


@pytest.fixture
def ckpt(tiny_a, tmp_path):
    """A private, writable copy of the tiny_a checkpoint."""
    return shutil.copytree(tiny_a[0], tmp_path / "ckpt")


def _load_error(folder, error=Exception, **kwargs):
    with pytest.raises(error) as info:
        with VideoGenerator.from_pretrained(str(folder), **kwargs):
            pass
    return info.value


def _own_words(err, folder):
    """The error message with the checkpoint path blanked: tmp paths carry the test name."""
    return str(err).replace(str(folder), "<ckpt>")


def _rewrite_dit(folder, edit):
    path = folder / DIT_FILE
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    "component",
    [
        "vae",
        "transformer",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ],
)
def test_missing_component_folder_names_it(ckpt, component):
    shutil.rmtree(ckpt / component)
    err = _load_error(ckpt, executor="inproc")
    message = str(err)
    assert str(ckpt / component) in message, message
    # Says it is missing (in its own words, not through the tmp path's test name).
    assert MISSING_WORDS.search(_own_words(err, ckpt)), message


def test_missing_safetensors_file(ckpt):
    (ckpt / DIT_FILE).unlink()
    err = _load_error(ckpt, CheckpointError, executor="inproc")
    assert str(ckpt / "transformer") in str(err)
    assert "safetensors" in _own_words(err, ckpt)


def test_missing_shard_of_a_sharded_checkpoint(ckpt):
    """A shard named by *.safetensors.index.json that is not there."""
    state = load_file(str(ckpt / DIT_FILE))
    (ckpt / DIT_FILE).unlink()
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(ckpt / "transformer" / name))
        weight_map.update(dict.fromkeys(names, name))
    index = ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with VideoGenerator.from_pretrained(str(ckpt), executor="inproc"):
        pass  # the sharded layout itself loads
    missing = ckpt / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    missing.unlink()
    err = _load_error(ckpt, CheckpointError, executor="inproc")
    assert str(missing) in str(err)


def test_truncated_safetensors(ckpt):
    path = ckpt / DIT_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    err = _load_error(ckpt, CheckpointError, executor="inproc")
    assert str(path) in str(err)
    assert "truncated" in _own_words(err, ckpt)


def _swap_one_key(state):
    removed = "blocks.0.attn1.to_k.weight"
    assert removed in state
    del state[removed]
    state["blocks.0.extra_layer.weight"] = torch.zeros(4)
    return removed


def test_key_mismatch_names_both_keys_and_the_file(ckpt):
    _rewrite_dit(ckpt, _swap_one_key)
    message = str(_load_error(ckpt, CheckpointError, executor="inproc"))
    assert "blocks.0.attn1.to_k.weight" in message
    assert "blocks.0.extra_layer.weight" in message
    assert "diffusion_pytorch_model.safetensors" in message
    assert str(ckpt / "transformer") in message


def test_key_mismatch_in_a_worker_process_carries_its_traceback(ckpt):
    _rewrite_dit(ckpt, _swap_one_key)
    error = _load_error(ckpt, WorkerStartupError)  # default: multi-process executor
    message = str(error)
    assert "CheckpointError" in message
    assert "blocks.0.attn1.to_k.weight" in message
    assert "blocks.0.extra_layer.weight" in message
    assert "diffusion_pytorch_model.safetensors" in message
    # One line for the user; the worker's own traceback rides along (and is logged).
    assert "\n" not in message and "Traceback" not in message
    assert "Traceback (most recent call last)" in error.worker_traceback
    assert "load_checkpoint" in error.worker_traceback


def test_shape_mismatch_names_the_key_and_both_shapes(ckpt):
    def reshape(state):
        state["proj_out.weight"] = torch.zeros(3, 5)

    expected = tuple(load_file(str(ckpt / DIT_FILE))["proj_out.weight"].shape)
    _rewrite_dit(ckpt, reshape)
    message = str(_load_error(ckpt, CheckpointError, executor="inproc"))
    assert "proj_out.weight" in message
    assert "(3, 5)" in message
    assert str(expected) in message
    assert str(ckpt / DIT_FILE) in message


FP32_IN_BF16 = re.compile(
    r"^(scale_shift_table|blocks\.\d+\.scale_shift_table|condition_embedder\.time_embedder\..*"
    r"|blocks\.\d+\.norm2\..*)$"
)


def test_bf16_dit_keeps_modulation_time_embedder_and_norms_fp32(tiny_a):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(
        str(folder), executor="inproc", device="cpu", dit_precision="bf16"
    ) as gen:
        dit = gen.executor._worker.pipeline.components["transformer"]
        dtypes = {name: t.dtype for name, t in dit.state_dict().items()}
        out = gen.generate_video("a fox", height=32, width=32, num_frames=5, num_inference_steps=2)
    fp32 = {n for n in dtypes if FP32_IN_BF16.match(n)}
    assert "scale_shift_table" in fp32 and "blocks.1.norm2.weight" in fp32
    assert "condition_embedder.time_embedder.linear_1.weight" in fp32
    want = {n: torch.float32 if n in fp32 else torch.bfloat16 for n in dtypes}
    wrong = {n: d for n, d in dtypes.items() if d != want[n]}
    assert not wrong, wrong
    assert out.frames.shape == (5, 32, 32, 3)
