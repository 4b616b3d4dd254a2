"""One rank's work, independent of transport: join the process group, load the pipeline
components this rank needs, run requests under their parallel plan.

The in-process executor calls it directly; the multi-process executor wraps it in a
worker process (``worker_proc.py``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fastvideo import envs
from fastvideo.distributed.plan import ParallelPlan, candidate_plans
from fastvideo.distributed.runtime import GroupView, ParallelRuntime
from fastvideo.engine.configs import PipelineConfig
from fastvideo.engine.protocol import GenerateRequest, GenerateResult
from fastvideo.kernels_bridge import attention as attention_bridge
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.logger import init_logger
from fastvideo.models.loader import DTYPES
from fastvideo.models.registry import family_for_dir
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, ProgressFn

logger = init_logger(__name__)


def sta_config(config: PipelineConfig, spec) -> STAConfig:
    """The STA tile and windows with resolutions turned into this model's token grids."""
    windows = config.sta_windows()
    if not isinstance(windows, dict):
        return STAConfig(tile=tuple(config.sta_tile_size), default_window=windows)
    pt, ph, pw = spec.patch_size
    by_grid = []
    for (height, width, frames), window in windows.items():
        latent_frames = (frames - 1) // spec.vae_scale_temporal + 1
        grid = (
            latent_frames // pt,
            height // spec.vae_scale_spatial // ph,
            width // spec.vae_scale_spatial // pw,
        )
        by_grid.append((grid, tuple(window)))
    return STAConfig(tile=tuple(config.sta_tile_size), windows=tuple(by_grid))


def _teacache_calibration(config: PipelineConfig) -> dict | None:
    if config.teacache_coefficients is None:
        return None
    return {
        "coefficients": tuple(config.teacache_coefficients),
        "warmup_steps": config.teacache_warmup_steps,
    }


def _compile_options(config: PipelineConfig) -> dict | None:
    if not config.enable_torch_compile:
        return None
    return {"backend": config.torch_compile_backend, "mode": config.torch_compile_mode}


def component_dtypes(config: PipelineConfig, device: torch.device) -> dict[str, torch.dtype]:
    """Precision per component: as configured, else bf16 on GPU and fp32 on CPU (VAE fp32)."""
    default = "bf16" if device.type == "cuda" else "fp32"
    return {
        "transformer": DTYPES[config.dit_precision or default],
        "text_encoder": DTYPES[config.text_encoder_precision or default],
        "vae": DTYPES[config.vae_config.vae_precision or "fp32"],
    }


