"""User-facing configuration: ``PipelineConfig`` (how the engine runs a model) and
``SamplingParam`` (what one video looks like). Both take per-model defaults from the
registry, and every field can be set by attribute or by keyword; an unknown keyword is a
TypeError naming it. Field help strings double as CLI help.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastvideo import envs

PRECISIONS = ("fp32", "bf16", "fp16")
EXECUTORS = ("mp", "inproc")
DEVICES = ("cuda", "cpu")
PARALLEL_MODES = ("auto", "latency", "throughput")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Every name fastvideo.kernels_bridge.attention registers (kept here so validating a config
# does not import torch); whether one can run on this machine is checked on the workers.
ATTENTION_BACKENDS = (
    "auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flash_attn",
    "sage", "sta",
)  # fmt: skip
# Backends ring attention runs with: it merges partial results by log-sum-exp, which only
# the SDPA kernels expose (cuDNN, flash, memory-efficient, CPU).
RING_BACKENDS = ("auto", "sdpa")

T = TypeVar("T")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


def _apply(obj: T, where: str, overrides: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    for key, value in overrides.items():
        if key not in names:
            raise TypeError(
                f"{where} got an unexpected keyword argument {key!r}; valid: "
                + ", ".join(sorted(names))
            )
        setattr(obj, key, value)
    return obj


@dataclass
class VAEConfig:
    vae_precision: str = _help("VAE weights/activations: fp32, bf16 or fp16.", "fp32")


@dataclass
class PipelineConfig:
    """How the engine loads and runs a model."""

    model_path: str = _help("Model id or folder (set by from_pretrained).", "")
    num_gpus: int = _help("Worker processes, one per GPU (CPU workers when no GPU).", 1)
    dit_precision: str | None = _help("DiT precision; None: bf16 on GPU, fp32 on CPU.", None)
    text_encoder_precision: str | None = _help(
        "Text encoder precision; None: bf16 on GPU, fp32 on CPU.", None
    )
    vae_config: VAEConfig = _help("VAE settings.", default_factory=VAEConfig)
    attention_backend: str | None = _help(
        "Attention backend: 'auto'/None (fastest available, logged), 'sdpa', 'sdpa_cudnn', "
        "'sdpa_flash', 'sdpa_efficient', 'sdpa_math', 'flash_attn', 'sage' or 'sta' "
        "(sliding-tile). Env: FASTVIDEO_ATTENTION_BACKEND.",
        None,
    )
    sta_tile_size: tuple[int, int, int] = _help(
        "STA tile in tokens (frames, height, width); volume a multiple of 64 or 128.", (3, 8, 8)
    )
    sta_window_size: Any = _help(
        "STA window in tiles (t, h, w): one triple for every resolution, or a dict "
        "'HxWxF' (pixels) -> triple; resolutions not listed use the whole clip in time and "
        "about 60% of the tiles in height and width.",
        default_factory=dict,
    )
    enable_torch_compile: bool = _help(
        "Regional torch.compile of the DiT blocks (also under sequence parallelism).", False
    )
    torch_compile_mode: str | None = _help("torch.compile mode (None: default).", None)
    torch_compile_backend: str = _help("torch.compile backend.", "inductor")
    teacache_coefficients: tuple[float, ...] | None = _help(
        "TeaCache's rescaling polynomial for this model (highest power first).", None
    )
    teacache_warmup_steps: int = _help("Steps TeaCache always computes at the start.", 5)
    flow_shift: float | None = _help(
        "Flow-matching sigma shift; None: the checkpoint's scheduler config.", None
    )
    scheduler: str | None = _help("'unipc' or 'euler'; None: the checkpoint's scheduler.", None)
    device: str | None = _help("'cuda' or 'cpu'; None: cuda when available.", None)
    executor: str = _help("'mp' (worker processes, default) or 'inproc' (debugging).", "mp")
    cfg_parallel: bool | None = _help("Force CFG-parallel on/off; None: automatic.", None)
    sp_degree: int | None = _help("Force the sequence-parallel group size.", None)
    ulysses_degree: int | None = _help("Force the Ulysses degree.", None)
    ring_degree: int | None = _help("Force the ring-attention degree.", None)
    ready_timeout_s: float | None = _help("Seconds to wait for workers to load.", None)
    max_batch_size: int = _help(
        "Compatible waiting requests (same size, frames, steps, guidance on/off) run as one "
        "batched forward, up to this many.",
        1,
    )
    max_waiting_requests: int = _help("Queue bound: submitting beyond it raises at once.", 256)
    parallel_mode: str = _help(
        "'latency' (all GPUs on one request), 'throughput' (data-parallel replicas) or 'auto' "
        "(throughput while enough requests wait).",
        "auto",
    )
    throughput_replicas: int | None = _help("Replicas in throughput mode; None: one per GPU.", None)

    @classmethod
    def from_pretrained(cls, model: str, **overrides: Any) -> PipelineConfig:
        """Defaults for ``model`` (a registry id or a local folder) plus ``overrides``."""
        from fastvideo.engine.model_info import variant_defaults

        _, pipeline_defaults = variant_defaults(model)
        config = cls(model_path=str(model))
        _apply(config, "PipelineConfig.from_pretrained()", pipeline_defaults)
        return config.update(**overrides)

    def update(self, **overrides: Any) -> PipelineConfig:
        vae_precision = overrides.pop("vae_precision", None)
        _apply(self, "PipelineConfig", overrides)
        if vae_precision is not None:
            self.vae_config.vae_precision = vae_precision
        return self

    def copy(self) -> PipelineConfig:
        return copy.deepcopy(self)

    def validate(self) -> None:
        if (
            not isinstance(self.num_gpus, int)
            or isinstance(self.num_gpus, bool)
            or self.num_gpus < 1
        ):
            raise ValueError(f"num_gpus must be a positive int, got {self.num_gpus!r}")
        for name, value in (
            ("dit_precision", self.dit_precision),
            ("text_encoder_precision", self.text_encoder_precision),
            ("vae_config.vae_precision", self.vae_config.vae_precision),
        ):
            if value is not None and value not in PRECISIONS:
                raise ValueError(f"{name} must be one of {PRECISIONS}, got {value!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES} or None, got {self.device!r}")
        if self.executor == "inproc" and self.num_gpus != 1:
            raise ValueError("executor='inproc' runs one rank: num_gpus must be 1")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift!r}")
        for name in ("max_batch_size", "max_waiting_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(
                f"parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}"
            )
        backend = self.resolved_attention_backend() or "auto"
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}"
            )
        if backend not in RING_BACKENDS and (self.ring_degree or 1) > 1:
            raise ValueError(
                f"attention_backend={backend!r} cannot run ring attention: use Ulysses "
                f"(ulysses_degree), not ring_degree={self.ring_degree}, or 'auto'/'sdpa'"
            )
        _check_triple("sta_tile_size", self.sta_tile_size)
        if math.prod(self.sta_tile_size) % 64:
            raise ValueError(
                f"sta_tile_size={tuple(self.sta_tile_size)}: the tile volume must be a multiple "
                f"of 64 (FlexAttention blocks), got {math.prod(self.sta_tile_size)}"
            )
        windows = self.sta_window_size
        if isinstance(windows, dict):
            for key, value in windows.items():
                parse_resolution(key)
                _check_triple(f"sta_window_size[{key!r}]", value)
        else:
            _check_triple("sta_window_size", windows)
        if not isinstance(self.enable_torch_compile, bool):
            raise TypeError("enable_torch_compile must be a bool")
        mode = self.torch_compile_mode
        if mode not in COMPILE_MODES:
            raise ValueError(f"torch_compile_mode must be one of {COMPILE_MODES}, got {mode!r}")
        if self.enable_torch_compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.torch_compile_backend not in known:
                raise ValueError(
                    f"torch_compile_backend must be one of {known}, got "
                    f"{self.torch_compile_backend!r}"
                )
        warmup = self.teacache_warmup_steps
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"teacache_warmup_steps must be an int >= 0, got {warmup!r}")
        coeffs = self.teacache_coefficients
        if coeffs is not None and (
            not isinstance(coeffs, (tuple, list))
            or not coeffs
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coeffs)
        ):
            raise ValueError(
                f"teacache_coefficients must be a non-empty sequence of numbers (highest "
                f"power first) or None, got {coeffs!r}"
            )
        replicas = self.replicas()
        if self.num_gpus % replicas:
            raise ValueError(f"throughput_replicas={replicas} must divide num_gpus={self.num_gpus}")

    def replicas(self) -> int:
        """Data-parallel replicas in throughput mode (1 when throughput mode is off)."""
        if self.parallel_mode == "latency":
            return 1
        return self.throughput_replicas or self.num_gpus

    def plan_kwargs(self) -> dict[str, Any]:
        """Forced latency-mode plan options (None means automatic)."""
        return {
            "cfg_parallel": self.cfg_parallel,
            "sp_degree": self.sp_degree,
            "ulysses_degree": self.ulysses_degree,
            "ring_degree": self.ring_degree,
        }

    def resolved_attention_backend(self) -> str | None:
        return self.attention_backend or envs.attention_backend()

    def sta_windows(self) -> dict[tuple[int, int, int], tuple[int, int, int]] | tuple[int, ...]:
        """(height, width, frames) -> window, or one window for every resolution."""
        if isinstance(self.sta_window_size, dict):
            return {parse_resolution(k): tuple(v) for k, v in self.sta_window_size.items()}
        return tuple(self.sta_window_size)


def _check_triple(name: str, value: Any) -> None:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")


def parse_resolution(key: Any) -> tuple[int, int, int]:
    """'480x832x81' -> (480, 832, 81) (height, width, frames)."""
    parts = str(key).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"resolution key {key!r} must look like 'HxWxF', e.g. '480x832x81'")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


@dataclass
class SamplingParam:
    """What to generate. ``generate_video(prompt, sampling_param, **overrides)``."""

    negative_prompt: str | None = _help("What to steer away from (CFG).", None)
    height: int = _help("Frame height in pixels (a multiple of 16 for Wan).", 480)
    width: int = _help("Frame width in pixels (a multiple of 16 for Wan).", 832)
    num_frames: int = _help("Frames, of the form 4k+1 for Wan.", 81)
    fps: int = _help("Frames per second of the saved video.", 16)
    num_inference_steps: int = _help("Denoising steps.", 50)
    guidance_scale: float = _help("Classifier-free guidance scale; <= 1 turns CFG off.", 5.0)
    seed: int = _help("Random seed of the initial noise.", 1024)
    output_path: str | None = _help(
        "Save the video here: a .mp4 file path, or a folder (named after the prompt).", None
    )
    output_type: str = _help("'np' for uint8 frames, 'latent' to skip VAE decoding.", "np")
    enable_teacache: bool = _help(
        "TeaCache: skip the DiT blocks on steps whose timestep input barely changed (lossy).",
        False,
    )
    teacache_thresh: float = _help(
        "TeaCache threshold (higher skips more); the model's published default.", 0.08
    )

    @classmethod
    def from_pretrained(cls, model: str, **overrides: Any) -> SamplingParam:
        from fastvideo.engine.model_info import variant_defaults

        sampling_defaults, _ = variant_defaults(model)
        param = _apply(cls(), "SamplingParam.from_pretrained()", sampling_defaults)
        return param.update(**overrides)

    def update(self, **overrides: Any) -> SamplingParam:
        return _apply(self, "SamplingParam", overrides)

    def copy(self) -> SamplingParam:
        return copy.deepcopy(self)

    def resolve_output_file(self, prompt: str) -> Path | None:
        """Where ``output_path`` saves the video for ``prompt`` (None: not saved)."""
        if not self.output_path:
            return None
        path = Path(self.output_path).expanduser()
        if path.suffix.lower() == ".mp4":
            return path
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in prompt)[:100].strip()
        return path / f"{safe or 'video'}.mp4"


def dataclass_help(cls: type) -> dict[str, str]:
    """Field name -> help text (for the CLI)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
