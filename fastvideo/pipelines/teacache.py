"""TeaCache: skip the DiT's blocks on steps whose timestep input barely changed.

Per branch (the conditional and the unconditional pass of CFG, each with its own state),
every step compares the model's modulated timestep input with the previous step's:
``rel = mean|m_t - m_prev| / mean|m_prev|``, rescales it with the model's published
polynomial and adds it to an accumulator. While the accumulator stays below the
threshold the blocks are skipped and the residual they added last time (``out - in``) is
added instead; once it reaches the threshold the blocks run and the accumulator restarts.
The first ``warmup_steps`` steps always run.

Every rank of a replica takes the same decision: each rank's candidate accumulator values
are combined with one small max all-reduce before deciding, so sequence-parallel ranks
(which must all run or all skip their blocks, the blocks communicate) and CFG-parallel
ranks keep identical state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# Fixed order of the branches in the consensus vector.
BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class TeaCacheParams:
    """A model's calibration: the polynomial (highest power first) and warm-up steps."""

    thresh: float
    coefficients: tuple[float, ...]
    warmup_steps: int = 5


def polyval(coefficients: Sequence[float], x: float) -> float:
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


@dataclass
class _Branch:
    previous: torch.Tensor | None = None  # last modulated input [b, ...] fp32
    residual: torch.Tensor | None = None  # last blocks' residual [b, L, D] fp32
    accumulated: float = 0.0
    skipped: int = 0
    computed: int = 0


@dataclass
class TeaCache:
    """One request's cache state.

    Args:
        params: threshold and calibration.
        sync: in-place max all-reduce of a small fp32 tensor over the replica's ranks
            (``None`` on a single rank).
    """

    params: TeaCacheParams
    sync: Callable[[torch.Tensor], None] | None = None
    step: int = 0  # set by the denoising loop before each step
    branches: dict[str, _Branch] = field(default_factory=dict)

    def decide(self, modulated: dict[str, torch.Tensor]) -> dict[str, bool]:
        """Branch name -> run the blocks this step (identical on every rank)."""
        values = torch.full((len(BRANCHES),), float("-inf"))
        for name, mod in modulated.items():
            branch = self.branches.setdefault(name, _Branch())
            mod = mod.float()
            if self.step < self.params.warmup_steps or branch.previous is None:
                value = float("inf")
            elif branch.residual is None or branch.residual.shape[0] != mod.shape[0]:
                value = float("inf")
            else:
                prev = branch.previous
                rel = float((mod - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
                value = branch.accumulated + polyval(self.params.coefficients, rel)
            branch.previous = mod.clone()
            values[BRANCHES.index(name)] = value
        if self.sync is not None:
            self.sync(values)
        # Every rank books every branch present on any rank (CFG-parallel ranks hold one
        # each), so every rank's counters describe the whole request.
        decisions = {}
        for i, name in enumerate(BRANCHES):
            value = float(values[i])
            if value == float("-inf"):
                continue
            branch = self.branches.setdefault(name, _Branch())
            run = self.params.thresh <= 0 or value >= self.params.thresh
            branch.accumulated = 0.0 if run else value
            if run:
                branch.computed += 1
            else:
                branch.skipped += 1
            if name in modulated:
                decisions[name] = run
        return decisions

    def run(
        self,
        x: torch.Tensor,
        modulated: torch.Tensor,
        branches: dict[str, slice],
        blocks: Callable[[torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """The blocks' output for ``x`` [B, L, D], computed or taken from the cache.

        Args:
            modulated: [B, ...] the model's modulated timestep input.
            branches: branch name -> its rows of the batch.
            blocks: runs the blocks on the given rows (a LongTensor index; None = all).
        """
        decisions = self.decide({n: modulated[s] for n, s in branches.items()})
        running = [n for n in branches if decisions[n]]
        if len(running) == len(branches):
            out = blocks(None)
            computed = {n: (out[s], x[s]) for n, s in branches.items()}
        elif running:
            index = torch.cat([_rows(branches[n], x.device) for n in running])
            sub = blocks(index)
            out = torch.empty_like(x)
            out[index] = sub
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
        for branch in self.branches.values():
            for name in ("previous", "residual"):
                tensor = getattr(branch, name)
                if tensor is not None:
                    setattr(branch, name, tensor.index_select(0, keep.to(tensor.device)))

    def skipped(self) -> dict[str, int]:
        """Branch -> steps whose blocks were skipped."""
        return {name: branch.skipped for name, branch in self.branches.items()}

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, branch in self.branches.items():
            out[f"teacache_skipped_{name}"] = float(branch.skipped)
            out[f"teacache_computed_{name}"] = float(branch.computed)
        return out


@dataclass(frozen=True)
class TeaCacheCall:
    """What one DiT forward needs: the request's cache and which rows are which branch."""

    cache: TeaCache
    branches: dict[str, slice]


def _rows(rows: slice, device: torch.device) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop, device=device)
