"""One rank's work, independent of transport: join the process group, load the pipeline
components this rank needs, run requests under their parallel plan.

The in-process executor calls it directly; the multi-process executor wraps it in a
worker process (``worker_proc.py``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fastvideo import envs
from fastvideo.distributed.plan import ParallelPlan
from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.engine.configs import PipelineConfig
from fastvideo.engine.protocol import GenerateRequest, GenerateResult
from fastvideo.kernels_bridge import attention as attention_bridge
from fastvideo.logger import init_logger
from fastvideo.models.loader import DTYPES
from fastvideo.models.registry import family_for_dir
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, ProgressFn

logger = init_logger(__name__)


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
        """Load this rank's components; returns the seconds it took."""
        start = time.perf_counter()
        family = family_for_dir(self.model_dir)
        env = PipelineRuntime(
            runtime=self.runtime,
            device=self.device,
            spec=family.read_spec(self.model_dir),
            dtypes=component_dtypes(self.config, self.device),
            options={"flow_shift": self.config.flow_shift, "scheduler": self.config.scheduler},
        )
        backend = attention_bridge.resolve_backend(
            self.config.resolved_attention_backend(), self.device, env.dtypes["transformer"]
        )
        attention_bridge.set_backend(backend)
        self.pipeline = family.pipeline_class().from_pretrained(self.model_dir, env)
        return time.perf_counter() - start

    def execute(
        self, req: GenerateRequest, progress: ProgressFn | None = None
    ) -> GenerateResult | None:
        """Run one request on this rank; the output rank (0) returns the result."""
        assert self.pipeline is not None, "load() first"
        plan = ParallelPlan(req.cfg_degree, req.ulysses_degree, req.ring_degree)
        if plan.world_size != self.world_size:
            raise ValueError(f"plan {plan.describe()} does not match {self.world_size} ranks")
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
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with self.runtime.activate(plan), _maybe_profile(self.rank, req.request_id):
            batch = self.pipeline.forward(batch, progress if self.rank == 0 else None)
        batch.timings["total"] = time.perf_counter() - start
        peaks = self._peak_memory_per_rank()
        if self.rank != 0:
            return None
        return GenerateResult(
            request_id=req.request_id,
            plan=plan.describe(),
            timings=batch.timings,
            frames=batch.frames,
            latents=batch.output_latents if req.output_type == "latent" else None,
            peak_memory_bytes=peaks,
        )

    def _peak_memory_per_rank(self) -> list[int]:
        """Peak GPU memory of this request on every rank (collective; empty on CPU)."""
        if self.device.type != "cuda":
            return []
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device)], device=self.device)
        if self.world_size == 1:
            return [int(peak.item())]
        parts = [torch.empty_like(peak) for _ in range(self.world_size)]
        dist.all_gather(parts, peak)
        return [int(p.item()) for p in parts]

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


def set_cpu_threads(world_size: int) -> None:
    """Share the machine's cores between CPU workers instead of oversubscribing them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // world_size))
