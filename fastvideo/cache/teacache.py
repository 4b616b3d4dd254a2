"""TeaCache: skip the DiT's blocks on steps whose timestep input barely changed.

Per branch, every step compares the model's modulated timestep input with the previous
step's: ``rel = mean|m_t - m_prev| / mean|m_prev|``, rescales it with the model's published
polynomial and adds it to an accumulator. While the accumulator stays below the threshold
the blocks are skipped (the cached residual is added instead); once it reaches the
threshold the blocks run and the accumulator restarts. The first ``warmup_steps`` steps
always run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastvideo.cache.base import MUST_RUN, StepCache, Sync
from fastvideo.cache.calibration import TeaCacheCalibration


def polyval(coefficients: Sequence[float], x: float) -> float:
    """``coefficients`` (highest power first) evaluated at ``x`` (Horner)."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


class TeaCache(StepCache):
    name = "teacache"

    def __init__(self, calibration: TeaCacheCalibration, thresh: float, sync: Sync | None = None):
        super().__init__(thresh, sync)
        self.calibration = calibration
        self.previous: dict[str, torch.Tensor] = {}  # branch -> last modulated input fp32
        self.accumulated: dict[str, float] = {}

    def propose(self, branch: str, signal: torch.Tensor) -> float:
        signal = signal.float()
        prev = self.previous.get(branch)
        self.previous[branch] = signal.clone()
        if self.step < self.calibration.warmup_steps or prev is None:
            return MUST_RUN
        if prev.shape != signal.shape:
            return MUST_RUN
        rel = float((signal - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        return self.accumulated.get(branch, 0.0) + polyval(self.calibration.coefficients, rel)

    def commit(self, branch: str, value: float, run: bool) -> None:
        self.accumulated[branch] = 0.0 if run else value

    def select_state(self, keep: torch.Tensor) -> None:
        for branch, prev in self.previous.items():
            self.previous[branch] = prev.index_select(0, keep.to(prev.device))
