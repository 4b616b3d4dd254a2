"""Starting an engine: resolve the model, check the configuration against the machine and
the model, start the workers and the core."""

from __future__ import annotations

import importlib.util
import os
import queue
import time
from typing import Any

from fastvideo.config import RING_BACKENDS, PipelineConfig
from fastvideo.distributed.plan import choose_plan
from fastvideo.engine.core import EngineCore, EventSink, ProgressEvent
from fastvideo.engine.model_info import ModelInfo, resolve_model
from fastvideo.executor.base import create_executor
from fastvideo.logger import init_logger
from fastvideo.models.loader import readahead

logger = init_logger(__name__)

# CPU workers when the user forces device='cpu': more than the cores is allowed (tests run
# 3 ranks on 2 cores), but not without bound.
MAX_FORCED_CPU_WORKERS = 64


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(config: PipelineConfig) -> str:
    """'cuda' or 'cpu' for the workers; checks num_gpus against the devices (CPU workers:
    at most the cores, unless device='cpu' is given, then at most 64)."""
    import torch

    count = torch.cuda.device_count()  # does not create a CUDA context
    device = config.device or ("cuda" if count > 0 else "cpu")
    if device == "cuda" and config.num_gpus > count:
        visible = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
        raise ValueError(
            f"num_gpus={config.num_gpus} but {count} CUDA device(s) are visible"
            + (f": {visible}" if visible else "")
            + " (set num_gpus accordingly, or CUDA_VISIBLE_DEVICES)"
        )
    if device == "cpu":
        limit = MAX_FORCED_CPU_WORKERS if config.device == "cpu" else cpu_cores()
        if config.num_gpus > limit:
            raise ValueError(
                f"num_gpus={config.num_gpus} CPU workers but this machine has {cpu_cores()} "
                f"cores and no GPU: at most {limit}"
                + ("" if config.device == "cpu" else " (device='cpu' allows up to 64)")
            )
    return device


