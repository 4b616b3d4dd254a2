"""Composable pipelines: a pipeline is a list of stages run in order over a ForwardBatch.

A model family writes a short pipeline file that names its components, how to load each
one, and which stages to run; the stages themselves live in ``pipelines/stages`` and are
shared across families. Pipelines know models only through ``ModelSpec`` and the small
interfaces the stages declare (``stages/denoising.py``'s ``Denoiser``, the text encoder
callable), never a family's classes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fastvideo.cache.base import StepCache
from fastvideo.distributed.runtime import GroupView, ParallelRuntime
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.offload import HOST, LayerwiseOffload, OnDemand
from fastvideo.layers.sequence import SequenceShard, TokenGrid
from fastvideo.layers.sharded import ShardedBlocks
from fastvideo.layers.vae_tiling import TileSizes
from fastvideo.logger import init_logger
from fastvideo.wire.messages import RequestItem
from fastvideo.wire.spec import ModelSpec
from fastvideo.wire.validation import RequestLimits

logger = init_logger(__name__)


class StepControl(Protocol):
    """What the host (the worker) lets a running request see: where to report progress
    and which of its items were asked to stop. Called only at stage and step boundaries."""

    def progress(self, stage: str, step: int, total: int) -> None: ...

    def abort_requested(self) -> set[str]:
        """Item ids whose abort has arrived (read at every denoising step boundary)."""
        ...

    def at_step(self, batch: ForwardBatch, step: int) -> None:
        """Called at every denoising step boundary before the collective check (a hook for
        plugins, e.g. test fault injection; a no-op in production)."""
        ...


class NullControl:
    """A StepControl that reports nothing and never aborts (direct pipeline use)."""

    def progress(self, stage: str, step: int, total: int) -> None:
        pass

    def abort_requested(self) -> set[str]:
        return set()

    def at_step(self, batch: ForwardBatch, step: int) -> None:
        pass


@dataclass
class ForwardBatch:
    """One batch of items moving through the stages (B = len(items)); the items share
    height, width, frames, steps, output type and cache (``wire.validation.batch_key``)."""

    batch_id: str
    items: list[RequestItem]
    do_cfg: bool = False  # conditional and unconditional passes (the same for every item)
    # Items that left the batch: aborted ids, and failed id -> reason.
    aborted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    # Filled in by the stages. The DiT's inputs per pass, batch first (e.g. Wan: "text"
    # [B, Lt, Dt]; image-to-video adds "image"); the negative ones only with CFG.
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    # Other per-item tensors of a family's stages (batch first), kept in step on select().
    item_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scheduler: Any = None
    timesteps: torch.Tensor | None = None  # [steps]
    grid: TokenGrid | None = None
    shard: SequenceShard | None = None
    latents: torch.Tensor | None = None  # this rank's tokens [B, L_shard, P*C], fp32
    output_latents: torch.Tensor | None = None  # [B, C, F, H, W] fp32 (output rank)
    frames: torch.Tensor | None = None  # uint8 [B, T, H, W, 3] (output rank)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # counters (cache skips, ...)
    step_cache: StepCache | None = None  # the request's step cache while denoising

    @property
    def batch_size(self) -> int:
        return len(self.items)

    @property
    def first(self) -> RequestItem:
        """The item whose shared fields (size, frames, steps, ...) the batch uses."""
        return self.items[0]

    @property
    def item_ids(self) -> list[str]:
        return [item.request_id for item in self.items]

    def select(self, keep: list[int]) -> ForwardBatch:
        """Keep only items ``keep`` (in order) in the items, every per-item tensor and the
        scheduler's and step cache's state."""
        self.items = [self.items[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device))

        for tensors in (self.conditioning, self.negative_conditioning, self.item_tensors):
            for name, tensor in tensors.items():
                tensors[name] = pick(tensor)
        if self.latents is not None:
            self.latents = pick(self.latents)
        if self.scheduler is not None:
            self.scheduler.select_batch(index)
        if self.step_cache is not None:
            self.step_cache.select(index)
        return self


@dataclass(frozen=True)
class CompileSettings:
    backend: str = "inductor"
    mode: str | None = None


@dataclass(frozen=True)
class MemorySettings:
    """Where this rank keeps each component's weights and how it decodes (resolved on the
    worker from ``vae_config`` and ``offload_config``)."""

    vae_tiling: bool | str = False  # True, False or "auto" (tile when memory is short)
    tile_sizes: TileSizes = field(default_factory=TileSizes)
    vae_parallel_decode: bool = False  # a tiled decode is split across the replica's ranks
    # Output-rank components every rank loads too (the VAE, for parallel decode).
    every_rank_components: tuple[str, ...] = ()
    host_components: tuple[str, ...] = ()  # in host memory, on the device only while used
    layerwise_components: tuple[str, ...] = ()  # DiTs streamed to the device block by block
    sharded_components: tuple[str, ...] = ()  # DiTs whose blocks are sharded over shard_group
    shard_group: GroupView | None = None

    def loads_on_host(self, name: str) -> bool:
        """Whether ``name`` is read into host memory (then placed) rather than the device."""
        return name in (
            *self.host_components,
            *self.layerwise_components,
            *(self.sharded_components if self.shard_group is not None else ()),
        )


@dataclass(frozen=True)
class PipelineSettings:
    """The engine options the pipelines and loaders use (typed, from PipelineConfig)."""

    flow_shift: float | None = None
    sampler: str | None = None  # "unipc", "euler" or None (the checkpoint's)
    attention_backend: str = "sdpa"  # resolved on this rank
    sta: STAConfig | None = None
    compile: CompileSettings | None = None
    caches: dict[str, object] = field(default_factory=dict)  # cache name -> calibration
    dit_fp8: bool = False  # the DiT blocks' linears as float8 matmuls (torchao)
    limits: RequestLimits = field(default_factory=RequestLimits)
    memory: MemorySettings = field(default_factory=MemorySettings)


@dataclass(frozen=True)
class PipelineRuntime:
    """Where a pipeline runs: this rank's device, process groups and settings."""

    runtime: ParallelRuntime
    device: torch.device
    spec: ModelSpec
    dtypes: dict[str, torch.dtype]  # component name -> dtype
    settings: PipelineSettings = field(default_factory=PipelineSettings)

    @property
    def is_output_rank(self) -> bool:
        """This rank encodes text and decodes video for its replica (the active plan's)."""
        return self.runtime.groups is not None and self.runtime.groups.leader == self.runtime.rank


