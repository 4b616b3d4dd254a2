"""What a generation returns, where it is saved, and writing it as an H.264 mp4 (PyAV,
FFmpeg inside its wheel).

Output files are planned before any work: the folder must be writable, the extension one
we write, and a name that already exists (on disk, or planned by another request of this
process) gets a numeric suffix, so nothing is ever overwritten.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

VIDEO_SUFFIXES = (".mp4",)
MAX_FPS = 1000

_reserved: set[Path] = set()
_reserved_lock = threading.Lock()


@dataclass
class VideoOutput:
    """One generated video.

    Attributes:
        frames: uint8 [T, H, W, 3] RGB frames (None when ``output_type='latent'``).
        timings: seconds per pipeline stage, plus ``denoising_step_mean``, the workers'
            ``total`` and the driver's ``end_to_end``.
        latents: fp32 [C, F, H/8, W/8] final latents when ``output_type='latent'``.
        stats: counters of the run, e.g. ``teacache_skipped_cond`` /
            ``magcache_skipped_uncond``: denoising steps whose DiT blocks a cache skipped.
        output_path: where it was saved (None if it was not).
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

    def __repr__(self) -> str:
        shape = "latent" if self.frames is None else "x".join(map(str, self.frames.shape))
        return (
            f"VideoOutput(frames={shape}, fps={self.fps}, seed={self.seed}, "
            f"prompt={self.prompt[:40]!r}, output_path={self.output_path})"
        )

    def save(self, path: str | Path) -> Path:
        """Write the frames as an H.264 mp4 at ``path`` (parents are created); refuses to
        overwrite an existing file."""
        if self.frames is None:
            raise ValueError("this output has no frames (output_type='latent'); nothing to save")
        target = Path(path).expanduser()
        if target.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"cannot write {target.suffix or 'no extension'!r}: use .mp4")
        if target.exists():
            raise FileExistsError(f"{target} exists; fastvideo never overwrites a file")
        self.output_path = write_mp4(self.frames, target, self.fps)
        return self.output_path


def check_fps(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fps must be an int, got {type(value).__name__} {value!r}")
    if not 1 <= value <= MAX_FPS:
        raise ValueError(f"fps must be in [1, {MAX_FPS}], got {value}")


def _safe_name(prompt: str) -> str:
    safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in prompt)[:80].strip()
    return safe or "video"


def _writable_dir(folder: Path) -> None:
    """``folder`` exists as a writable folder or can be created under a writable one
    (probed by creating an anonymous temporary file: permission bits do not stop root,
    a read-only file system does)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"output_path: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"output_path: {probe} is not writable ({e.strerror})") from None


def plan_output_file(output_path: object, prompt: str, seed: int) -> Path | None:
    """Where to save a video, reserved so no other planned or existing file is
    overwritten; raises ValueError naming the problem (before any work is done).

    ``output_path``: a ``.mp4`` file, or a folder (the file is named after the prompt and
    seed); None: not saved.
    """
    if output_path is None or output_path == "":
        return None
    if not isinstance(output_path, (str, os.PathLike)):
        raise TypeError(f"output_path must be a str or a path, got {type(output_path).__name__}")
    path = Path(output_path).expanduser()
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if path.is_dir():
            raise ValueError(f"output_path {path} is an existing folder, not a video file")
        folder, stem = path.parent, path.stem
    elif suffix and not path.is_dir():
        raise ValueError(
            f"output_path {path}: {suffix!r} is not a container fastvideo writes; use a .mp4 "
            f"file or a folder"
        )
    else:
        folder, stem, suffix = path, f"{_safe_name(prompt)}-{seed}", ".mp4"
    _writable_dir(folder)
    with _reserved_lock:
        for n in range(100_000):
            candidate = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            if candidate not in _reserved and not candidate.exists():
                _reserved.add(candidate)
                return candidate
    raise ValueError(f"output_path: no free file name for {stem}{suffix} in {folder}")


def release_output_file(path: Path | None) -> None:
    """Forget a reservation (the file was written, or will never be)."""
    if path is not None:
        with _reserved_lock:
            _reserved.discard(path)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    """uint8 [T, H, W, 3] -> H.264 (yuv420p) mp4 at ``path``, moov atom first (streams
    start playing before the whole file arrives)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    check_fps(fps)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {h}x{w}")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return path
