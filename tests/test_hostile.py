"""Inputs a hostile (or careless) client sends: each fails at the API boundary with the
right error type, a message naming the field, in well under a second, and the same engine
serves a good request right after. Configs and checkpoints with wrong types or impossible
values fail at load, naming the file and the field, before any worker starts."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

import fastvideo.engine.startup as startup_module
from fastvideo import DEMO_MODEL_ID, QueueFullError, VideoGenerator

GOOD = dict(height=16, width=16, num_frames=1, num_inference_steps=1, output_type="latent")
SMALL = dict(height=16, width=16, num_frames=1, num_inference_steps=1)


@pytest.fixture(scope="module")
def engine():
    """The demo model on one worker process (the real wire), shared by the table."""
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, max_waiting_requests=4) as gen:
        yield gen


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-paths")
    (root / "x.mp4").mkdir()  # a folder named like a video
    (root / "a-file").write_text("not a folder")
    return root


# (case id, prompt, keyword overrides, error type, words the message must contain)
CASES = [
    ("lone-surrogate-prompt", "a\ud800b", {}, ValueError, ["prompt", "UTF-8"]),
    ("lone-surrogate-negative", "a fox", {"negative_prompt": "x\udcff"}, ValueError,
     ["negative_prompt", "UTF-8"]),
    ("prompt-none", None, {}, TypeError, ["prompt"]),
    ("prompt-int", 123, {}, TypeError, ["prompt"]),
    ("prompt-bytes", b"a fox", {}, TypeError, ["prompt"]),
    ("prompt-empty", "", {}, ValueError, ["prompt"]),
    ("prompt-blank", " \t\n", {}, ValueError, ["prompt"]),
    ("prompt-huge", "x" * 20_001, {}, ValueError, ["prompt", "20000"]),
    ("prompt-list-empty", [], {}, ValueError, ["prompt"]),
    ("prompt-list-one-bad", ["a fox", "a\ud800"], {}, ValueError, ["prompt"]),
    ("negative-int", "a fox", {"negative_prompt": 5}, TypeError, ["negative_prompt"]),
    ("steps-10**12", "a fox", {"num_inference_steps": 10**12}, ValueError,
     ["num_inference_steps", "1000"]),
    ("steps-10**7", "a fox", {"num_inference_steps": 10**7}, ValueError,
     ["num_inference_steps"]),
    ("steps-zero", "a fox", {"num_inference_steps": 0}, ValueError, ["num_inference_steps"]),
    ("steps-float", "a fox", {"num_inference_steps": 2.5}, TypeError, ["num_inference_steps"]),
    ("steps-bool", "a fox", {"num_inference_steps": True}, TypeError, ["num_inference_steps"]),
    ("size-16368-squared", "a fox", {"height": 16368, "width": 16368}, ValueError,
     ["height", "max_tokens"]),
    ("frames-huge", "a fox", {"num_frames": 4 * 10**5 + 1}, ValueError, ["num_frames"]),
    ("work-over-budget", "a fox",
     {"height": 1024, "width": 1024, "num_frames": 81, "num_inference_steps": 1000}, ValueError,
     ["num_inference_steps", "max_token_steps"]),
    ("height-not-multiple", "a fox", {"height": 500}, ValueError, ["height", "496 or 512"]),
    ("width-negative", "a fox", {"width": -16}, ValueError, ["width"]),
    ("height-bool", "a fox", {"height": True}, TypeError, ["height"]),
    ("frames-not-4k+1", "a fox", {"num_frames": 80}, ValueError, ["num_frames", "77 or 81"]),
    ("guidance-nan", "a fox", {"guidance_scale": float("nan")}, ValueError, ["guidance_scale"]),
    ("guidance-inf", "a fox", {"guidance_scale": float("inf")}, ValueError, ["guidance_scale"]),
    ("guidance-str", "a fox", {"guidance_scale": "5"}, TypeError, ["guidance_scale"]),
    ("seed-negative", "a fox", {"seed": -1}, ValueError, ["seed"]),
    ("seed-2**64", "a fox", {"seed": 2**64}, ValueError, ["seed"]),
    ("seed-float", "a fox", {"seed": 1.0}, TypeError, ["seed"]),
    ("fps-zero", "a fox", {"fps": 0}, ValueError, ["fps"]),
    ("fps-2**40", "a fox", {"fps": 2**40}, ValueError, ["fps"]),
    ("fps-str", "a fox", {"fps": "16"}, TypeError, ["fps"]),
    ("output-type-gif", "a fox", {"output_type": "gif"}, ValueError, ["output_type"]),
    ("cache-unknown", "a fox", {"cache": "fastcache"}, ValueError, ["cache"]),
    ("cache-thresh-negative", "a fox", {"cache": "teacache", "cache_thresh": -1.0}, ValueError,
     ["cache_thresh"]),
    ("cache-thresh-nan", "a fox", {"cache": "magcache", "cache_thresh": float("nan")}, ValueError,
     ["cache_thresh"]),
    ("teacache-flag-str", "a fox", {"enable_teacache": "yes"}, TypeError, ["enable_teacache"]),
    ("unknown-keyword", "a fox", {"num_steps": 4}, TypeError,
     ["num_steps", "num_inference_steps"]),
    ("sampling-param-str", "a fox", {"sampling_param": "fast"}, TypeError, ["sampling_param"]),
    ("image-for-text-to-video", "a fox", {"image": np.zeros((32, 32, 3), np.uint8)}, ValueError,
     ["image", "text-to-video"]),
    ("image-missing-file", "a fox", {"image": "/no/such/image.png"}, ValueError, ["image"]),
    ("image-float-array", "a fox", {"image": np.zeros((32, 32, 3))}, ValueError, ["image"]),
    ("max-sequence-length", "a fox", {"max_sequence_length": 10**6}, ValueError,
     ["max_sequence_length"]),
    ("output-path-int", "a fox", {"output_path": 42}, TypeError, ["output_path"]),
    ("output-path-avi", "a fox", {"output_path": "clip.avi"}, ValueError, ["output_path", ".avi"]),
    ("output-path-png-not-a-sequence", "a fox", {"output_path": "still.png"}, ValueError,
     ["output_path", "%05d"]),
]  # fmt: skip

PATH_CASES = [
    ("output-path-folder-named-mp4", "x.mp4", "folder"),
    ("output-path-unwritable", "/sys/fastvideo-test/clip.mp4", "not writable"),
    ("output-path-under-a-file", "a-file/clip.mp4", "is a file"),
]


def _refusal(call, limit: float = 5.0) -> BaseException | None:
    """What `call` raised, from a daemon thread: a request that starts work instead of being
    refused fails here within `limit` seconds rather than hanging the suite."""
    box: list = []

    def run():
        try:
            call()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"not refused within {limit:.0f}s: the request started work"
    return box[0]


def _check(engine, call, error, words) -> None:
    start = time.perf_counter()
    raised = _refusal(call)
    elapsed = time.perf_counter() - start
    with pytest.raises(error) as info:
        if raised is not None:
            raise raised
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert elapsed < 1.0, f"took {elapsed:.2f}s to refuse"
    assert engine.generate_video("a fox", **GOOD).latents is not None  # still serving


@pytest.mark.parametrize("case, prompt, kwargs, error, words", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_refused_at_the_boundary(engine, case, prompt, kwargs, error, words):
    _check(engine, lambda: engine.generate_video(prompt, **{**SMALL, **kwargs}), error, words)


@pytest.mark.parametrize("case, path, words", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_bad_output_path_is_refused_before_any_work(engine, paths, case, path, words):
    def call():
        engine.generate_video("a fox", output_path=str(paths / path), **SMALL)

    _check(engine, call, ValueError, ["output_path", words])


def test_request_id_and_priority_are_checked(engine):
    from tests.conftest import submit

    core, param = engine.core, engine.default_sampling_param.update(**GOOD)
    _check(engine, lambda: submit(core, "a fox", param, None, request_id=7), TypeError,
           ["request_id"])  # fmt: skip
    _check(engine, lambda: submit(core, "a fox", param, None, priority="high"), TypeError,
           ["priority"])  # fmt: skip


def test_existing_files_are_never_overwritten(engine, tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"precious")
    out = engine.generate_video("a fox", output_path=str(target), **SMALL)
    assert target.read_bytes() == b"precious"
    assert out.output_path == tmp_path / "clip-1.mp4" and out.output_path.stat().st_size > 0
    # Duplicate prompts (and seeds) saved to one folder get distinct names.
    outs = engine.generate_video(["a cat", "a cat"], seed=5, output_path=str(tmp_path), **SMALL)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a cat-5.mp4", "a cat-6.mp4", "clip-1.mp4", "clip.mp4"], names
    again = engine.generate_video("a cat", seed=5, output_path=str(tmp_path), **SMALL)
    assert again.output_path.name == "a cat-5-1.mp4"
    assert {o.output_path for o in outs} | {again.output_path} <= set(tmp_path.iterdir())


def test_queue_full_is_immediate(engine):
    param = engine.default_sampling_param.update(**{**GOOD, "num_inference_steps": 50})
    prompts = [f"a kite {i}" for i in range(8)]
    start = time.perf_counter()
    queued = []
    with pytest.raises(QueueFullError):
        for p in prompts:  # submit without waiting: the 4-deep queue fills
            request = engine.core.new_request(p, param, _Null())
            engine.core.submit(request)
            queued.append(request.request_id)
    assert time.perf_counter() - start < 1.0
    assert len(queued) >= 4
    for request_id in queued:  # no need to sit through them
        engine.core.abort(request_id)
    engine.generate_video("a fox", **GOOD)


class _Null:
    def progress(self, event):
        pass

    def finish(self, output):
        pass

    def fail(self, error):
        pass


# --- configs and checkpoints ---------------------------------------------------------------
@pytest.fixture
def no_workers(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr(startup_module, "create_executor", refuse)


def _copy(tiny_a, tmp_path):
    return shutil.copytree(tiny_a[0], tmp_path / "ckpt")


def _edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


CONFIG_CASES = [
    ("num-gpus-1000", dict(num_gpus=1000), ValueError, ["num_gpus=1000", "cores"]),
    ("num-gpus-str", dict(num_gpus="2"), TypeError, ["num_gpus"]),
    ("pipeline-config-dict", dict(pipeline_config={"num_gpus": 2}), TypeError,
     ["pipeline_config"]),
    ("worker-timeout-negative", dict(worker_timeout_s=-1), ValueError, ["worker_timeout_s"]),
    ("max-tokens-zero", dict(max_tokens=0), ValueError, ["max_tokens"]),
    ("precision-unknown", dict(dit_precision="fp8x"), ValueError, ["dit_precision"]),
    ("unknown-option", dict(num_gpu=2), TypeError, ["num_gpu", "num_gpus"]),
]  # fmt: skip


@pytest.mark.parametrize("case, kwargs, error, words", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])  # fmt: skip
def test_bad_engine_option_fails_before_workers_start(no_workers, case, kwargs, error, words):
    start = time.perf_counter()
    with pytest.raises(error) as info:
        VideoGenerator.from_pretrained(DEMO_MODEL_ID, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert time.perf_counter() - start < 1.0


def _model_index_list(d):
    return [d]


CHECKPOINT_CASES = [
    ("model-index-list", "model_index.json", _model_index_list, ["model_index.json", "object"]),
    ("config-list", "transformer/config.json", _model_index_list, ["config.json", "object"]),
    ("heads-fraction", "transformer/config.json",
     lambda d: {**d, "num_attention_heads": 6.5}, ["num_attention_heads", "integer"]),
    ("heads-zero", "transformer/config.json",
     lambda d: {**d, "num_attention_heads": 0}, ["num_attention_heads"]),
    ("vae-scale-negative", "vae/config.json",
     lambda d: {**d, "scale_factor_spatial": -8}, ["scale_factor_spatial"]),
    ("patch-size-string", "transformer/config.json",
     lambda d: {**d, "patch_size": "122"}, ["patch_size"]),
]  # fmt: skip


@pytest.mark.parametrize("case, file, edit, words", CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])  # fmt: skip
def test_broken_checkpoint_config_fails_at_load_naming_it(
    tiny_a, tmp_path, no_workers, case, file, edit, words
):
    folder = _copy(tiny_a, tmp_path)
    _edit_json(folder / file, edit)
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        VideoGenerator.from_pretrained(str(folder))
    message = str(info.value)
    for word in words:
        assert word in message
    assert os.path.join(folder, file.split("/")[0]) in message
    assert time.perf_counter() - start < 1.0
