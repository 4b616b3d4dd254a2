"""Every message that crosses a process boundary, in one place.

All are ``msgspec.Struct(array_like=True, omit_defaults=True, gc=False)`` tagged unions;
new fields are only ever appended (with defaults). Tensors travel as raw frames next to
the message (see ``engine/serial.py``), never pickled.
"""

from __future__ import annotations

import msgspec
import torch

_OPTS = {"array_like": True, "omit_defaults": True, "gc": False}


# --- driver -> workers -------------------------------------------------------------------
class GenerateRequest(msgspec.Struct, tag="generate", **_OPTS):
    """One batch of videos to generate (B = len(prompts)) and the plan to run it with."""

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
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    item_ids: list[str] = []  # one per prompt (the engine's request ids)
    dp_degree: int = 1  # replicas of the plan; this request runs on replica `replica`
    replica: int = 0
    teacache_thresh: float | None = None  # None: TeaCache off


class AbortRequest(msgspec.Struct, tag="abort", **_OPTS):
    """Stop these items at the next step boundary (sent to a replica's leader)."""

    item_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", **_OPTS):
    pass


# --- workers -> driver -------------------------------------------------------------------
class WorkerReady(msgspec.Struct, tag="ready", **_OPTS):
    rank: int
    pid: int
    device: str
    load_seconds: float
    memory_bytes: int = 0


class Progress(msgspec.Struct, tag="progress", **_OPTS):
    request_id: str
    stage: str
    step: int
    total_steps: int
    elapsed: float


class GenerateResult(msgspec.Struct, tag="result", **_OPTS):
    request_id: str
    plan: str
    timings: dict[str, float]
    frames: torch.Tensor | None = None  # uint8 [B, T, H, W, 3]
    latents: torch.Tensor | None = None  # fp32 [B, C, F, H, W]
    peak_memory_bytes: list[int] = []  # per rank, GPU only
    item_ids: list[str] = []  # the items in frames/latents, in order
    aborted_ids: list[str] = []
    failures: dict[str, str] = {}  # item id -> why it failed (e.g. NaN latents)
    stats: dict[str, float] = {}  # counters, e.g. TeaCache's skipped steps per branch


class WorkerFailure(msgspec.Struct, tag="failure", **_OPTS):
    """A request (or, with request_id None, the worker's start-up) failed on a rank."""

    request_id: str | None
    rank: int
    error_type: str
    message: str
    traceback: str = ""


ToWorker = GenerateRequest | AbortRequest | Shutdown
FromWorker = WorkerReady | Progress | GenerateResult | WorkerFailure