class PipelineStage(ABC):
    """One step of a pipeline; ``name`` labels its time in the output's timings.

    ``collective`` stages talk to other ranks; a failure inside one can leave the ranks
    out of step (one waits in a collective the other never reaches).
    """

    name: str = "stage"
    collective: bool = True

    @abstractmethod
    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch: ...


class RanksOutOfStepError(RuntimeError):
    """A rank failed inside a collective stage: the other ranks may be stuck, so this
    worker must not serve further requests."""


ComponentLoader = Callable[[Path, PipelineRuntime], Any]


def prepare_dit(model: Any, settings: PipelineSettings) -> Any:
    """What every family does to a loaded DiT, in this order: float8 matmuls (before
    compile, so the compiled graphs run them), the attention backend, regional compile."""
    if settings.dit_fp8:
        from fastvideo.layers.fp8 import quantize_dit_fp8

        quantize_dit_fp8(model)
    model.set_attention(settings.attention_backend, settings.sta)
    if settings.compile is not None:
        model.compile_blocks(settings.compile.backend, settings.compile.mode)
    return model


def place_component(name: str, component: Any, env: PipelineRuntime) -> Any:
    """Put a loaded component where ``env.settings.memory`` wants it: streamed block by
    block, sharded across ranks, parked in host memory between uses, or as loaded."""
    memory = env.settings.memory
    if component is None:  # an optional component this checkpoint does not have
        return None
    if name in memory.layerwise_components:
        return LayerwiseOffload.apply(component, env.device)
    if name in memory.sharded_components and memory.shard_group is not None:
        return ShardedBlocks.apply(component, env.device, memory.shard_group)
    if name in memory.host_components:
        return OnDemand(component, env.device)
    return component


