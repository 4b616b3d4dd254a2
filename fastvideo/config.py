"""User-facing configuration.

``PipelineConfig`` says how the engine loads and runs a model; it composes typed
sub-configs (``parallel_config``, ``attention_config``, ``cache_config``,
``compile_config``, ``vae_config``, ``offload_config``, ``engine_config``), each of which
validates itself.
``SamplingParam`` says what one video looks like. Both take per-model defaults from the
model registry, and every field can be set by attribute or keyword: a sub-config's field
also by its own name on the ``PipelineConfig`` (``config.attention_backend = "sta"``,
``from_pretrained(model, max_batch_size=4)``). An unknown keyword is a TypeError naming it
and the closest valid names. Field help strings double as docstrings and CLI help.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastvideo import envs
from fastvideo.cache.calibration import MagCacheCalibration, TeaCacheCalibration
from fastvideo.layers.vae_tiling import TileSizes
from fastvideo.wire.validation import STEP_CACHES, RequestLimits, is_int, require_int

PRECISIONS = ("fp32", "bf16", "fp16")
EXECUTORS = ("mp", "inproc", "ray")
DEVICES = ("cuda", "cpu")
PARALLEL_MODES = ("auto", "latency", "throughput")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Every name fastvideo.kernels_bridge.attention registers (kept here so validating a config
# does not import the kernels); whether one can run on this machine is checked on the workers.
ATTENTION_BACKENDS = (
    "auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flash_attn",
    "fa4", "sage", "sta",
)  # fmt: skip
# Backends ring attention runs with: it merges partial results by log-sum-exp, which only
# the SDPA kernels expose (cuDNN, flash, memory-efficient, CPU).
# Backends ring attention runs on (it merges partials by their log-sum-exp: SDPA's
# kernels, or FA4's own).
RING_BACKENDS = ("auto", "sdpa", "fa4")

T = TypeVar("T")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


def documented(cls: type[T]) -> type[T]:
    """Append every field's help text to the class docstring (so ``help()`` shows it)."""
    lines = [f"    {f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n\n    Fields:\n" + "\n".join(lines)
    return cls


def _unknown(where: str, key: str, names: list[str]) -> TypeError:
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return TypeError(f"{where} got an unexpected keyword argument {key!r}{hint}")


def _check_gib(name: str, value: Any, zero_ok: bool) -> None:
    """None, or a finite number of GiB (> 0, or >= 0 with ``zero_ok``)."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {bound} (GiB) or None, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_optional_positive(name: str, value: Any) -> None:
    if value is not None:
        require_int(name, value, 1)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --- sub-configs -------------------------------------------------------------------------
@documented
@dataclass
class ParallelConfig:
    """How one request is split across the GPUs, and when to run replicas instead."""

    cfg_parallel: bool | None = _help("Force CFG-parallel on/off; None: automatic.", None)
    sp_degree: int | None = _help("Force the sequence-parallel group size.", None)
    ulysses_degree: int | None = _help("Force the Ulysses degree.", None)
    ring_degree: int | None = _help("Force the ring-attention degree.", None)
    parallel_mode: str = _help(
        "'latency' (all GPUs on one request), 'throughput' (data-parallel replicas) or 'auto' "
        "(throughput while enough requests wait).",
        "auto",
    )
    throughput_replicas: int | None = _help("Replicas in throughput mode; None: one per GPU.", None)
    ray_allow_cross_node: bool = _help(
        "executor='ray': let one replica's ranks span nodes (its sequence-parallel "
        "collectives then cross the network); False: every replica stays on one node.",
        False,
    )

    def validate(self) -> None:
        _check_bool("ray_allow_cross_node", self.ray_allow_cross_node)
        if self.cfg_parallel is not None:
            _check_bool("cfg_parallel", self.cfg_parallel)
        for name in ("sp_degree", "ulysses_degree", "ring_degree", "throughput_replicas"):
            _check_optional_positive(name, getattr(self, name))
        _check_choice("parallel_mode", self.parallel_mode, PARALLEL_MODES)

    def forced(self) -> dict[str, Any]:
        """Forced latency-mode plan options (None means automatic)."""
        return {
            "cfg_parallel": self.cfg_parallel,
            "sp_degree": self.sp_degree,
            "ulysses_degree": self.ulysses_degree,
            "ring_degree": self.ring_degree,
        }


@documented
@dataclass
class AttentionConfig:
    """Which attention kernel runs, and sliding-tile attention's tiles and windows."""

    attention_backend: str | None = _help(
        "Attention backend: 'auto'/None (fastest available, logged), 'sdpa', 'sdpa_cudnn', "
        "'sdpa_flash', 'sdpa_efficient', 'sdpa_math', 'flash_attn', 'sage' or 'sta' "
        "(sliding-tile). Env: FASTVIDEO_ATTENTION_BACKEND.",
        None,
    )
    sta_tile_size: tuple[int, int, int] = _help(
        "STA tile in tokens (frames, height, width); volume a multiple of 64.", (3, 8, 8)
    )
    sta_window_size: Any = _help(
        "STA window in tiles (t, h, w): one triple for every resolution, or a dict "
        "'HxWxF' (pixels) -> triple; resolutions not listed use the whole clip in time and "
        "about 60% of the tiles in height and width.",
        default_factory=dict,
    )

    def resolved_backend(self) -> str:
        return self.attention_backend or envs.attention_backend() or "auto"

    def validate(self) -> None:
        _check_choice("attention_backend", self.resolved_backend(), ATTENTION_BACKENDS)
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

    def sta_windows(self) -> dict[tuple[int, int, int], tuple[int, int, int]] | tuple[int, ...]:
        """(height, width, frames) -> window, or one window for every resolution."""
        if isinstance(self.sta_window_size, dict):
            return {parse_resolution(k): tuple(v) for k, v in self.sta_window_size.items()}
        return tuple(self.sta_window_size)


@documented
@dataclass
class CacheConfig:
    """The model's step-cache calibrations (requests choose a cache with ``cache=``)."""

    teacache: TeaCacheCalibration | None = _help(
        "TeaCache calibration (polynomial, warm-up steps, default threshold); None: not "
        "calibrated, TeaCache requests are refused.",
        None,
    )
    magcache: MagCacheCalibration | None = _help(
        "MagCache calibration (per-step magnitude ratios, max skips, retention, default "
        "threshold); None: not calibrated, MagCache requests are refused.",
        None,
    )

    def validate(self) -> None:
        for name, kind in (("teacache", TeaCacheCalibration), ("magcache", MagCacheCalibration)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None, got {value!r}")
            value.validate()

    def calibrated(self) -> tuple[str, ...]:
        return tuple(name for name in STEP_CACHES if getattr(self, name) is not None)

    def default_thresh(self, cache: str) -> float:
        return getattr(self, cache).default_thresh


@documented
@dataclass
class CompileConfig:
    """torch.compile of the DiT's blocks."""

    enable_torch_compile: bool = _help(
        "Regional torch.compile of the DiT blocks (also under sequence parallelism).", False
    )
    torch_compile_mode: str | None = _help("torch.compile mode (None: default).", None)
    torch_compile_backend: str = _help("torch.compile backend.", "inductor")
    compile_cache_dir: str | None = _help(
        "Folder of torch.compile's on-disk caches (inductor's FX-graph and AOTAutograd "
        "caches and the kernels it builds), kept across restarts; None: "
        "TORCHINDUCTOR_CACHE_DIR when set, else FASTVIDEO_CACHE_DIR/torch_compile.",
        None,
    )
    compile_warmup: bool = _help(
        "With enable_torch_compile: run one denoising step at the model's default size and "
        "guidance before the engine is ready, so the blocks are compiled (or read from the "
        "cache) at start-up and the first request runs compiled code.",
        True,
    )

    def cache_path(self) -> Path:
        return Path(self.compile_cache_dir or envs.cache_dir() / "torch_compile").expanduser()

    def validate(self) -> None:
        _check_bool("enable_torch_compile", self.enable_torch_compile)
        _check_bool("compile_warmup", self.compile_warmup)
        if self.compile_cache_dir is not None and (
            not isinstance(self.compile_cache_dir, str) or not self.compile_cache_dir.strip()
        ):
            raise TypeError(
                f"compile_cache_dir must be a folder path or None, got {self.compile_cache_dir!r}"
            )
        _check_choice("torch_compile_mode", self.torch_compile_mode, COMPILE_MODES)
        if self.enable_torch_compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            _check_choice("torch_compile_backend", self.torch_compile_backend, tuple(known))


@documented
@dataclass
class VAEConfig:
    """The VAE's precision, and spatial tiling of its encode/decode (diffusers' names)."""

    vae_precision: str = _help("VAE weights/activations: fp32, bf16 or fp16.", "fp32")
    vae_tiling: bool | str = _help(
        "True: encode/decode in overlapping spatial tiles blended linearly (diffusers' "
        "enable_tiling, the tile_sample_* fields). 'auto': with the tile fields at their "
        "defaults, decode in exact tiles (the untiled decode's video) when the whole decode "
        "does not fit in free memory, and always under parallel decode; with other tile "
        "fields, blended tiles when it does not fit (logged). False: never tiled.",
        "auto",
    )
    tile_sample_min_height: int = _help(
        "Tile height in pixels (a multiple of the VAE's pixels per latent: 8, or 16 for Wan 2.2).",
        256,
    )
    tile_sample_min_width: int = _help(
        "Tile width in pixels (a multiple of the VAE's pixels per latent).", 256
    )
    tile_sample_stride_height: int = _help(
        "Vertical distance between tiles in pixels (the overlap is min - stride).", 192
    )
    tile_sample_stride_width: int = _help(
        "Horizontal distance between tiles in pixels (the overlap is min - stride).", 192
    )
    vae_parallel_decode: bool = _help(
        "When a decode is tiled, every rank of the replica decodes a share of the tiles and "
        "the output rank joins them (the same result as one rank; with vae_tiling='auto' "
        "and default tile fields, exact tiles: the whole decode's video). Loads the VAE on "
        "every rank unless vae_tiling=False.",
        True,
    )

    def validate(self) -> None:
        _check_choice("vae_config.vae_precision", self.vae_precision, PRECISIONS)
        _check_choice("vae_tiling", self.vae_tiling, (True, False, "auto"))
        _check_bool("vae_parallel_decode", self.vae_parallel_decode)
        # Multiples of 8 fit Wan 2.1 (8 pixels per latent); a VAE with more pixels per latent
        # checks its own multiple when it tiles.
        self.tile_sizes().check(multiple=8)

    def tile_sizes(self) -> TileSizes:
        """The tile sizes as the tiling code takes them."""
        return TileSizes(
            self.tile_sample_min_height,
            self.tile_sample_min_width,
            self.tile_sample_stride_height,
            self.tile_sample_stride_width,
        )


OFFLOAD_CHOICES = (True, False, "auto")


@documented
@dataclass
class OffloadConfig:
    """Where weights live: resident on the device, or in (pinned) CPU memory between uses."""

    dit_cpu_offload: bool | str = _help(
        "Layerwise DiT offload: block weights stay in pinned CPU memory, the next block is "
        "copied to the GPU while the current one computes. True, False, or 'auto' (only "
        "when the weights would not fit the free memory; logged).",
        "auto",
    )
    text_encoder_cpu_offload: bool | str = _help(
        "Keep the text encoder(s) in CPU memory, on the device only while encoding: True, "
        "False or 'auto'.",
        "auto",
    )
    image_encoder_cpu_offload: bool | str = _help(
        "Keep the image encoder in CPU memory, on the device only while encoding: True, "
        "False or 'auto'.",
        "auto",
    )
    vae_cpu_offload: bool | str = _help(
        "Keep the VAE in CPU memory, on the device only while encoding/decoding: True, "
        "False or 'auto'.",
        "auto",
    )
    dit_sharded_weights: bool = _help(
        "FSDP-style: each rank of a sequence-parallel group keeps 1/N of every DiT block's "
        "weights and all-gathers a block just before it runs (prefetching the next). Needs "
        "parallel_mode='latency'; not with torch.compile or dit_cpu_offload=True.",
        False,
    )
    offload_headroom_gb: float | None = _help(
        "Memory 'auto' keeps free for activations when deciding what to offload; None: 15 percent "
        "of the device's memory, at least 2 GiB.",
        None,
    )
    device_memory_gb: float | None = _help(
        "The most GPU memory (GiB) the engine may use on each GPU, as on a smaller card: every "
        "worker caps its allocator there (torch.cuda.set_per_process_memory_fraction) and the "
        "'auto' offload and VAE tiling rules plan within it. None: the whole GPU.",
        None,
    )

    def validate(self) -> None:
        for name in (
            "dit_cpu_offload",
            "text_encoder_cpu_offload",
            "image_encoder_cpu_offload",
            "vae_cpu_offload",
        ):
            _check_choice(name, getattr(self, name), OFFLOAD_CHOICES)
        _check_bool("dit_sharded_weights", self.dit_sharded_weights)
        _check_gib("offload_headroom_gb", self.offload_headroom_gb, zero_ok=True)
        _check_gib("device_memory_gb", self.device_memory_gb, zero_ok=False)
        if self.dit_sharded_weights and self.dit_cpu_offload is True:
            raise ValueError(
                "dit_sharded_weights=True and dit_cpu_offload=True exclude each other: choose one"
            )


@documented
@dataclass
class EngineConfig:
    """Queueing, batching, time-outs and per-request work limits of the engine."""

    max_batch_size: int = _help(
        "Compatible waiting requests (same size, frames, steps, guidance on/off) run as one "
        "batched forward, up to this many.",
        1,
    )
    max_waiting_requests: int = _help("Queue bound: submitting beyond it raises at once.", 256)
    ready_timeout_s: float | None = _help(
        "Seconds to wait for workers to load (None: FASTVIDEO_WORKER_READY_TIMEOUT, 1200).", None
    )
    worker_timeout_s: float = _help(
        "A worker silent for this long (no heartbeat: stopped, hung, deadlocked) is declared "
        "dead: its replica is killed and its requests fail with EngineDeadError.",
        60.0,
    )
    stall_timeout_s: float = _help(
        "A worker busy with a batch that passes no stage or step boundary for this long "
        "(a kernel or a collective that never returns) is declared dead.",
        900.0,
    )
    request_timeout_s: float | None = _help(
        "Abort a request that has not finished this many seconds after it started; None: no limit.",
        None,
    )
    max_inference_steps: int = _help("Most denoising steps one request may ask for.", 1000)
    max_tokens: int = _help(
        "Most DiT tokens one video may have (grows with height x width x frames).", 262_144
    )
    max_token_steps: int = _help(
        "Most tokens x steps one video may cost (its denoising work).", 262_144 * 50
    )

    def validate(self) -> None:
        for name in (
            "max_batch_size",
            "max_waiting_requests",
            "max_inference_steps",
            "max_tokens",
            "max_token_steps",
        ):
            require_int(name, getattr(self, name), 1)
        for name in ("ready_timeout_s", "worker_timeout_s", "stall_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if value is None and name in ("ready_timeout_s", "request_timeout_s"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_inference_steps=self.max_inference_steps,
            max_tokens=self.max_tokens,
            max_token_steps=self.max_token_steps,
        )


_SUBCONFIGS: dict[str, type] = {
    "parallel_config": ParallelConfig,
    "attention_config": AttentionConfig,
    "cache_config": CacheConfig,
    "compile_config": CompileConfig,
    "vae_config": VAEConfig,
    "offload_config": OffloadConfig,
    "engine_config": EngineConfig,
}
# A sub-config field's name -> the sub-config holding it (names are unique across them).
_ROUTES: dict[str, str] = {
    f.name: sub for sub, cls in _SUBCONFIGS.items() for f in dataclasses.fields(cls)
}


@documented
@dataclass
class PipelineConfig:
    """How the engine loads and runs a model."""

    model_path: str = _help("Model id or folder (set by from_pretrained).", "")
    num_gpus: int = _help(
        "Worker processes, one per GPU (CPU workers when no GPU: at most the CPU cores "
        "unless device='cpu' is given).",
        1,
    )
    device: str | None = _help("'cuda' or 'cpu'; None: cuda when available.", None)
    executor: str = _help(
        "'mp' (worker processes, default), 'ray' (Ray actors, possibly on several nodes) or "
        "'inproc' (debugging).",
        "mp",
    )
    ray_address: str | None = _help(
        "executor='ray': the Ray cluster to join ('HOST:PORT' or 'auto'); None: $RAY_ADDRESS, "
        "else a local Ray started and stopped with the engine.",
        None,
    )
    dit_precision: str | None = _help(
        "DiT precision: fp32, bf16, fp16, or fp8 (the blocks' linear layers as float8 "
        "matmuls through torchao, on GPUs of compute capability 8.9 or newer: pip install "
        "'fastvideo[fp8]'); None: bf16 on GPU, fp32 on CPU.",
        None,
    )
    text_encoder_precision: str | None = _help(
        "Text encoder precision; None: bf16 on GPU, fp32 on CPU. 'fp8': the linear layers' "
        "weights stored in float8 (e4m3, a scale per row: about half of bf16's memory) and "
        "computed in bf16; never CPU-offloaded.",
        None,
    )
    flow_shift: float | None = _help(
        "Flow-matching sigma shift; None: the checkpoint's scheduler config.", None
    )
    scheduler: str | None = _help("'unipc' or 'euler'; None: the checkpoint's scheduler.", None)
    lora: list[str] = _help(
        "LoRA files merged into the DiT at load, each 'PATH' or 'PATH:SCALE' (diffusers/PEFT, "
        "the family's original names, kohya).",
        default_factory=list,
    )
    parallel_config: ParallelConfig = _help("Parallelism.", default_factory=ParallelConfig)
    attention_config: AttentionConfig = _help("Attention.", default_factory=AttentionConfig)
    cache_config: CacheConfig = _help("Step-cache calibrations.", default_factory=CacheConfig)
    compile_config: CompileConfig = _help("torch.compile.", default_factory=CompileConfig)
    vae_config: VAEConfig = _help("VAE settings.", default_factory=VAEConfig)
    offload_config: OffloadConfig = _help(
        "Weight placement: CPU offload, sharded weights.", default_factory=OffloadConfig
    )
    engine_config: EngineConfig = _help(
        "Queueing, batching, time-outs, limits.", default_factory=EngineConfig
    )

    # Sub-config fields read and written by their own name (config.max_batch_size).
    def __getattr__(self, name: str) -> Any:
        sub = _ROUTES.get(name)
        if sub is None:
            raise AttributeError(f"PipelineConfig has no field {name!r}")
        return getattr(getattr(self, sub), name)

    def __setattr__(self, name: str, value: Any) -> None:
        sub = _ROUTES.get(name)
        if sub is not None:
            setattr(getattr(self, sub), name, value)
        else:
            object.__setattr__(self, name, value)

    @classmethod
    def from_pretrained(cls, model: str, **overrides: Any) -> PipelineConfig:
        """Defaults for ``model`` (a registry id or a local folder) plus ``overrides``."""
        from fastvideo.models.registry import model_defaults

        _, pipeline_defaults = model_defaults(model)
        config = cls(model_path=str(model)).update(**pipeline_defaults)
        return config.update(**overrides)

    def update(self, **overrides: Any) -> PipelineConfig:
        """Set fields by name (top-level, a sub-config's own field name, or a whole
        sub-config); unknown names raise TypeError before anything is set."""
        own = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in own and key not in _ROUTES and key != "vae_precision":
                raise _unknown("PipelineConfig", key, sorted(own | set(_ROUTES)))
        for key, value in overrides.items():
            setattr(self, key, value)
        return self

    def copy(self) -> PipelineConfig:
        return copy.deepcopy(self)

    def validate(self) -> None:
        require_int("num_gpus", self.num_gpus, 1)
        if self.dit_precision is not None:
            _check_choice("dit_precision", self.dit_precision, (*PRECISIONS, "fp8"))
        if self.dit_precision == "fp8":
            self._check_fp8_dit()
        if self.text_encoder_precision is not None:
            _check_choice(
                "text_encoder_precision", self.text_encoder_precision, (*PRECISIONS, "fp8")
            )
        if self.text_encoder_precision == "fp8":
            _check_fp8_text_encoder(self.offload_config)
        _check_choice("executor", self.executor, EXECUTORS)
        if self.device is not None:
            _check_choice("device", self.device, DEVICES)
        if self.executor == "inproc" and self.num_gpus != 1:
            raise ValueError("executor='inproc' runs one rank: num_gpus must be 1")
        _check_ray_address(self.ray_address)
        if self.flow_shift is not None and (
            isinstance(self.flow_shift, bool)
            or not isinstance(self.flow_shift, (int, float))
            or not self.flow_shift > 0
        ):
            raise ValueError(f"flow_shift must be a number > 0, got {self.flow_shift!r}")
        _check_loras(self.lora)
        for name, cls in _SUBCONFIGS.items():
            sub = getattr(self, name)
            if not isinstance(sub, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(sub).__name__}")
            sub.validate()
        backend = self.attention_config.resolved_backend()
        if backend not in RING_BACKENDS and (self.parallel_config.ring_degree or 1) > 1:
            raise ValueError(
                f"attention_backend={backend!r} cannot run ring attention: use Ulysses "
                f"(ulysses_degree), not ring_degree={self.ring_degree}, or 'auto'/'sdpa'/'fa4'"
            )
        replicas = self.replicas()
        if self.num_gpus % replicas:
            raise ValueError(f"throughput_replicas={replicas} must divide num_gpus={self.num_gpus}")
        self._validate_placement(replicas)

    def _check_fp8_dit(self) -> None:
        why = None
        if self.device == "cpu":
            why = "float8 matmuls need a CUDA GPU (compute capability >= 8.9), not device='cpu'"
        elif self.lora:
            why = "LoRA deltas merge into bf16 weights, not float8 ones: not with lora="
        elif self.offload_config.dit_cpu_offload is True or self.offload_config.dit_sharded_weights:
            why = (
                "the float8 weights stay resident: not with dit_cpu_offload=True or "
                "dit_sharded_weights=True"
            )
        if why:
            raise ValueError(f"dit_precision='fp8': {why}")

    def _validate_placement(self, replicas: int) -> None:
        offload = self.offload_config
        if self.compile_config.enable_torch_compile and (
            offload.dit_sharded_weights or offload.dit_cpu_offload is True
        ):
            raise ValueError(
                "enable_torch_compile=True cannot run with dit_sharded_weights or "
                "dit_cpu_offload=True (both swap block weights between calls): turn one off"
            )
        if offload.dit_sharded_weights and self.num_gpus > 1 and replicas > 1:
            raise ValueError(
                f"dit_sharded_weights=True shards the DiT across the ranks of one request, but "
                f"parallel_mode={self.parallel_config.parallel_mode!r} may run {replicas} "
                f"replicas that each need whole weights: set parallel_mode='latency'"
            )

    def replicas(self) -> int:
        """Data-parallel replicas in throughput mode (1 when throughput mode is off)."""
        if self.parallel_config.parallel_mode == "latency":
            return 1
        return self.parallel_config.throughput_replicas or self.num_gpus


# The seed API sets the VAE precision as a keyword of the whole config too.
_ROUTES["vae_precision"] = "vae_config"
_dataclass_init = PipelineConfig.__init__


def _init(self: PipelineConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass constructor, also taking sub-config fields by their own name
    (``PipelineConfig(num_gpus=2, attention_backend="sta")``)."""
    own = {f.name for f in dataclasses.fields(PipelineConfig)}
    _dataclass_init(self, *args, **{k: v for k, v in kwargs.items() if k in own})
    self.update(**{k: v for k, v in kwargs.items() if k not in own})


PipelineConfig.__init__ = _init  # type: ignore[method-assign]


def _check_fp8_text_encoder(offload: OffloadConfig) -> None:
    if offload.text_encoder_cpu_offload is True:
        raise ValueError(
            "text_encoder_precision='fp8' keeps the text encoder on the device (it is about "
            "half the size already): not with text_encoder_cpu_offload=True"
        )


def _check_ray_address(address: Any) -> None:
    if address is None:
        return
    if not isinstance(address, str) or not address.strip():
        raise TypeError(f"ray_address must be 'HOST:PORT', 'auto' or None, got {address!r}")
    if address.startswith("ray://"):
        raise ValueError(
            f"ray_address={address!r}: Ray Client (ray://) is not supported, the workers "
            f"connect back to the driver; run the driver on a cluster node and give the "
            f"cluster's 'HOST:PORT' (or 'auto')"
        )


def _check_loras(specs: Any) -> None:
    if not isinstance(specs, (list, tuple)) or not all(isinstance(x, str) for x in specs):
        raise TypeError(f"lora must be a list of 'PATH[:SCALE]' strings, got {specs!r}")
    for spec in specs:
        path, sep, scale = spec.rpartition(":")
        if not (sep and path and _is_float(scale)):
            path = spec
        if not Path(path).expanduser().exists():
            raise ValueError(f"lora: no such file {path!r}")


def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_triple(name: str, value: Any) -> None:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(is_int(v) and v >= 1 for v in value)
    ):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")


def parse_resolution(key: Any) -> tuple[int, int, int]:
    """'480x832x81' -> (480, 832, 81) (height, width, frames)."""
    parts = str(key).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"resolution key {key!r} must look like 'HxWxF', e.g. '480x832x81'")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


@documented
@dataclass
class SamplingParam:
    """What to generate: ``generate_video(prompt, sampling_param, **overrides)``."""

    negative_prompt: str | None = _help("What to steer away from (CFG).", None)
    height: int = _help("Frame height in pixels (a multiple of the model's pixel step).", 480)
    width: int = _help("Frame width in pixels (a multiple of the model's pixel step).", 832)
    num_frames: int = _help("Frames, of the form 4k+1 for Wan.", 81)
    fps: int = _help("Frames per second of the saved video.", 16)
    num_inference_steps: int = _help("Denoising steps.", 50)
    guidance_scale: float = _help("Classifier-free guidance scale; <= 1 turns CFG off.", 5.0)
    seed: int = _help("Random seed of the initial noise.", 1024)
    output_path: str | None = _help(
        "Save the video here: a .mp4 file path, or a folder (file named after the prompt "
        "and seed); an existing file is never overwritten (a numeric suffix is added).",
        None,
    )
    output_type: str = _help("'np' for uint8 frames, 'latent' to skip VAE decoding.", "np")
    cache: str | None = _help(
        "Step cache: 'teacache' or 'magcache' skip the DiT's blocks on steps whose result "
        "they predict (lossy); None: every step computed.",
        None,
    )
    cache_thresh: float | None = _help(
        "The step cache's threshold (higher skips more); None: the model's default.", None
    )
    image: Any = _help(
        "Conditioning image for image-to-video models: a file path, a PIL image or a uint8 "
        "[H, W, 3] array; None for text-to-video.",
        None,
    )
    guidance_scale_2: float | None = _help(
        "CFG scale of the low-noise expert (Wan2.2 A14B); None: the model's default.", None
    )
    true_cfg_scale: float = _help(
        "Classifier-free guidance for models whose guidance_scale is embedded "
        "(HunyuanVideo): used when > 1 and a negative prompt is given.",
        1.0,
    )
    max_sequence_length: int | None = _help(
        "Text tokens the prompt is padded/cut to; None: the model's default.", None
    )
    num_videos_per_prompt: int = _help(
        "Videos per prompt (seeds seed, seed+1, ...); more than 1 returns a list.", 1
    )

    @classmethod
    def from_pretrained(cls, model: str, **overrides: Any) -> SamplingParam:
        from fastvideo.models.registry import model_defaults

        sampling_defaults, _ = model_defaults(model)
        return cls().update(**sampling_defaults).update(**overrides)

    def update(self, **overrides: Any) -> SamplingParam:
        """Set fields by name. ``enable_teacache=True`` / ``teacache_thresh=x`` are kept as
        spellings of ``cache='teacache'`` / ``cache_thresh=x``."""
        names = [f.name for f in dataclasses.fields(self)]
        for key in overrides:
            if key not in names and key not in ("enable_teacache", "teacache_thresh"):
                raise _unknown("SamplingParam", key, names)
        for key, value in overrides.items():
            if key == "enable_teacache":
                _check_bool("enable_teacache", value)
                if value:
                    self.cache = "teacache"
                elif self.cache == "teacache":
                    self.cache = None
            elif key == "teacache_thresh":
                self.cache_thresh = value
            else:
                setattr(self, key, value)
        return self

    def copy(self) -> SamplingParam:
        return copy.deepcopy(self)


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text (for the CLI), sub-config fields included by their name."""
    out = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    if cls is PipelineConfig:
        for sub in _SUBCONFIGS.values():
            out.update(field_help(sub))
    return out
