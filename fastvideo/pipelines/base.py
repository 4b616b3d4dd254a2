"""Composable pipelines: a pipeline is a list of stages run in order over a ForwardBatch.

A model family writes a short pipeline file that names its components, how to load each
one, and which stages to run; the stages themselves live in ``pipelines/stages`` and are
shared across families.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.layers.sequence import SequenceShard, TokenGrid
from fastvideo.logger import init_logger
from fastvideo.models.registry import ModelSpec

logger = init_logger(__name__)

# progress(stage, step, total_steps)
ProgressFn = Callable[[str, int, int], None]
# Called by the denoising loop at every step boundary with (batch, step); returns the batch,
# possibly without the items that were aborted or failed (the worker decides, collectively).
StepHook = Callable[["ForwardBatch", int], "ForwardBatch"]


@dataclass
class ForwardBatch:
    """One batch of requests moving through the stages (B = len(prompts))."""

    request_id: str
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    guidance_scales: list[float]
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    output_type: str = "np"
    teacache_thresh: float | None = None  # None: TeaCache off
    item_ids: list[str] = field(default_factory=list)  # one per prompt
    step_hook: StepHook | None = None
    # Items that left the batch: aborted ids, and failed id -> reason.
    aborted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    # Filled in by the stages.
    prompt_embeds: torch.Tensor | None = None  # [B, Lt, Dt]
    negative_prompt_embeds: torch.Tensor | None = None
    scheduler: Any = None
    timesteps: torch.Tensor | None = None  # [steps]
    grid: TokenGrid | None = None
    shard: SequenceShard | None = None
    latents: torch.Tensor | None = None  # this rank's tokens [B, L_shard, P*C], fp32
    output_latents: torch.Tensor | None = None  # [B, C, F, H, W] fp32 (output rank)
    frames: torch.Tensor | None = None  # uint8 [B, T, H, W, 3] (output rank)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # counters (TeaCache skips, ...)
    teacache: Any = None  # the request's TeaCache state while denoising

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def do_cfg(self) -> bool:
        return any(g > 1.0 for g in self.guidance_scales)

    def select(self, keep: list[int]) -> ForwardBatch:
        """Keep only items ``keep`` (in order) in every per-item list, tensor and the
        scheduler's state."""
        for name in ("prompts", "negative_prompts", "seeds", "guidance_scales", "item_ids"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])
        index = torch.tensor(keep, dtype=torch.long)
        for name in ("prompt_embeds", "negative_prompt_embeds", "latents"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        if self.scheduler is not None:
            self.scheduler.select_batch(index)
        if self.teacache is not None:
            self.teacache.select(index)
        return self


@dataclass(frozen=True)
class PipelineRuntime:
    """Where a pipeline runs: this rank's device, process groups and settings."""

    runtime: ParallelRuntime
    device: torch.device
    spec: ModelSpec
    dtypes: dict[str, torch.dtype]  # component name -> dtype
    options: dict[str, Any] = field(default_factory=dict)

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
    def __call__(self, batch: ForwardBatch, progress: ProgressFn) -> ForwardBatch: ...


class RanksOutOfStepError(RuntimeError):
    """A rank failed inside a collective stage: the other ranks may be stuck, so this
    worker must not serve further requests."""


ComponentLoader = Callable[[Path, PipelineRuntime], Any]


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
        self.stages = self.create_stages()

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, env: PipelineRuntime, output_rank: bool = True
    ) -> ComposedPipelineBase:
        """Load the components; ``output_rank`` ones only where this rank may lead a replica."""
        components = {}
        for name, loader in cls.component_loaders.items():
            if name in cls.output_rank_components and not output_rank:
                continue
            start = time.perf_counter()
            components[name] = loader(model_dir / name, env)
            logger.debug("loaded %s in %.2fs", name, time.perf_counter() - start)
        return cls(components, env)

    @abstractmethod
    def create_stages(self) -> list[PipelineStage]: ...

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, progress: ProgressFn | None = None) -> ForwardBatch:
        progress = progress or (lambda stage, step, total: None)
        for stage in self.stages:
            start = time.perf_counter()
            progress(stage.name, 0, 0)
            try:
                batch = stage(batch, progress)
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
