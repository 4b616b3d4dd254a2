"""What a generation returns, where it is saved, and writing it (PyAV, FFmpeg inside its
wheel): ``.mp4`` (H.264, moov first), ``.webm`` (VP9), ``.gif``, or a PNG sequence
(``frames/clip_%05d.png``, printf-style numbering as ffmpeg's image2 uses).

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

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".png")  # .png: a numbered sequence (a % in the name)
FRAME_TYPES = ("np", "pt", "pil")  # what VideoOutput.frames holds (see to_frames)
MAX_FPS = 1000

_reserved: set[Path] = set()
_reserved_lock = threading.Lock()


@dataclass
class VideoOutput:
    """One generated video.

    Attributes:
        frames: the frames in the requested ``output_type``: ``"np"`` uint8 [T, H, W, 3]
            RGB, ``"pt"`` float32 torch [T, 3, H, W] in [0, 1], ``"pil"`` a list of PIL
            images; None when ``output_type='latent'``.
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
        if self.frames is None:
            shape = "latent"
        elif isinstance(self.frames, list):
            shape = f"{len(self.frames)} PIL images"
        else:
            shape = "x".join(map(str, self.frames.shape))
        return (
            f"VideoOutput(frames={shape}, fps={self.fps}, seed={self.seed}, "
            f"prompt={self.prompt[:40]!r}, output_path={self.output_path})"
        )

    def numpy(self) -> np.ndarray:
        """The frames as uint8 [T, H, W, 3], whatever ``output_type`` was."""
        if self.frames is None:
            raise ValueError("this output has no frames (output_type='latent')")
        return uint8_frames(self.frames)

    def save(self, path: str | Path) -> Path:
        """Write the video at ``path`` (container from the extension: .mp4, .webm, .gif,
        or a PNG sequence ``name_%05d.png``; parents are created); never overwrites."""
        if self.frames is None:
            raise ValueError("this output has no frames (output_type='latent'); nothing to save")
        target = Path(path).expanduser()
        _check_suffix(target)
        if _first_file(target).exists():
            raise FileExistsError(f"{target} exists; fastvideo never overwrites a file")
        self.output_path = write_video(self.numpy(), target, self.fps)
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
        _check_suffix(path, "output_path ")
        folder, stem = path.parent, path.stem
    elif suffix and not path.is_dir():
        raise ValueError(
            f"output_path {path}: {suffix!r} is not a container fastvideo writes; use a .mp4, "
            f".webm or .gif file, a PNG sequence (name_%05d.png) or a folder"
        )
    else:
        folder, stem, suffix = path, f"{_safe_name(prompt)}-{seed}", ".mp4"
    _writable_dir(folder)
    with _reserved_lock:
        for n in range(100_000):
            candidate = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            if candidate not in _reserved and not _first_file(candidate).exists():
                _reserved.add(candidate)
                return candidate
    raise ValueError(f"output_path: no free file name for {stem}{suffix} in {folder}")


def release_output_file(path: Path | None) -> None:
    """Forget a reservation (the file was written, or will never be)."""
    if path is not None:
        with _reserved_lock:
            _reserved.discard(path)


def _check_suffix(path: Path, field: str = "") -> None:
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"{field}cannot write {suffix or 'no extension'!r}: use .mp4, .webm, .gif or a PNG "
            f"sequence (name_%05d.png)"
        )
    if suffix == ".png" and not _is_pattern(path.name):
        raise ValueError(
            f"{field}{path.name}: a PNG output is a numbered sequence; put the frame number in "
            f"the name printf-style, e.g. clip_%05d.png"
        )


def _is_pattern(name: str) -> bool:
    try:
        return "%" in name and name % 0 != name % 1
    except (TypeError, ValueError):
        return False


def _first_file(path: Path) -> Path:
    """The file a video at ``path`` starts with (frame 0 of a PNG sequence)."""
    return path.with_name(path.name % 0) if path.suffix.lower() == ".png" else path


def uint8_frames(frames) -> np.ndarray:
    """uint8 [T, H, W, 3] from any ``output_type``'s frames."""
    if isinstance(frames, np.ndarray):
        return frames
    if isinstance(frames, torch.Tensor):  # "pt": float [T, 3, H, W] in [0, 1]
        x = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous().numpy()
    return np.stack([np.asarray(image.convert("RGB")) for image in frames])  # "pil"


def to_frames(frames: np.ndarray, output_type: str):
    """uint8 [T, H, W, 3] as ``output_type`` asks (``"np"``, ``"pt"``, ``"pil"``)."""
    if output_type == "pt":
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(frame) for frame in frames]
    return frames


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """uint8 [T, H, W, 3] -> the container ``path``'s extension names."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        check_fps(fps)
        path.parent.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(path.with_name(path.name % i))
        return path
    if suffix in (".webm", ".gif"):
        return _write_av(frames, path, fps, suffix)
    return write_mp4(frames, path, fps)


def _write_av(frames: np.ndarray, path: Path, fps: int, suffix: str) -> Path:
    """VP9 webm, or an animated gif (gif stores delays in 1/100 s: fps is rounded so)."""
    import av

    check_fps(fps)
    t, h, w, _ = frames.shape
    codec, pix, fmt = ("libvpx-vp9", "yuv420p", "webm") if suffix == ".webm" else (
        "gif", "rgb8", "gif")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, pix
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return path


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
