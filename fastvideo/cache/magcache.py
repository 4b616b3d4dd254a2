"""MagCache: skip the DiT's blocks while the calibrated magnitude ratios of their residual
say the skipped steps' error stays small.

Per branch, after the first ``retention_ratio`` of the forwards, each step multiplies the
running ratio by the calibrated ratio of that step and adds ``|1 - ratio|`` to an error
accumulator; the step is skipped (the cached residual added instead) while the error stays
below the threshold and at most ``max_skip_steps`` steps in a row were skipped, else the
blocks run and the accumulators restart. The decision depends only on the calibration and
the step, so every rank computes the same; it still goes through the shared consensus.
"""

from __future__ import annotations

import torch

from fastvideo.cache.base import BRANCHES, MUST_RUN, StepCache, Sync
from fastvideo.cache.calibration import MagCacheCalibration


class MagCache(StepCache):
    name = "magcache"

    def __init__(
        self,
        calibration: MagCacheCalibration,
        thresh: float,
        num_steps: int,
        sync: Sync | None = None,
    ):
        super().__init__(thresh, sync)
        self.calibration = calibration
        self.num_steps = num_steps
        self.ratios = calibration.ratios_for(num_steps)  # [(cond, uncond)] per step
        # Forwards (cond and uncond counted apart, as the published calibration does)
        # that always run.
        self.retained = int(2 * num_steps * calibration.retention_ratio)
        self.ratio = dict.fromkeys(BRANCHES, 1.0)
        self.skips = dict.fromkeys(BRANCHES, 0)
        self.error = dict.fromkeys(BRANCHES, 0.0)

    def _retained(self, branch: str) -> bool:
        return 2 * self.step + BRANCHES.index(branch) < self.retained

    def _next(self, branch: str) -> tuple[float, int, float]:
        """(ratio, consecutive skips, error) if this step is skipped."""
        ratio = self.ratio[branch] * self.ratios[self.step][BRANCHES.index(branch)]
        return ratio, self.skips[branch] + 1, self.error[branch] + abs(1.0 - ratio)

    def propose(self, branch: str, signal: torch.Tensor) -> float:
        if self._retained(branch):
            return MUST_RUN
        _, skips, error = self._next(branch)
        return MUST_RUN if skips > self.calibration.max_skip_steps else error

    def commit(self, branch: str, value: float, run: bool) -> None:
        if self._retained(branch):
            return
        if run:
            self.ratio[branch], self.skips[branch], self.error[branch] = 1.0, 0, 0.0
        else:
            self.ratio[branch], self.skips[branch], self.error[branch] = self._next(branch)
