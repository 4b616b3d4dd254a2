"""One rank's work, independent of transport: join the process group, load the pipeline
components this rank needs, run batches under their parallel plan.

The in-process executor calls it directly; the worker process (``main.py``) wraps it
behind ZeroMQ sockets.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fastvideo import envs
from fastvideo.config import CompileConfig, PipelineConfig
from fastvideo.distributed.plan import ParallelPlan, candidate_plans
from fastvideo.distributed.runtime import GroupView, ParallelRuntime, indexed
from fastvideo.kernels_bridge import attention as attention_bridge
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.fp8 import check_fp8_matmul_device, store_linears_in_fp8
from fastvideo.layers.offload import (
    OffloadPlan,
    cap_device_memory,
    free_memory_bytes,
    modules_of,
    plan_offload,
    total_memory_bytes,
    unwrapped,
)
from fastvideo.logger import init_logger
from fastvideo.models.loader import DTYPES, WeightSource, checkpoint_files, reading_from
from fastvideo.models.lora import LoraManager, parse_lora_arg
from fastvideo.models.registry import family_for_dir
from fastvideo.models.weight_reader import WeightReader
from fastvideo.pipelines.base import (
    CompileSettings,
    ComposedPipelineBase,
    ForwardBatch,
    MemorySettings,
    PipelineRuntime,
    PipelineSettings,
    StepControl,
)
from fastvideo.wire.messages import BatchResult, GenerateBatch
from fastvideo.wire.spec import ModelSpec
from fastvideo.wire.validation import uses_cfg

logger = init_logger(__name__)

# A hook run at every denoising step boundary (plugins: e.g. test fault injection).
StepHook = Callable[[ForwardBatch, int], None]


def sta_config(config: PipelineConfig, spec: ModelSpec) -> STAConfig:
    """The STA tile and windows with resolutions turned into this model's token grids."""
    attention = config.attention_config
    windows = attention.sta_windows()
    tile = tuple(attention.sta_tile_size)
    if not isinstance(windows, dict):
        return STAConfig(tile=tile, default_window=windows)  # type: ignore[arg-type]
    pt, ph, pw = spec.patch_size
    by_grid = []
    for (height, width, frames), window in windows.items():
        grid = (
            spec.latent_frames(frames) // pt,
            height // spec.vae_scale_spatial // ph,
            width // spec.vae_scale_spatial // pw,
        )
        by_grid.append((grid, tuple(window)))
    return STAConfig(tile=tile, windows=tuple(by_grid))  # type: ignore[arg-type]


def use_compile_cache(compile_config: CompileConfig) -> None:
    """torch.compile's on-disk caches on, in ``compile_config``'s folder (kept across
    restarts: a restarted engine reads its compiled blocks instead of compiling them).
    Sets TORCHINDUCTOR_CACHE_DIR in this process; one the user set is kept unless
    ``compile_cache_dir`` names another folder."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if compile_config.compile_cache_dir is not None or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = compile_config.cache_path()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    logger.info("torch.compile cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])


def component_dtypes(config: PipelineConfig, device: torch.device) -> dict[str, torch.dtype]:
    """Precision per component: as configured, else bf16 on GPU and fp32 on CPU (VAE fp32)."""
    default = "bf16" if device.type == "cuda" else "fp32"
    text = config.text_encoder_precision or default
    dit = config.dit_precision or default
    return {
        "transformer": DTYPES["bf16" if dit == "fp8" else dit],  # fp8: quantised after load
        "text_encoder": DTYPES["bf16" if text == "fp8" else text],  # fp8: stored after load
        "vae": DTYPES[config.vae_config.vae_precision or "fp32"],
    }


def pipeline_settings(
    config: PipelineConfig,
    spec: ModelSpec,
    backend: str,
    memory: MemorySettings | None = None,
) -> PipelineSettings:
    """The typed settings the pipelines read, from the engine's config (``memory``: this
    rank's placement, see :meth:`Worker.memory_settings`)."""
    compile_cfg = config.compile_config
    caches = {n: getattr(config.cache_config, n) for n in config.cache_config.calibrated()}
    return PipelineSettings(
        flow_shift=config.flow_shift,
        sampler=config.scheduler,
        attention_backend=backend,
        sta=sta_config(config, spec),
        compile=CompileSettings(compile_cfg.torch_compile_backend, compile_cfg.torch_compile_mode)
        if compile_cfg.enable_torch_compile
        else None,
        caches=caches,
        dit_fp8=config.dit_precision == "fp8",
        limits=config.engine_config.limits(),
        memory=memory or MemorySettings(),
    )