class ComposedPipelineBase(ABC):
    """Loads the components this rank needs and runs the stages.

    Subclasses set ``component_loaders`` and ``output_rank_components`` (loaded only on
    the rank that encodes text and decodes video) and implement ``create_stages``.
    """

    component_loaders: dict[str, ComponentLoader] = {}
    output_rank_components: tuple[str, ...] = ()

    def __init__(self, components: dict[str, Any], env: PipelineRuntime):
        self.components = components
        self.env = env
        self.load_timings: dict[str, float] = {}  # seconds per component (from_pretrained)
        self.stages = self.create_stages()

    @classmethod
    def component_names(
        cls, output_rank: bool = True, every_rank: tuple[str, ...] = ()
    ) -> list[str]:
        """The components this rank loads: all, or all but ``output_rank_components``
        (except those ``every_rank`` asks for on every rank)."""
        return [
            n
            for n in cls.component_loaders
            if output_rank or n not in cls.output_rank_components or n in every_rank
        ]

    @classmethod
    def weight_folders(cls, model_dir: Path, output_rank: bool = True) -> list[Path]:
        """The folders of this rank's components that hold safetensors weights (what a
        worker can start reading before any loader runs)."""
        folders = [model_dir / name for name in cls.component_names(output_rank)]
        return [f for f in folders if f.is_dir() and any(f.glob("*.safetensors*"))]

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, env: PipelineRuntime, output_rank: bool = True
    ) -> ComposedPipelineBase:
        """Load the components; ``output_rank`` ones only where this rank may lead a replica
        (or everywhere, when ``settings.memory`` says so). Offloaded and sharded components
        are read into host memory and then placed (:func:`place_component`).

        The loaders run on a loader thread (in a copy of the caller's context, so a
        ``models.loader.reading_from`` block around this call reaches them), one after the
        other, while the weights stream in the background. The first failing component,
        in ``component_loaders`` order, raises.
        """
        memory = env.settings.memory
        names = cls.component_names(output_rank, memory.every_rank_components)
        timings: dict[str, float] = {}

        def load(name: str) -> Any:
            start = time.perf_counter()
            load_env = dataclasses.replace(env, device=HOST) if memory.loads_on_host(name) else env
            loaded = cls.component_loaders[name](model_dir / name, load_env)
            component = place_component(name, loaded, env)
            timings[f"load_{name}"] = time.perf_counter() - start
            logger.debug("loaded %s in %.2fs", name, timings[f"load_{name}"])
            return component

        # One loader at a time: transformers' lazy module imports are not thread-safe (a
        # class looked up from two threads at once can come back missing). The weights
        # still stream in the background (models.loader.reading_from) meanwhile.
        with ThreadPoolExecutor(1, thread_name_prefix="fastvideo-load") as pool:
            futures = {n: pool.submit(contextvars.copy_context().run, load, n) for n in names}
        for name in names:  # the first failure in component order, with its traceback
            error = futures[name].exception()
            if error is not None:
                raise error
        pipeline = cls({name: futures[name].result() for name in names}, env)
        pipeline.load_timings = timings
        return pipeline

    @abstractmethod
    def create_stages(self) -> list[PipelineStage]: ...

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, control: StepControl | None = None) -> ForwardBatch:
        control = control or NullControl()
        for stage in self.stages:
            start = time.perf_counter()
            control.progress(stage.name, 0, 0)
            try:
                batch = stage(batch, control)
            except Exception as e:
                if stage.collective and self.env.runtime.groups.replica.size > 1:
                    raise RanksOutOfStepError(
                        f"{type(e).__name__} in stage {stage.name!r}: {e}"
                    ) from e
                raise
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)  # so timings are the stage's own
            batch.timings[stage.name] = time.perf_counter() - start
        return batch