def check_device_options(config: PipelineConfig, device: str) -> None:
    """Options that need the device or an extra package fail here, before the workers
    load anything (the workers check the GPU's compute capability first thing)."""
    if config.offload_config.device_memory_gb is not None and device != "cuda":
        raise ValueError(
            f"device_memory_gb={config.offload_config.device_memory_gb} caps the memory of each "
            f"GPU, and this engine runs on {device}: leave it None"
        )
    if config.dit_precision != "fp8":
        return
    if device != "cuda":
        raise ValueError(
            "dit_precision='fp8' runs float8 matmuls on a CUDA GPU (compute capability 8.9 "
            "or newer) and no CUDA device is visible: use dit_precision='bf16' or run on a GPU"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(
            "dit_precision='fp8' needs torchao, which is not installed: "
            "pip install 'fastvideo[fp8]'"
        )


def check_plans(config: PipelineConfig, info: ModelInfo) -> None:
    """An impossible forced plan, or a backend that cannot run the plan, fails here."""
    backend = config.attention_config.resolved_backend()
    heads = info.spec.num_heads
    for use_cfg in (True, False):
        plan = choose_plan(config.num_gpus, heads, use_cfg, **config.parallel_config.forced())
        if plan.ring_degree > 1 and backend not in RING_BACKENDS:
            raise ValueError(
                f"attention_backend={backend!r} cannot run ring attention, and with "
                f"num_gpus={config.num_gpus} and {heads} heads the plan with guidance "
                f"{'on' if use_cfg else 'off'} is {plan.describe()}. Use a GPU count whose "
                f"Ulysses degree divides the heads (ulysses_degree=, cfg_parallel=), or "
                f"attention_backend 'auto', 'sdpa' or 'fa4'"
            )


def start_engine(
    model: str,
    num_gpus: int | None,
    pipeline_config: PipelineConfig | None,
    overrides: dict[str, Any],
) -> EngineCore:
    """Resolve the model, check the configuration, start the workers and the core.

    The worker processes are started first, on a guess of the configuration without the
    model's defaults, so their imports overlap resolving and checking here; if the final
    configuration needs other workers, they are replaced.
    """
    if pipeline_config is not None and not isinstance(pipeline_config, PipelineConfig):
        raise TypeError(
            f"pipeline_config must be a PipelineConfig, got {type(pipeline_config).__name__}"
        )
    early, spawned = _spawn_early(model, num_gpus, pipeline_config, overrides)
    try:
        info = resolve_model(model)  # once: the defaults below come from it too
        readahead(info.path)  # a cold page cache fills while the workers import
        if pipeline_config is None:
            defaults = info.variant.pipeline_defaults
            pipeline_config = PipelineConfig(model_path=model).update(**defaults)
        config = pipeline_config.copy().update(**overrides)
        if num_gpus is not None:
            config.num_gpus = num_gpus
        config.validate()
        config.model_path = str(info.path)
        check_plans(config, info)
        device = pick_device(config)
        check_device_options(config, device)
        if early != (config.executor, config.num_gpus, device):
            _stop(spawned)  # the guess was wrong (the model's defaults changed it)
        handed, spawned = spawned, []  # the executor owns them now, failing or not
        start = time.perf_counter()
        executor = create_executor(info.path, config, device, handed or None)
    except BaseException:
        _stop(spawned)
        raise
    logger.info(
        "loaded %s (%s) on %d %s worker(s) in %.1fs",
        model,
        info.variant.name,
        config.num_gpus,
        device,
        time.perf_counter() - start,
    )
    core = EngineCore(info, config, executor, device)
    if config.compile_config.enable_torch_compile and config.compile_config.compile_warmup:
        try:
            warm_up(core)
        except BaseException:
            core.shutdown()
            raise
    return core


def warm_up(core: EngineCore) -> None:
    """One denoising step at the model's default size and guidance (both CFG branches,
    latents out; a grey image for image-to-video models) before the engine is ready: the
    compiled blocks are built, or read from the on-disk cache, now rather than in the
    first request. A dead engine fails it like any request."""
    import numpy as np

    start = time.perf_counter()
    param = core.default_sampling_param.update(num_inference_steps=1, output_type="latent", seed=0)
    if core.info.spec.image_input == "required":
        param.image = np.full((param.height, param.width, 3), 128, dtype=np.uint8)
    events: queue.Queue[object] = queue.Queue()
    sink = EventSink(events.put)
    core.submit(core.new_request("warm-up", param, sink, request_id="warm-up", save=False))
    while isinstance(outcome := events.get(), ProgressEvent):
        pass
    if isinstance(outcome, BaseException):
        raise RuntimeError(f"the start-up compile (one warm-up step) failed: {outcome}") from (
            outcome
        )
    logger.info("compiled at start-up: one warm-up step at %dx%dx%d took %.1fs",
                param.height, param.width, param.num_frames,
                time.perf_counter() - start)  # fmt: skip


def _spawn_early(
    model: str,
    num_gpus: int | None,
    pipeline_config: PipelineConfig | None,
    overrides: dict[str, Any],
) -> tuple[tuple[str, int, str] | None, list]:
    """Worker processes for the configuration as the caller gave it (executor, count,
    device), or none where that guess is unusable (the real checks then say why)."""
    try:
        guess = (pipeline_config or PipelineConfig(model_path=model)).copy().update(**overrides)
        if num_gpus is not None:
            guess.num_gpus = num_gpus
        if guess.executor == "inproc":
            return None, []
        key = (guess.executor, guess.num_gpus, pick_device(guess))
    except Exception:  # noqa: BLE001 - the real configuration path reports it
        return None, []
    from fastvideo.executor.multiproc import spawn_workers

    return key, spawn_workers(guess.num_gpus, key[2], guess.attention_config.resolved_backend())


def _stop(spawned: list) -> None:
    """End early workers no executor took (an executor that took them owns them)."""
    if spawned:
        from fastvideo.executor.multiproc import stop_spawned

        stop_spawned(spawned)
        spawned.clear()
