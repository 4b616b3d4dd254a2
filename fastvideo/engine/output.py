"""What a generation returns, and writing it as an H.264 mp4 (PyAV, FFmpeg in the wheel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class VideoOutput:
    """One generated video.

    Attributes:
        frames: uint8 [T, H, W, 3] RGB frames (None when ``output_type='latent'``).
        timings: seconds per pipeline stage, plus ``denoising_step_mean``, the workers'
            ``total`` and the driver's ``end_to_end``.
        latents: fp32 [C, F, H/8, W/8] final latents when ``output_type='latent'``.
        stats: counters of the run, e.g. ``teacache_skipped_cond`` /
            ``teacache_skipped_uncond``: denoising steps whose DiT blocks TeaCache skipped.
    """

    frames: np.ndarray | None
    fps: int
    seed: int
    prompt: str
    negative_prompt: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    request_id: str = ""
    plan: str = ""
    peak_memory_bytes: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    output_path: Path | None = None

    def save(self, path: str | Path) -> Path:
        """Write the frames as an H.264 mp4 at ``path`` (parents are created)."""
        if self.frames is None:
            raise ValueError("this output has no frames (output_type='latent'); nothing to save")
        self.output_path = write_mp4(self.frames, path, self.fps)
        return self.output_path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    """uint8 [T, H, W, 3] -> H.264 (yuv420p) mp4 at ``path``."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {h}x{w}")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path
