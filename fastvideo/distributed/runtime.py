"""This rank's view of torch.distributed: process groups per plan and the few collectives
the pipeline needs. With one rank every method is a cheap no-op, so single-GPU code paths
run the same code without torch.distributed initialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastvideo.distributed.plan import ParallelPlan
from fastvideo.logger import init_logger

logger = init_logger(__name__)


def indexed(device: torch.device) -> torch.device:
    """``device`` with an index: a bare ``cuda`` becomes the current CUDA device (what
    ``torch.cuda.set_device`` and threads that must use the same device need)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class GroupView:
    """One process group as seen from this rank (``group`` is None when size is 1)."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    rank: int  # this rank's index inside ``ranks``

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class PlanGroups:
    ulysses: GroupView
    ring: GroupView
    sp: GroupView
    cfg: GroupView
    replica: GroupView  # every rank serving the same request; ranks[0] is its output rank

    @property
    def leader(self) -> int:
        """Global rank that encodes text, decodes video and reports for the replica."""
        return self.replica.ranks[0]


class ParallelRuntime:
    """Process groups of this rank, and the plan of the request being run."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self._groups: dict[ParallelPlan, PlanGroups] = {}
        self.plan = ParallelPlan()
        self.groups = self._build_groups(self.plan) if world_size == 1 else None

    # --- plan activation ---------------------------------------------------------------
    def prepare(self, plans: list[ParallelPlan]) -> None:
        """Create the process groups of ``plans``. Collective over all ranks: each calls it
        with the same list, once, at start-up (replicas later run independently, so groups
        can not be created on demand)."""
        for plan in plans:
            if plan not in self._groups:
                self._groups[plan] = self._build_groups(plan)

    @contextlib.contextmanager
    def activate(self, plan: ParallelPlan) -> Iterator[PlanGroups]:
        """Make ``plan`` (prepared at start-up) current for the enclosed request."""
        if plan.world_size != self.world_size:
            raise ValueError(f"plan {plan} does not cover world size {self.world_size}")
        if plan not in self._groups:
            if self.world_size > 1:
                raise ValueError(f"plan {plan.describe()} was not prepared at start-up")
            self._groups[plan] = self._build_groups(plan)
        previous = (self.plan, self.groups)
        self.plan, self.groups = plan, self._groups[plan]
        try:
            yield self.groups
        finally:
            self.plan, self.groups = previous

    def _build_groups(self, plan: ParallelPlan) -> PlanGroups:
        return PlanGroups(
            ulysses=self._view(plan.ulysses_groups()),
            ring=self._view(plan.ring_groups()),
            sp=self._view(plan.sp_groups()),
            cfg=self._view(plan.cfg_groups()),
            replica=self._view(plan.replica_groups()),
        )

    def _view(self, all_groups: list[list[int]]) -> GroupView:
        """Create every group of one kind (collectively) and keep the one holding us."""
        mine: GroupView | None = None
        for ranks in all_groups:
            group = None
            if len(ranks) > 1 and self.world_size > 1:
                group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = GroupView(group, tuple(ranks), ranks.index(self.rank))
        assert mine is not None
        return mine

    # --- collectives -------------------------------------------------------------------
    def broadcast_(self, view: GroupView, tensor: torch.Tensor) -> torch.Tensor:
        """In-place broadcast from the group's first member to the others."""
        if view.size > 1:
            dist.broadcast(tensor, src=view.ranks[0], group=view.group)
        return tensor

    def all_gather(self, view: GroupView, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate ``x`` from every member of ``view`` along ``dim``, in group order."""
        if view.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(view.size)]
        dist.all_gather(parts, x, group=view.group)
        return torch.cat(parts, dim=dim)

    def all_reduce_max_(self, view: GroupView, x: torch.Tensor) -> torch.Tensor:
        if view.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=view.group)
        return x
