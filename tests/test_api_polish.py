"""The API details users of other tools expect: output types, containers from the file
extension, several videos per prompt, a per-step callback, logging that reaches the
application's handlers, short reprs and field help."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from fastvideo import DEMO_MODEL_ID, SamplingParam, VideoGenerator

TINY = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=3)


@pytest.fixture(scope="module")
def gen():
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, executor="inproc") as g:
        yield g


def test_output_types_hold_the_same_frames(gen):
    ref = gen.generate_video("a fox", **TINY)
    pt = gen.generate_video("a fox", output_type="pt", **TINY)
    pil = gen.generate_video("a fox", output_type="pil", **TINY)
    assert ref.frames.dtype == np.uint8 and ref.frames.shape == (5, 32, 32, 3)
    assert pt.frames.dtype == torch.float32 and tuple(pt.frames.shape) == (5, 3, 32, 32)
    assert 0.0 <= float(pt.frames.min()) and float(pt.frames.max()) <= 1.0
    assert len(pil.frames) == 5 and pil.frames[0].size == (32, 32)
    np.testing.assert_array_equal(pt.numpy(), ref.frames)
    np.testing.assert_array_equal(pil.numpy(), ref.frames)
    assert ref.frames.std() > 0


def _read(path: Path) -> tuple[int, float, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, float(stream.average_rate), stream.codec_context.name


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".webm", "vp9"), (".gif", "gif")])
def test_the_container_follows_the_extension(gen, tmp_path, suffix, codec):
    out = gen.generate_video("a fox", fps=8, output_path=str(tmp_path / f"v{suffix}"), **TINY)
    frames, rate, name = _read(out.output_path)
    assert (frames, name) == (5, codec)
    assert abs(rate - 8) < 0.5  # gif stores delays in 1/100 s


def test_png_sequence(gen, tmp_path):
    out = gen.generate_video("a fox", output_path=str(tmp_path / "f_%03d.png"), **TINY)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"f_{i:03d}.png" for i in range(5)]
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "f_000.png"))
    np.testing.assert_array_equal(first, out.frames[0])  # lossless
    again = gen.generate_video("a fox", output_path=str(tmp_path / "f_%03d.png"), **TINY)
    assert again.output_path.name == "f_%03d-1.png"  # frame 0 exists: never overwritten
    with pytest.raises(ValueError, match="numbered sequence"):
        gen.generate_video("a fox", output_path=str(tmp_path / "still.png"), **TINY)


def test_several_videos_per_prompt(gen):
    outs = gen.generate_video("a fox", num_videos_per_prompt=3, **TINY)
    assert [o.seed for o in outs] == [3, 4, 5]
    assert len({o.frames.tobytes() for o in outs}) == 3
    single = gen.generate_video("a fox", **{**TINY, "seed": 4})
    np.testing.assert_array_equal(single.frames, outs[1].frames)
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        gen.generate_video("a fox", num_videos_per_prompt=0, **TINY)


def test_callback_on_step_end_sees_every_step_and_can_stop_the_call(gen):
    seen = []
    gen.generate_video("a fox", callback_on_step_end=lambda e: seen.append(e.step),
                       **{**TINY, "num_inference_steps": 4})  # fmt: skip
    assert seen == [1, 2, 3, 4]

    def stop(event):
        raise RuntimeError("user stop")

    with pytest.raises(RuntimeError, match="user stop"):
        gen.generate_video("a fox", callback_on_step_end=stop,
                           **{**TINY, "num_inference_steps": 50})  # fmt: skip
    import time

    deadline = time.monotonic() + 10
    while gen.core.scheduler.num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gen.core.scheduler.num_running == 0, "the stopped request kept running"
    assert gen.generate_video("a fox", **TINY).frames is not None


def test_logging_reaches_the_application_handlers():
    code = (
        "import logging, io\n"
        "stream = io.StringIO()\n"
        "logging.basicConfig(stream=stream, level=logging.INFO,\n"
        "                    format='APP %(name)s %(message)s')\n"
        "from fastvideo import VideoGenerator, DEMO_MODEL_ID\n"
        "with VideoGenerator.from_pretrained(DEMO_MODEL_ID, executor='inproc') as g:\n"
        "    g.generate_video('a fox', height=16, width=16, num_frames=1, num_inference_steps=1)\n"
        "print(stream.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "APP fastvideo.engine.core parallel plan" in proc.stdout
    assert "parallel plan" not in proc.stderr, "the fallback handler printed as well"


def test_fallback_handler_prints_without_application_logging():
    code = (
        "from fastvideo import VideoGenerator, DEMO_MODEL_ID\n"
        "with VideoGenerator.from_pretrained(DEMO_MODEL_ID, executor='inproc') as g:\n"
        "    g.generate_video('a fox', height=16, width=16, num_frames=1, num_inference_steps=1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 0 and "parallel plan" in proc.stderr


def test_short_repr_field_help_and_typing_marker(gen):
    out = gen.generate_video("a fox", **TINY)
    assert len(repr(out)) < 200 and "5x32x32x3" in repr(out)
    assert "num_inference_steps: Denoising steps." in SamplingParam.__doc__
    import fastvideo

    assert (Path(fastvideo.__file__).parent / "py.typed").is_file()
    logging.getLogger("fastvideo").debug("no handler error")  # still safe to log
