"""Every message that crosses a process boundary, in one place.

All are ``msgspec.Struct(array_like=True, omit_defaults=True, gc=False)``; new fields are
only ever appended (with defaults). Tensors travel as raw frames next to the message (see
``codec.py``), never pickled. Every message a worker sends carries the engine's random
``token``: the driver drops what does not.
"""

from __future__ import annotations

import msgspec
import torch

from fastvideo.distributed.plan import ParallelPlan

_OPTS = {"array_like": True, "omit_defaults": True, "gc": False}


class RequestItem(msgspec.Struct, **_OPTS):
    """One video to generate: built once on the driver from a ``SamplingParam`` and the
    call's overrides, validated once there, and carried unchanged to the workers."""

    request_id: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 1024
    guidance_scale: float = 5.0
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    output_type: str = "np"  # "np" (uint8 frames) or "latent"
    cache: str | None = None  # step cache: "teacache", "magcache" or None
    cache_thresh: float = 0.0  # the cache's threshold (resolved on the driver)
    image: torch.Tensor | None = None  # uint8 [H, W, 3] conditioning image (image-to-video)
    guidance_scale_2: float | None = None  # CFG scale of a second (low-noise) expert
    true_cfg_scale: float = 1.0  # CFG scale of models whose guidance_scale is embedded
    max_sequence_length: int | None = None  # text tokens (None: the model's default)


# --- driver -> workers -------------------------------------------------------------------
class GenerateBatch(msgspec.Struct, tag="generate", **_OPTS):
    """Items that run as one batched forward on one replica, and the plan to run them.

    ``seq`` numbers the batches the driver sends to one set of ranks (1, 2, ...): a rank
    waiting for peers that never got a batch sees its leader move past it."""

    batch_id: str
    items: list[RequestItem]
    plan: ParallelPlan
    replica: int = 0
    seq: int = 0
    token: str = ""


class AbortItems(msgspec.Struct, tag="abort", **_OPTS):
    """Stop these items of a running batch at the next step boundary (sent to every rank
    of its replica)."""

    batch_id: str
    item_ids: list[str]
    token: str = ""


class Shutdown(msgspec.Struct, tag="shutdown", **_OPTS):
    token: str = ""


class Control(msgspec.Struct, tag="control", **_OPTS):
    """Change the loaded model between batches, on every rank (e.g. ``lora_load``), in the
    order it was sent relative to batches."""

    command_id: str
    op: str
    args: dict[str, str | float | int | None] = {}
    token: str = ""


# --- workers -> driver -------------------------------------------------------------------
class WorkerReady(msgspec.Struct, tag="ready", **_OPTS):
    rank: int
    pid: int
    device: str
    load_seconds: float
    memory_bytes: int = 0  # GPU memory allocated after loading (0 on CPU workers)
    token: str = ""
    host_rss_bytes: int = 0  # peak resident host memory of the worker process at load
    # Start-up seconds by part (imports, reads, components, ...; "total" from the process's
    # start), and moments counted from that start ("fa4_import_start"/"_end",
    # "cuda_context_done").
    load_breakdown: dict[str, float] = {}


class Heartbeat(msgspec.Struct, tag="heartbeat", **_OPTS):
    """Sent from a thread of every worker every ``heartbeat_s`` while it lives, busy or not:
    a worker whose heartbeats stop (stopped, hung) is declared dead. ``progress`` counts the
    stage and step boundaries it has passed: busy with no progress means stuck (a kernel or
    a collective that never returns)."""

    rank: int
    busy: bool = False
    progress: int = 0
    token: str = ""


class Progress(msgspec.Struct, tag="progress", **_OPTS):
    batch_id: str
    stage: str
    step: int
    total_steps: int
    elapsed: float
    token: str = ""


class BatchResult(msgspec.Struct, tag="result", **_OPTS):
    """A finished batch, from its replica's output rank."""

    batch_id: str
    plan: str
    timings: dict[str, float]
    frames: torch.Tensor | None = None  # uint8 [B, T, H, W, 3]
    latents: torch.Tensor | None = None  # fp32 [B, C, F, H, W]
    peak_memory_bytes: list[int] = []  # per rank, GPU only
    item_ids: list[str] = []  # the items in frames/latents, in order
    aborted_ids: list[str] = []
    failures: dict[str, str] = {}  # item id -> why it failed (e.g. NaN latents)
    stats: dict[str, float] = {}  # counters, e.g. a step cache's skipped steps per branch
    token: str = ""


class WorkerFailure(msgspec.Struct, tag="failure", **_OPTS):
    """A batch (or, with batch_id None, the worker's start-up) failed on a rank."""

    batch_id: str | None
    rank: int
    error_type: str
    message: str
    traceback: str = ""
    token: str = ""
    fatal: bool = False  # the rank exits after this (ranks out of step): the engine is dead


class ControlReply(msgspec.Struct, tag="control_reply", **_OPTS):
    """One rank's answer to a Control: ``error`` empty on success, ``value`` the op's."""

    command_id: str
    rank: int
    error: str = ""
    value: dict[str, float] = {}
    token: str = ""


ToWorker = GenerateBatch | AbortItems | Shutdown | Control
FromWorker = WorkerReady | Heartbeat | Progress | BatchResult | WorkerFailure | ControlReply


class WorkerArgs(msgspec.Struct, array_like=True):
    """Everything a worker process needs, passed explicitly at spawn (on its stdin)."""

    rank: int
    world_size: int
    device: str
    model_dir: str
    config: dict
    request_addr: str
    output_addr: str
    token: str = ""
    heartbeat_s: float = 1.0
    plugins: list[str] = []  # modules the worker imports at start (e.g. test fault hooks)
    store_path: str = ""  # the rendezvous FileStore (in the private socket folder)
    arrival_timeout_s: float = 60.0  # a replica leader's wait for its peers to get a batch