def offload_option(name: str, config: PipelineConfig) -> bool | str | None:
    """The offload field that governs component ``name`` (None: not a weight component)."""
    offload = config.offload_config
    if name.startswith("transformer"):
        return offload.dit_cpu_offload
    if name.startswith("text_encoder"):  # float8 weights stay on the device
        return False if config.text_encoder_precision == "fp8" else offload.text_encoder_cpu_offload
    if name.startswith("image_encoder"):
        return offload.image_encoder_cpu_offload
    if name == "vae":
        return offload.vae_cpu_offload
    return None


def component_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes of a component's weights at ``dtype``, from its safetensors headers alone."""
    from safetensors import safe_open

    try:
        where = checkpoint_files(folder)
    except Exception:  # no weights here (a scheduler or tokenizer folder)
        return 0
    numel = 0
    for path in set(where.values()):
        try:
            with safe_open(str(path), framework="pt") as f:
                numel += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except Exception:  # missing or corrupt: the loader reports it, naming the file
            continue
    return numel * dtype.itemsize


def component_dtype(name: str, dtypes: dict[str, torch.dtype]) -> torch.dtype:
    if name.startswith("transformer"):
        return dtypes["transformer"]
    return dtypes["vae"] if name == "vae" else dtypes["text_encoder"]


