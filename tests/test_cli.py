"""The ``fastvideo`` command line, run as a user would run it (a subprocess)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import fastvideo.engine.startup as startup_module
from fastvideo import DEMO_MODEL_ID, VideoGenerator
from fastvideo.entrypoints.cli import main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    """Run ``python -m fastvideo.entrypoints.cli ARGS`` with this session's private cache."""
    assert os.environ.get("FASTVIDEO_CACHE_DIR"), "conftest's private cache is not set"
    return subprocess.run(
        [sys.executable, "-m", "fastvideo.entrypoints.cli", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_writes_a_readable_mp4(tmp_path, _private_cache):
    target = tmp_path / "cat.mp4"
    proc = _cli(
        "generate", "--model", DEMO_MODEL_ID, "--prompt", "a cat", "--steps", "2",
        "--output", str(target),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout
    with av.open(str(target)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    # The demo model's defaults: 5 frames of 64x64.
    assert np.stack(frames).shape == (5, 64, 64, 3)


def test_demo_model_writes_a_loadable_diffusers_folder(tmp_path):
    folder = tmp_path / "demo"
    proc = _cli("demo-model", str(folder))
    assert proc.returncode == 0, proc.stderr
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / name).is_dir(), name
    assert (folder / "model_index.json").is_file()
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        out = gen.generate_video("a cat", num_inference_steps=2)
    assert out.frames.shape == (5, 64, 64, 3)
    assert out.frames.std() > 0


def test_bad_flag_value_exits_2_naming_the_field(tmp_path, _private_cache):
    proc = _cli(
        "generate", "--model", DEMO_MODEL_ID, "--prompt", "a cat", "--height", "500",
        "--output", str(tmp_path / "never.mp4"),
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "height" in proc.stderr
    assert "496 or 512" in proc.stderr
    assert not (tmp_path / "never.mp4").exists()


def test_bad_flag_value_fails_before_loading_the_model(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("workers were started before the flags were validated")

    monkeypatch.setattr(startup_module, "create_executor", refuse)
    code = main(["generate", "--model", DEMO_MODEL_ID, "--prompt", "a cat", "--height", "500"])
    assert code == 2
    assert "height" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["fastvideo"].partition(":")
    assert getattr(importlib.import_module(module), func) is main


def _api_skips(cache: str, thresh: float) -> int:
    with VideoGenerator.from_pretrained(
        DEMO_MODEL_ID, executor="inproc", attention_backend="sdpa_math"
    ) as gen:
        ref = gen.generate_video("a fox", num_inference_steps=8, cache=cache,
                                 cache_thresh=thresh, output_type="latent")  # fmt: skip
    return int(ref.stats[f"{cache}_skipped_cond"])


def test_generate_with_speed_flags_reports_cache_skips(tmp_path, _private_cache):
    """--teacache-thresh implies --teacache; --attention-backend reaches the engine; the
    summary line gives the skip count the Python API gives for the same request."""
    target = tmp_path / "fox.mp4"
    proc = _cli(
        "generate", "--model", DEMO_MODEL_ID, "--prompt", "a fox", "--steps", "8",
        "--teacache-thresh", "5.0", "--attention-backend", "sdpa_math",
        "--output", str(target),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert target.is_file()
    skipped = _api_skips("teacache", 5.0)
    assert skipped > 0
    assert f"teacache skipped {skipped} of 8 steps" in proc.stdout, proc.stdout


def test_cache_flags_choose_magcache(tmp_path, capsys, _private_cache):
    skipped = _api_skips("magcache", 0.03)
    assert 0 < skipped < 5, "a threshold that skips some but not all possible steps"
    code = main([
        "generate", "--model", DEMO_MODEL_ID, "--prompt", "a fox", "--num-inference-steps", "8",
        "--cache", "magcache", "--cache-thresh", "0.03", "--attention-backend", "sdpa_math",
        "--executor", "inproc", "--output", str(tmp_path / "m.mp4"),
    ])  # fmt: skip
    assert code == 0
    assert f"magcache skipped {skipped} of 8 steps" in capsys.readouterr().out


def test_unrunnable_attention_backend_is_a_clean_cli_error(tmp_path, _private_cache):
    proc = _cli(
        "generate", "--model", DEMO_MODEL_ID, "--prompt", "a fox", "--steps", "1",
        "--attention-backend", "nope", "--output", str(tmp_path / "x.mp4"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "attention_backend must be one of" in proc.stderr


def test_runtime_failure_exits_1_with_one_line(tiny_a, tmp_path, _private_cache):
    """A checkpoint that breaks in the worker: exit 1, one line, no traceback."""
    import shutil

    broken = shutil.copytree(tiny_a[0], tmp_path / "broken")
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    proc = _cli("generate", "--model", str(broken), "--prompt", "a cat", "--steps", "1",
                "--output", str(tmp_path / "x.mp4"))  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastvideo: error")]
    assert len(errors) == 1 and "WorkerStartupError" in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in proc.stderr.split("fastvideo: error")[-1]


def test_ctrl_c_exits_130(tmp_path, _private_cache):
    import signal
    import time

    # 256x256x17 at 1000 steps runs ~35 s on 2 cores: the interrupt lands mid-denoising on
    # any machine, since it is sent once the engine has logged its plan, not after a fixed sleep.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvideo.entrypoints.cli", "generate", "--model", DEMO_MODEL_ID,
         "--prompt", "a long one", "--steps", "1000", "--height", "256", "--width", "256",
         "--num-frames", "17", "--output", str(tmp_path / "x.mp4")],
        cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "parallel plan" in line:
            break
    assert seen and "parallel plan" in seen[-1], "".join(seen)[-2000:]
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "fastvideo: interrupted" in err
    assert not list(tmp_path.glob("x*.mp4"))


def test_every_engine_and_sampling_field_has_a_flag():
    import argparse
    import dataclasses

    from fastvideo.config import _SUBCONFIGS, PipelineConfig, SamplingParam
    from fastvideo.entrypoints import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli._add_generate(sub)
    flags = set()
    for action in sub.choices["generate"]._actions:
        flags.update(action.option_strings)
    fields = [*dataclasses.fields(SamplingParam), *dataclasses.fields(PipelineConfig)]
    fields += [f for cls in _SUBCONFIGS.values() for f in dataclasses.fields(cls)]
    plain = [f.name for f in fields if cli._parser_for(str(f.type)) != (None, False)]
    missing = [
        n for n in plain if n not in cli._SKIPPED and f"--{n.replace('_', '-')}" not in flags
    ]
    assert not missing, missing
    for alias in ("--steps", "--output", "--compile", "--teacache", "--lora", "--image"):
        assert alias in flags
