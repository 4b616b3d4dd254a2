"""Per-model calibrations of the step caches. Pure Python (no torch): configs and the
family registrations hold them, the workers build caches from them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TeaCacheCalibration:
    """TeaCache's rescaling polynomial (highest power first), the steps always computed at
    the start, and the model's default threshold."""

    coefficients: tuple[float, ...]
    warmup_steps: int = 5
    default_thresh: float = 0.08

    def validate(self) -> None:
        c = self.coefficients
        if not isinstance(c, (tuple, list)) or not c or not all(_is_number(x) for x in c):
            raise ValueError(
                f"teacache coefficients must be a non-empty sequence of numbers (highest "
                f"power first), got {c!r}"
            )
        _check_count("teacache warmup_steps", self.warmup_steps)
        _check_thresh("teacache default_thresh", self.default_thresh)


@dataclass(frozen=True)
class MagCacheCalibration:
    """MagCache's per-step magnitude ratios of the blocks' residual, calibrated on one
    step count: ``ratios`` interleaves (cond, uncond) per step, the first step padded with
    1.0. ``max_skip_steps`` (the paper's K) bounds consecutive skips; the first
    ``retention_ratio`` of the forwards always run."""

    ratios: tuple[float, ...]
    default_thresh: float = 0.12
    max_skip_steps: int = 2
    retention_ratio: float = 0.2

    def validate(self) -> None:
        r = self.ratios
        if (
            not isinstance(r, (tuple, list))
            or len(r) < 2
            or len(r) % 2
            or not all(_is_number(x) and x > 0 for x in r)
        ):
            raise ValueError(
                f"magcache ratios must be an even-length sequence of positive numbers "
                f"(cond, uncond per step), got {len(r) if isinstance(r, (tuple, list)) else r!r}"
            )
        _check_count("magcache max_skip_steps", self.max_skip_steps)
        _check_thresh("magcache default_thresh", self.default_thresh)
        if not _is_number(self.retention_ratio) or not 0 <= self.retention_ratio <= 1:
            raise ValueError(
                f"magcache retention_ratio must be in [0, 1], got {self.retention_ratio!r}"
            )

    def ratios_for(self, steps: int) -> list[tuple[float, float]]:
        """(cond, uncond) ratio of each of ``steps`` steps: the calibrated curve, taken at the
        nearest calibrated step when ``steps`` differs from the calibration's."""
        cond, uncond = list(self.ratios[0::2]), list(self.ratios[1::2])
        if steps == len(cond):
            return list(zip(cond, uncond, strict=True))
        if steps == 1:
            return [(cond[-1], uncond[-1])]
        scale = (len(cond) - 1) / (steps - 1)
        picks = [_round_half_even(i * scale) for i in range(steps)]
        return [(cond[p], uncond[p]) for p in picks]


def _round_half_even(x: float) -> int:
    # numpy.round's rule (the published implementation interpolates with it).
    return int(round(x))


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_thresh(name: str, value: object) -> None:
    if not _is_number(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