@dataclass(frozen=True)
class _LoadPlan:
    spec: ModelSpec
    plans: list[ParallelPlan]
    leads: bool  # may lead a replica: loads the output-rank components too
    pipeline_cls: type[ComposedPipelineBase]


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
        self.device = device = indexed(device)
        self.model_dir = Path(model_dir)
        self.config = config
        self.pipeline = None
        self.runtime = ParallelRuntime(rank, world_size, device)
        self.step_hooks: list[StepHook] = []
        self.store: dist.Store | None = None
        self.loras: dict[str, LoraManager] = {}  # DiT component name -> its LoRAs
        self.breakdown: dict[str, float] = {}  # start-up seconds by part (WorkerReady)
        self._load_plan: _LoadPlan | None = None
        self._memory_settings: MemorySettings | None = None
        self._source: WeightSource | None = None

    def load_plugins(self, modules: list[str]) -> None:
        """Import each plugin module; call its ``register(worker)`` when it has one."""
        for name in modules:
            module = importlib.import_module(name)
            register = getattr(module, "register", None)
            if register is not None:
                register(self)
            logger.info("rank %d: loaded plugin %s", self.rank, name)

    def init_distributed(self, store: dist.Store | None, timeout_s: float = 1800) -> None:
        """Join the process group through ``store`` (NCCL on GPU, gloo on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size == 1:
            return
        assert store is not None, "several ranks need a rendezvous store"
        self.store = store
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        start = time.perf_counter()
        dist.init_process_group(
            backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.breakdown["init_process_group"] = time.perf_counter() - start

    def _plan_load(self) -> _LoadPlan:
        """What this rank loads (pure: configs and the family's files; no device work)."""
        if self._load_plan is None:
            family = family_for_dir(self.model_dir)
            spec = family.read_spec(self.model_dir)
            plans = candidate_plans(
                self.world_size,
                spec.num_heads,
                throughput_replicas=self.config.replicas(),
                forced=self.config.parallel_config.forced(),
            )
            # Text encoder and VAE only where this rank can lead a replica (rank 0 always).
            leads = self.rank == 0 or any(self.rank % p.replica_size == 0 for p in plans)
            self._load_plan = _LoadPlan(spec, plans, leads, family.pipeline_class())
        return self._load_plan

    def start_reading(self) -> None:
        """Start reading this rank's weights onto its device in the background, so the
        reads overlap joining the process group and building the modules."""
        if self._source is not None:
            return
        start = time.perf_counter()
        # Before anything is allocated or planned on the device.
        cap_device_memory(self.device, self.config.offload_config.device_memory_gb)
        # FA4's import (seconds) overlaps the reads; the backend probe then finds it done.
        attention_bridge.preload(self.config.attention_config.resolved_backend(), self.device)
        plan = self._plan_load()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 8
        threads = max(2, min(8, cores // max(1, min(self.world_size, 8))))
        self._source = WeightSource(WeightReader(self.device, threads=threads))
        folders = plan.pipeline_cls.weight_folders(self.model_dir, plan.leads)
        if self.config.offload_config.dit_sharded_weights:
            folders = []  # shards are read on the host, then split (and their groups are
            # collective: the memory plan waits for the process group)
        else:  # components placed in host memory are read there by their loaders
            memory = self._memory(plan, component_dtypes(self.config, self.device))
            folders = [f for f in folders if not memory.loads_on_host(f.name)]
        self._source.prefetch(folders)
        self.breakdown["start_reading"] = time.perf_counter() - start

    def _memory(self, plan: _LoadPlan, dtypes: dict[str, torch.dtype]) -> MemorySettings:
        """This rank's placement, decided once (see ``memory_settings``)."""
        if self._memory_settings is None:
            self._memory_settings = self.memory_settings(
                plan.plans, plan.leads, plan.pipeline_cls, dtypes, plan.spec.num_layers
            )
        return self._memory_settings

    def load(self) -> float:
        """Load this rank's components and create every plan's process groups; returns the
        seconds it took (``breakdown`` gets the parts)."""
        start = time.perf_counter()
        if self.config.dit_precision == "fp8":  # before reading anything
            check_fp8_matmul_device(self.device)
        if self.config.compile_config.enable_torch_compile:
            use_compile_cache(self.config.compile_config)
        self.start_reading()
        plan = self._plan_load()
        dtypes = component_dtypes(self.config, self.device)
        mark = time.perf_counter()
        backend = attention_bridge.resolve_backend(
            self.config.attention_config.resolved_backend(), self.device, dtypes["transformer"]
        )
        self.breakdown["backend_probe"] = time.perf_counter() - mark
        mark = time.perf_counter()
        self.runtime.prepare(plan.plans)
        self.breakdown["process_groups"] = time.perf_counter() - mark
        memory = self._memory(plan, dtypes)
        env = PipelineRuntime(
            runtime=self.runtime,
            device=self.device,
            spec=plan.spec,
            dtypes=dtypes,
            settings=pipeline_settings(self.config, plan.spec, backend, memory),
        )
        mark = time.perf_counter()
        assert self._source is not None
        try:
            with reading_from(self._source):
                self.pipeline = plan.pipeline_cls.from_pretrained(
                    self.model_dir, env, output_rank=plan.leads
                )
        finally:
            reader = self._source.reader
            self._source.close()
            self._source = None
        self.breakdown["components"] = time.perf_counter() - mark
        self.breakdown.update(self.pipeline.load_timings)
        if self.config.text_encoder_precision == "fp8":
            mark = time.perf_counter()
            for name, component in self.pipeline.components.items():
                if name.startswith("text_encoder"):
                    for module in modules_of(unwrapped(component)):
                        store_linears_in_fp8(module)
            self.breakdown["text_encoder_fp8"] = time.perf_counter() - mark
        self.breakdown["weights_read"] = reader.busy_s
        self.breakdown["weights_gb"] = reader.bytes_read / 1e9
        for spec in self.config.lora:
            path, scale = parse_lora_arg(spec)
            self.control("lora_load", {"path": path, "scale": scale, "name": None})
        vae = unwrapped(self.pipeline.components.get("vae"))
        if self.config.vae_config.vae_tiling is True and hasattr(vae, "enable_tiling"):
            vae.enable_tiling(memory.tile_sizes)  # encodes (image-to-video) tile too
        return time.perf_counter() - start

    def control(self, op: str, args: dict) -> dict[str, float]:
        """Change the loaded model between batches (every rank runs the same commands in
        the same order). LoRA ops apply to each DiT the pipeline names in lora_targets."""
        assert self.pipeline is not None, "load() first"
        if op == "lora_list":
            first = next(iter(self.loras.values()), None)
            return first.loaded() if first is not None else {}
        targets = getattr(self.pipeline, "lora_targets", ("transformer",))
        managers = [self._lora_manager(t) for t in targets if t in self.pipeline.components]
        if not managers:
            raise ValueError("this model has no DiT to load LoRAs into")
        if op == "lora_load":
            name = args.get("name")
            for manager in managers:
                name = manager.load(str(args["path"]), float(args["scale"]), name)
            return {}
        if op == "lora_set_scale":
            for manager in managers:
                manager.set_scale(str(args["name"]), float(args["scale"]))
            return {}
        if op == "lora_unload":
            for manager in managers:
                manager.unload(str(args["name"]))
            return {}
        raise ValueError(f"unknown control op {op!r}")

    def _lora_manager(self, component: str) -> LoraManager:
        if self.config.offload_config.dit_sharded_weights:
            raise ValueError("LoRAs cannot be merged into sharded DiT weights")
        if self.config.dit_precision == "fp8":
            raise ValueError("LoRAs cannot be merged into float8 DiT weights (dit_precision='fp8')")
        if component not in self.loras:
            self.loras[component] = LoraManager(unwrapped(self.pipeline.components[component]))
        return self.loras[component]

    # --- placement -----------------------------------------------------------------------
    def memory_settings(
        self,
        plans: list[ParallelPlan],
        leads: bool,
        pipeline_cls: type[ComposedPipelineBase],
        dtypes: dict[str, torch.dtype],
        num_layers: int,
    ) -> MemorySettings:
        """This rank's placement: which components it loads, what is offloaded or sharded,
        and how the VAE decodes. Collective (creates the shard groups) when sharding."""
        vae_cfg = self.config.vae_config
        loaders, output_only = pipeline_cls.component_loaders, pipeline_cls.output_rank_components
        # Parallel decode needs the VAE on every rank of a replica; worth it only where a
        # replica has several ranks and tiling may happen.
        parallel = (
            vae_cfg.vae_parallel_decode
            and vae_cfg.vae_tiling is not False
            and "vae" in loaders
            and max(p.replica_size for p in plans) > 1
        )
        every = ("vae",) if parallel and "vae" in output_only else ()
        mine = [n for n in loaders if n not in output_only or leads or n in every]
        shard_group = None
        if self.config.offload_config.dit_sharded_weights:
            shard_group = self._shard_group(plans)
        sharded = tuple(n for n in mine if n.startswith("transformer")) if shard_group else ()
        offload = self._plan_offload(mine, sharded, shard_group, dtypes, num_layers)
        return MemorySettings(
            vae_tiling=vae_cfg.vae_tiling,
            tile_sizes=vae_cfg.tile_sizes(),
            vae_parallel_decode=parallel,
            every_rank_components=every,
            host_components=offload.whole,
            layerwise_components=offload.layerwise,
            sharded_components=sharded,
            shard_group=shard_group,
        )

    def _plan_offload(
        self,
        names: list[str],
        sharded: tuple[str, ...],
        shard_group: GroupView | None,
        dtypes: dict[str, torch.dtype],
        num_layers: int,
    ) -> OffloadPlan:
        """Offload choices from the options, the weights' sizes and the free memory."""
        requested: dict[str, bool | str] = {}
        sizes: dict[str, int] = {}
        for name in names:
            option = offload_option(name, self.config)
            if option is None:
                continue
            size = component_bytes(self.model_dir / name, component_dtype(name, dtypes))
            if not size:
                continue
            if name in sharded:  # a shard is this rank's share; sharding excludes offload
                size //= shard_group.size if shard_group is not None else 1
                option = False
            # On a CPU device the host *is* the device: 'auto' never offloads there; nor a
            # compiled DiT (the offload hooks would run inside the compiled blocks).
            compiled = self.config.compile_config.enable_torch_compile
            if option == "auto" and (
                self.device.type != "cuda" or (compiled and name.startswith("transformer"))
            ):
                option = False
            requested[name], sizes[name] = option, size
        headroom_gb = self.config.offload_config.offload_headroom_gb
        total = total_memory_bytes(self.device)
        headroom = (
            int(headroom_gb * (1 << 30)) if headroom_gb is not None else max(2 << 30, total // 7)
        )
        layerwise = {n for n in sizes if n.startswith("transformer")}
        # A layerwise-offloaded DiT keeps two blocks and its non-block weights resident.
        plan = plan_offload(
            requested, sizes, free_memory_bytes(self.device), headroom, layerwise,
            resident_fraction=min(1.0, 2 / max(1, num_layers) + 0.05),
        )  # fmt: skip
        logger.info("rank %d memory plan: %s", self.rank, plan.summary)
        return plan

    def _shard_group(self, plans: list[ParallelPlan]) -> GroupView | None:
        """The ranks that share one copy of the DiT blocks: the largest groups of
        consecutive ranks inside one sequence-parallel group in every plan. Collective."""
        if self.world_size == 1:
            return None
        size = math.gcd(*(p.sp_degree for p in plans))
        if size == 1:
            described = ", ".join(p.describe() for p in plans)
            raise ValueError(
                f"dit_sharded_weights=True needs ranks that run the same sequence in every "
                f"plan, but with num_gpus={self.world_size} the plans are {described} (CFG-"
                f"parallel gives each rank a whole sequence): set cfg_parallel=False"
            )
        mine = None
        for start in range(0, self.world_size, size):
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks)  # every rank creates every group, in this order
            if self.rank in ranks:
                mine = GroupView(group, tuple(ranks), ranks.index(self.rank))
        assert mine is not None
        logger.info("rank %d: DiT blocks sharded across ranks %s", self.rank, mine.ranks)
        return mine

    def execute(self, msg: GenerateBatch, control: StepControl) -> BatchResult | None:
        """Run one batch on this rank; its replica's leader returns the result."""
        assert self.pipeline is not None, "load() first"
        plan = msg.plan
        if plan.world_size != self.world_size or self.rank not in plan.replica_ranks(msg.replica):
            raise ValueError(
                f"plan {plan.describe()} (replica {msg.replica}) does not fit rank {self.rank} "
                f"of {self.world_size}"
            )
        spec = self.pipeline.env.spec
        do_cfg = any(uses_cfg(spec, item) for item in msg.items)
        batch = ForwardBatch(batch_id=msg.batch_id, items=list(msg.items), do_cfg=do_cfg)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with self.runtime.activate(plan) as groups, _maybe_profile(self.rank, msg.batch_id):
            leader = groups.leader == self.rank
            batch = self.pipeline.forward(batch, control)
            batch.timings["total"] = time.perf_counter() - start
            peaks = self._peak_memory_per_rank(groups.replica)
        if not leader:
            return None
        return BatchResult(
            batch_id=msg.batch_id,
            plan=plan.describe(),
            timings=batch.timings,
            frames=batch.frames,
            latents=batch.output_latents
            if batch.items and batch.first.output_type == "latent"
            else None,
            peak_memory_bytes=peaks,
            item_ids=batch.item_ids,
            aborted_ids=batch.aborted,
            failures=batch.failures,
            stats=batch.stats,
        )

    def run_step_hooks(self, batch: ForwardBatch, step: int) -> None:
        for hook in self.step_hooks:
            hook(batch, step)

    def _peak_memory_per_rank(self, replica: GroupView) -> list[int]:
        """Peak GPU memory of this batch on every rank of the replica (empty on CPU)."""
        if self.device.type != "cuda":
            return []
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device)], device=self.device)
        gathered = self.runtime.all_gather(replica, peak, dim=0)
        return [int(p) for p in gathered.tolist()]

    def memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return 0

    @staticmethod
    def host_rss_bytes() -> int:
        """Peak resident host memory of this process so far (at load: the weights read,
        plus the runtime)."""
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def close(self) -> None:
        if self._source is not None:  # start_reading() without load()
            self._source.close()
            self._source = None
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _maybe_profile(rank: int, batch_id: str) -> Iterator[None]:
    """Profile the batch on rank 0 when FASTVIDEO_TORCH_PROFILE_DIR is set."""
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
    path = Path(out_dir) / f"profile-rank{rank}-{batch_id[:16]}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    logger.info("wrote %s", path)


_ONE_CPU_THREAD = False


def keep_one_cpu_thread() -> None:
    """For a worker forked from the driver: torch's CPU ops on one thread from now on (GNU
    OpenMP's pool does not survive a fork; a child that asks it for more threads hangs)."""
    global _ONE_CPU_THREAD
    _ONE_CPU_THREAD = True
    torch.set_num_threads(1)


def set_cpu_threads(world_size: int) -> None:
    """Share the machine's cores between CPU workers instead of oversubscribing them (a
    forked worker stays on the one thread ``keep_one_cpu_thread`` gave it)."""
    if _ONE_CPU_THREAD:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // world_size))
