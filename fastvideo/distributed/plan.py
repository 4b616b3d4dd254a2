"""The parallel plan: how N ranks split the work. Pure Python (no torch).

Rank layout (data-parallel replicas outermost, then ``cfg``, Ulysses innermost)::

    rank    = replica * replica_size + cfg_rank * sp_degree + sp_rank
    sp_rank = ring_rank * ulysses_degree + ulysses_rank

so the members of one Ulysses group hold neighbouring sequence shards, and after the
Ulysses all-to-all each ring rank holds one contiguous chunk of the sequence.
"""

from __future__ import annotations

import math

import msgspec


class ParallelPlan(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Degrees of each kind of parallelism; their product is the world size.

    ``dp_degree`` replicas each run their own requests (throughput mode); inside a replica,
    one request is split by CFG, Ulysses and ring parallelism (latency mode is dp = 1).
    A msgspec struct: it travels to the workers inside the batch message as it is.
    """

    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    dp_degree: int = 1

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def replica_size(self) -> int:
        return self.cfg_degree * self.sp_degree

    @property
    def world_size(self) -> int:
        return self.dp_degree * self.replica_size

    def replica_ranks(self, replica: int) -> list[int]:
        start = replica * self.replica_size
        return list(range(start, start + self.replica_size))

    def describe(self) -> str:
        parts = []
        if self.dp_degree > 1:
            parts.append(f"{self.dp_degree} replicas of")
        if self.cfg_degree > 1:
            parts.append(f"CFG {self.cfg_degree}")
        if self.ulysses_degree > 1:
            parts.append(f"Ulysses {self.ulysses_degree}")
        if self.ring_degree > 1:
            parts.append(f"ring {self.ring_degree}")
        inner = " x ".join(p for p in parts if not p.endswith(" of")) or "single rank"
        return f"{parts[0]} {inner}" if self.dp_degree > 1 else inner

    # --- rank arithmetic ---------------------------------------------------------------
    def coords(self, rank: int) -> tuple[int, int, int]:
        """(cfg_rank, ring_rank, ulysses_rank) of a global rank, inside its replica."""
        cfg_rank, sp_rank = divmod(rank % self.replica_size, self.sp_degree)
        ring_rank, ulysses_rank = divmod(sp_rank, self.ulysses_degree)
        return cfg_rank, ring_rank, ulysses_rank

    def rank_of(self, cfg_rank: int, ring_rank: int, ulysses_rank: int, replica: int = 0) -> int:
        local = cfg_rank * self.sp_degree + ring_rank * self.ulysses_degree + ulysses_rank
        return replica * self.replica_size + local

    def ulysses_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(c, r, u, d) for u in range(self.ulysses_degree)]
            for d in range(self.dp_degree)
            for c in range(self.cfg_degree)
            for r in range(self.ring_degree)
        ]

    def ring_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(c, r, u, d) for r in range(self.ring_degree)]
            for d in range(self.dp_degree)
            for c in range(self.cfg_degree)
            for u in range(self.ulysses_degree)
        ]

    def sp_groups(self) -> list[list[int]]:
        return [
            [d * self.replica_size + c * self.sp_degree + s for s in range(self.sp_degree)]
            for d in range(self.dp_degree)
            for c in range(self.cfg_degree)
        ]

    def cfg_groups(self) -> list[list[int]]:
        return [
            [d * self.replica_size + c * self.sp_degree + s for c in range(self.cfg_degree)]
            for d in range(self.dp_degree)
            for s in range(self.sp_degree)
        ]

    def replica_groups(self) -> list[list[int]]:
        return [self.replica_ranks(d) for d in range(self.dp_degree)]


def choose_plan(
    world_size: int,
    num_heads: int,
    use_cfg: bool,
    *,
    dp_degree: int = 1,
    cfg_parallel: bool | None = None,
    sp_degree: int | None = None,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
) -> ParallelPlan:
    """Pick the plan for one request, or raise ValueError for an impossible forced plan.

    Automatic choice: CFG-parallel when guidance is on and the world size is even; within a
    CFG group, Ulysses at the largest degree dividing both the group size and the head
    count; ring attention for the remaining factor.
    """
    if dp_degree < 1 or world_size % dp_degree:
        raise ValueError(f"{dp_degree} replicas do not divide num_gpus={world_size}")
    world_size //= dp_degree  # ranks of one replica
    _check_positive(
        world_size=world_size,
        sp_degree=sp_degree,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
    )
    cfg_degree = _choose_cfg_degree(
        world_size, use_cfg, cfg_parallel, sp_degree, ulysses_degree, ring_degree
    )
    group = world_size // cfg_degree
    if sp_degree is not None and sp_degree != group:
        raise ValueError(
            f"sp_degree={sp_degree} does not fit num_gpus={world_size} with CFG degree "
            f"{cfg_degree}: sp_degree must be {group}"
        )
    uly, ring = _split_sp(group, num_heads, ulysses_degree, ring_degree)
    return ParallelPlan(cfg_degree, uly, ring, dp_degree)


def _choose_cfg_degree(
    world: int,
    use_cfg: bool,
    cfg_parallel: bool | None,
    sp: int | None,
    uly: int | None,
    ring: int | None,
) -> int:
    if cfg_parallel is not None:
        if cfg_parallel and world % 2:
            raise ValueError(f"cfg_parallel=True needs an even number of GPUs; num_gpus={world}")
        return 2 if cfg_parallel and use_cfg else 1
    if not use_cfg or world % 2:
        return 1
    # A forced sequence-parallel size leaves CFG-parallel whatever factor remains.
    known = sp if sp is not None else (uly * ring if uly and ring else None)
    if known is not None:
        return 2 if known * 2 == world else 1
    partial = uly or ring or 1
    return 2 if (world // 2) % partial == 0 else 1


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _split_sp(group: int, num_heads: int, ulysses: int | None, ring: int | None) -> tuple[int, int]:
    if ulysses is not None and num_heads % ulysses:
        raise ValueError(
            f"ulysses_degree={ulysses} must divide the model's {num_heads} attention heads"
        )
    if ulysses is not None and ring is not None:
        if ulysses * ring != group:
            raise ValueError(
                f"ulysses_degree={ulysses} x ring_degree={ring} = {ulysses * ring} must equal "
                f"the sequence-parallel group size {group}"
            )
        return ulysses, ring
    if ulysses is not None:
        if group % ulysses:
            raise ValueError(
                f"ulysses_degree={ulysses} must divide the sequence-parallel group size {group}"
            )
        return ulysses, group // ulysses
    if ring is not None:
        if group % ring:
            raise ValueError(
                f"ring_degree={ring} must divide the sequence-parallel group size {group}"
            )
        uly = group // ring
        if num_heads % uly:
            raise ValueError(
                f"ring_degree={ring} leaves Ulysses degree {uly}, which does not divide the "
                f"model's {num_heads} attention heads"
            )
        return uly, ring
    uly = math.gcd(group, num_heads)  # the largest Ulysses degree both allow
    return uly, group // uly


def candidate_plans(
    world_size: int,
    num_heads: int,
    *,
    throughput_replicas: int = 1,
    forced: dict[str, object] | None = None,
) -> list[ParallelPlan]:
    """Every plan an engine may run: latency mode with guidance on and off (honouring
    forced options), and throughput mode's replicas. Deterministic order: every rank
    creates the process groups of these plans, in this order, at start-up."""
    forced = forced or {}
    plans: list[ParallelPlan] = []
    for use_cfg in (True, False):
        try:
            plans.append(choose_plan(world_size, num_heads, use_cfg, **forced))  # type: ignore[arg-type]
        except ValueError:
            pass  # a forced plan may only fit one of guidance on/off
        if throughput_replicas > 1:
            plans.append(choose_plan(world_size, num_heads, use_cfg, dp_degree=throughput_replicas))
    return list(dict.fromkeys(plans))
