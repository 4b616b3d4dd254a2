"""The step-cache interface: the DiT's forward asks a cache whether to run its blocks, the
cache never reaches into the model.

Per branch (the conditional and the unconditional pass of CFG, each with its own state), a
cache ``propose``s a value for this step from the model's signal (e.g. the modulated
timestep input); the blocks run when the value reaches the threshold, else the residual
they added the last time they ran (``out - in``) is added instead. Every rank of a replica
takes the same decision: each rank's proposals are combined with one small max
all-reduce before deciding, so sequence-parallel ranks (which must all run or all skip:
the blocks communicate) and CFG-parallel ranks (one branch each) keep identical state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Fixed order of the branches in the consensus vector.
BRANCHES = ("cond", "uncond")
MUST_RUN = float("inf")

# blocks(h, rows): run the DiT's blocks on ``h`` = x[rows] (rows None = the whole batch).
Blocks = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Sync = Callable[[torch.Tensor], None]


@dataclass
class BranchState:
    residual: torch.Tensor | None = None  # last blocks' residual [b, L, D] fp32
    skipped: int = 0
    computed: int = 0


class StepCache(ABC):
    """One request's cache state (created per request by the denoising stage).

    Args:
        thresh: decision threshold (0 computes every step).
        sync: in-place max all-reduce of a small fp32 CPU tensor over the replica's ranks
            (``None`` on a single rank).
    """

    name = "cache"

    def __init__(self, thresh: float, sync: Sync | None = None):
        self.thresh = float(thresh)
        self.sync = sync
        self.step = 0
        self.branches: dict[str, BranchState] = {}

    def begin_step(self, step: int) -> None:
        """Called by the denoising loop before each step's forward."""
        self.step = step

    @abstractmethod
    def propose(self, branch: str, signal: torch.Tensor) -> float:
        """This step's value for ``branch`` (``MUST_RUN`` forces the blocks to run)."""

    @abstractmethod
    def commit(self, branch: str, value: float, run: bool) -> None:
        """Book the agreed value and decision (called on every rank for every branch any
        rank runs)."""

    def select_state(self, keep: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Keep a subclass's per-item state of items ``keep`` only."""

    # --- shared mechanics ----------------------------------------------------------------
    def decide(self, signals: dict[str, torch.Tensor]) -> dict[str, bool]:
        """Branch name -> run the blocks this step (identical on every rank)."""
        values = torch.full((len(BRANCHES),), float("-inf"))
        for name, signal in signals.items():
            state = self.branches.setdefault(name, BranchState())
            value = self.propose(name, signal)
            if state.residual is None or state.residual.shape[0] != signal.shape[0]:
                value = MUST_RUN  # nothing cached for these rows yet
            values[BRANCHES.index(name)] = value
        if self.sync is not None:
            self.sync(values)
        decisions = {}
        for i, name in enumerate(BRANCHES):
            value = float(values[i])
            if value == float("-inf"):  # no rank runs this branch
                continue
            state = self.branches.setdefault(name, BranchState())
            run = self.thresh <= 0 or value >= self.thresh
            self.commit(name, value, run)
            if run:
                state.computed += 1
            else:
                state.skipped += 1
            if name in signals:
                decisions[name] = run
        return decisions

    def run(
        self, x: torch.Tensor, signal: torch.Tensor, branches: dict[str, slice], blocks: Blocks
    ) -> torch.Tensor:
        """The blocks' output for ``x`` [B, L, D], computed or taken from the cache.

        Args:
            signal: [B, ...] what the cache compares between steps.
            branches: branch name -> its rows of the batch.
        """
        decisions = self.decide({n: signal[s] for n, s in branches.items()})
        running = [n for n in branches if decisions[n]]
        if len(running) == len(branches):
            out = blocks(x, None)
            computed = {n: (out[s], x[s]) for n, s in branches.items()}
        elif running:
            index = torch.cat([_rows(branches[n], x.device) for n in running])
            out = torch.empty_like(x)
            out[index] = blocks(x[index], index)
            computed = {n: (out[branches[n]], x[branches[n]]) for n in running}
        else:
            out = torch.empty_like(x)
            computed = {}
        for name, (y, x_in) in computed.items():
            self.branches[name].residual = y.float() - x_in.float()
        for name, rows in branches.items():
            if not decisions[name]:
                residual = self.branches[name].residual
                assert residual is not None
                out[rows] = (x[rows].float() + residual).type_as(x)
        return out

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch items ``keep`` (when requests leave a running batch)."""
        for state in self.branches.values():
            if state.residual is not None:
                state.residual = state.residual.index_select(0, keep.to(state.residual.device))
        self.select_state(keep)

    def skipped(self) -> dict[str, int]:
        """Branch -> steps whose blocks were skipped."""
        return {name: state.skipped for name, state in self.branches.items()}

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, state in self.branches.items():
            out[f"{self.name}_skipped_{name}"] = float(state.skipped)
            out[f"{self.name}_computed_{name}"] = float(state.computed)
        return out


@dataclass(frozen=True)
class StepCacheCall:
    """What one DiT forward needs: the request's cache and which rows are which branch."""

    cache: StepCache
    branches: dict[str, slice]


def _rows(rows: slice, device: torch.device) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop, device=device)


def create_step_cache(
    name: str, thresh: float, calibration: object, num_steps: int, sync: Sync | None = None
) -> StepCache:
    """The cache ``name`` for one request of ``num_steps`` steps."""
    from fastvideo.cache.magcache import MagCache
    from fastvideo.cache.teacache import TeaCache

    if name == "teacache":
        return TeaCache(calibration, thresh, sync)  # type: ignore[arg-type]
    if name == "magcache":
        return MagCache(calibration, thresh, num_steps, sync)  # type: ignore[arg-type]
    raise ValueError(f"unknown step cache {name!r}")