class Worker:
    """Runs the pipeline on one rank."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        model_dir: Path,
        config: PipelineConfig,
    ):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.model_dir = Path(model_dir)
        self.config = config
        self.pipeline = None
        self.runtime = ParallelRuntime(rank, world_size, device)
        # Item ids whose abort was requested (the host loop installs a real source).
        self.abort_source: Callable[[], set[str]] = set

    def init_distributed(self, store_host: str, store_port: int, timeout_s: float = 1800) -> None:
        """Join the process group through the driver's TCPStore (NCCL on GPU, gloo on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size == 1:
            return
        store = dist.TCPStore(
            store_host, store_port, is_master=False, timeout=timedelta(seconds=timeout_s)
        )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def load(self) -> float:
        """Load this rank's components and create every plan's process groups; returns the
        seconds it took."""
        start = time.perf_counter()
        family = family_for_dir(self.model_dir)
        spec = family.read_spec(self.model_dir)
        dtypes = component_dtypes(self.config, self.device)
        backend = attention_bridge.resolve_backend(
            self.config.resolved_attention_backend(), self.device, dtypes["transformer"]
        )
        env = PipelineRuntime(
            runtime=self.runtime,
            device=self.device,
            spec=spec,
            dtypes=dtypes,
            options={
                "flow_shift": self.config.flow_shift,
                "scheduler": self.config.scheduler,
                "teacache": _teacache_calibration(self.config),
                "compile": _compile_options(self.config),
                "attention": (backend, sta_config(self.config, spec)),
            },
        )
        plans = candidate_plans(
            self.world_size,
            spec.num_heads,
            throughput_replicas=self.config.replicas(),
            forced=self.config.plan_kwargs(),
        )
        self.runtime.prepare(plans)
        # Text encoder and VAE only where this rank can lead a replica (rank 0 always).
        leads = self.rank == 0 or any(self.rank % p.replica_size == 0 for p in plans)
        pipeline_cls = family.pipeline_class()
        self.pipeline = pipeline_cls.from_pretrained(self.model_dir, env, output_rank=leads)
        return time.perf_counter() - start

    def execute(
        self, req: GenerateRequest, progress: ProgressFn | None = None
    ) -> GenerateResult | None:
        """Run one request on this rank; its replica's leader returns the result."""
        assert self.pipeline is not None, "load() first"
        plan = ParallelPlan(req.cfg_degree, req.ulysses_degree, req.ring_degree, req.dp_degree)
        if plan.world_size != self.world_size or self.rank not in plan.replica_ranks(req.replica):
            raise ValueError(
                f"plan {plan.describe()} (replica {req.replica}) does not fit rank {self.rank} "
                f"of {self.world_size}"
            )
        batch = ForwardBatch(
            request_id=req.request_id,
            prompts=list(req.prompts),
            negative_prompts=list(req.negative_prompts),
            seeds=list(req.seeds),
            guidance_scales=list(req.guidance_scales),
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=req.num_inference_steps,
            output_type=req.output_type,
            teacache_thresh=req.teacache_thresh,
            item_ids=list(req.item_ids)
            or [f"{req.request_id}:{i}" for i in range(len(req.prompts))],
            step_hook=self._step_hook,
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with self.runtime.activate(plan) as groups, _maybe_profile(self.rank, req.request_id):
            leader = groups.leader == self.rank
            batch = self.pipeline.forward(batch, progress if leader else None)
            batch.timings["total"] = time.perf_counter() - start
            peaks = self._peak_memory_per_rank(groups.replica)
        if not leader:
            return None
        return GenerateResult(
            request_id=req.request_id,
            plan=plan.describe(),
            timings=batch.timings,
            frames=batch.frames,
            latents=batch.output_latents if req.output_type == "latent" else None,
            peak_memory_bytes=peaks,
            item_ids=batch.item_ids,
            aborted_ids=batch.aborted,
            failures=batch.failures,
            stats=batch.stats,
        )

    def _step_hook(self, batch: ForwardBatch, step: int) -> ForwardBatch:
        """At a step boundary, drop items that were aborted or whose latents hold NaN/inf.

        Every rank of the replica must drop the same items at the same step, so the
        leader's abort decisions and every rank's NaN checks are combined with one small
        all-reduce.
        """
        groups = self.runtime.groups
        n = batch.batch_size
        flags = torch.zeros(2, n, device=self.device)
        if groups.leader == self.rank:
            requested = self.abort_source()
            flags[0] = torch.tensor([float(i in requested) for i in batch.item_ids])
        _inject_test_fault(batch, step)
        if batch.latents is not None:
            flags[1] = (~torch.isfinite(batch.latents)).flatten(1).any(dim=1).float()
        self.runtime.all_reduce_max_(groups.replica, flags)
        aborted, bad = flags.bool().tolist()
        if not any(aborted) and not any(bad):
            return batch
        for i, item in enumerate(batch.item_ids):
            if aborted[i]:
                batch.aborted.append(item)
            elif bad[i]:
                batch.failures[item] = f"non-finite (NaN/inf) latents at step {step}"
        keep = [i for i in range(n) if not aborted[i] and not bad[i]]
        logger.info(
            "request %s: %d item(s) left the batch at step %d",
            batch.request_id,
            n - len(keep),
            step,
        )
        return batch.select(keep)

    def _peak_memory_per_rank(self, replica: GroupView) -> list[int]:
        """Peak GPU memory of this request on every rank of the replica (empty on CPU)."""
        if self.device.type != "cuda":
            return []
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device)], device=self.device)
        gathered = self.runtime.all_gather(replica, peak, dim=0)
        return [int(p) for p in gathered.tolist()]

    def memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _maybe_profile(rank: int, request_id: str) -> Iterator[None]:
    """Profile the request on rank 0 when FASTVIDEO_TORCH_PROFILE_DIR is set."""
    out_dir = envs.torch_profile_dir()
    if out_dir is None or rank != 0:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
    path = Path(out_dir) / f"profile-rank{rank}-{request_id[:8]}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    logger.info("wrote %s", path)


def _inject_test_fault(batch: ForwardBatch, step: int) -> None:
    """Test-only: FASTVIDEO_TEST_FAULT="nan:<marker>" makes the latents of items whose
    prompt contains <marker> NaN at step 1 (exercises per-request failure isolation)."""
    fault = envs.test_fault()
    if not fault or not fault.startswith("nan:") or step != 1 or batch.latents is None:
        return
    marker = fault.removeprefix("nan:")
    for i, prompt in enumerate(batch.prompts):
        if marker in prompt:
            batch.latents[i] = float("nan")


def set_cpu_threads(world_size: int) -> None:
    """Share the machine's cores between CPU workers instead of oversubscribing them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // world_size))
