"""Step caches (TeaCache, MagCache) behind the one cache interface.

Unit level: decisions against explicit slow re-implementations of the published rules in
this file, at thresholds where the calibration (TeaCache's polynomial, MagCache's ratios)
changes the outcome. Pipeline level: threshold 0 equals no cache bitwise, a high threshold
skips, and 2-rank Ulysses and CFG parallelism take the same decisions as one rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.cache.calibration import MagCacheCalibration, TeaCacheCalibration
from fastvideo.cache.magcache import MagCache
from fastvideo.cache.teacache import TeaCache, polyval
from fastvideo.models.wan.registration import MAGCACHE_1_3B, TEACACHE_1_3B

LINEAR = TeaCacheCalibration((1.0, 0.0), warmup_steps=1)


def _run_steps(cache, signals: list[torch.Tensor], branches=None) -> list[bool]:
    """Drive ``cache`` like the DiT does for one branch; returns ran-the-blocks per step."""
    x = torch.zeros(1, 4, 2)
    branches = branches or {"cond": slice(0, 1)}
    ran = []
    for step, signal in enumerate(signals):
        cache.begin_step(step)
        calls: list = []

        def blocks(h, rows, calls=calls):
            calls.append(rows)
            return h + 1.0

        cache.run(x, signal, branches, blocks)
        ran.append(bool(calls))
    return ran


# --- TeaCache ------------------------------------------------------------------------------
def test_polyval_is_highest_power_first():
    assert polyval((2.0, -1.0, 3.0), 2.0) == 2 * 4 - 2 + 3


def _teacache_reference(mods: list[float], coefficients, thresh: float, warmup: int) -> list[bool]:
    """The published rule, written out: rel L1 change, rescaled by the polynomial,
    accumulated; run when it reaches the threshold (and then restart), or in warm-up."""
    ran, acc, prev = [], 0.0, None
    for step, m in enumerate(mods):
        if step < warmup or prev is None:
            run = True
        else:
            acc += float(np.polyval(coefficients, abs(m - prev) / abs(prev)))
            run = acc >= thresh
        if run:
            acc = 0.0
        ran.append(run)
        prev = m
    return ran


def test_teacache_follows_the_wan_polynomial():
    """With Wan2.1-1.3B's polynomial the skip pattern is the published rule's, and it is a
    different pattern from the one the raw (unrescaled) changes would give."""
    mods = [1.0, 1.08, 1.15, 1.2, 1.26, 1.3, 1.36, 1.4, 1.47, 1.5, 1.55, 1.6]
    coeffs, thresh = TEACACHE_1_3B.coefficients, 0.3
    cache = TeaCache(TeaCacheCalibration(coeffs, warmup_steps=2), thresh)
    ran = _run_steps(cache, [torch.full((1, 3), m) for m in mods])
    expected = _teacache_reference(mods, coeffs, thresh, warmup=2)
    assert ran == expected
    assert ran != _teacache_reference(mods, (1.0, 0.0), thresh, warmup=2), "no power"
    assert cache.stats()["teacache_skipped_cond"] == expected.count(False) > 0


def test_teacache_decisions_accumulate_and_reset():
    """Linear calibration (poly(x) = x): skip while the accumulated change < 0.25."""
    cache = TeaCache(LINEAR, 0.25)
    mods = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]  # relative changes ~0.1, 0.09, 0.083, ...
    ran = _run_steps(cache, [torch.full((1, 3), m) for m in mods])
    # step 0 warm-up; then 0.1, 0.19 skip; 0.27 >= 0.25 runs; then 0.077, 0.15 skip.
    assert ran == [True, False, False, True, False, False]
    assert cache.stats() == {"teacache_skipped_cond": 4.0, "teacache_computed_cond": 2.0}


def test_skipped_steps_add_the_cached_residual():
    cache = TeaCache(LINEAR, 10.0)
    x = torch.arange(4.0).view(1, 4, 1)
    cache.begin_step(0)
    first = cache.run(x, torch.ones(1, 2), {"cond": slice(0, 1)}, lambda h, rows: h * 3)
    cache.begin_step(1)
    x2 = x + 5
    second = cache.run(x2, torch.ones(1, 2), {"cond": slice(0, 1)}, lambda h, rows: h * 100)
    assert torch.equal(first, x * 3)
    assert torch.equal(second, x2 + 2 * x), "in + (last out - last in)"


def test_mixed_branches_compute_only_their_rows():
    cache = TeaCache(TeaCacheCalibration((1.0, 0.0), warmup_steps=1), 0.5)
    x = torch.arange(4.0).view(4, 1, 1)
    seen = []

    def blocks(h, rows):
        seen.append(None if rows is None else rows.tolist())
        return h * 10

    branches = {"cond": slice(0, 2), "uncond": slice(2, 4)}
    cache.begin_step(0)
    cache.run(x, torch.ones(4, 1), branches, blocks)
    cache.begin_step(1)
    mod = torch.tensor([[1.0], [1.0], [2.0], [2.0]])  # uncond changed by 100%: it runs
    out = cache.run(x, mod, branches, blocks)
    assert seen == [None, [2, 3]]
    assert torch.equal(out, x * 10)  # cond rows from the cached residual (x*10 - x)


def test_sync_makes_every_rank_decide_alike():
    """The consensus takes the max of the ranks' proposals per branch."""
    other_rank = torch.tensor([0.9, float("-inf")])
    cache = TeaCache(LINEAR, 0.5, sync=lambda v: v.copy_(torch.maximum(v, other_rank)))
    ran = _run_steps(cache, [torch.ones(1, 2), torch.ones(1, 2)])
    assert ran == [True, True]  # this rank saw no change, another rank's 0.9 >= 0.5 wins


def test_select_keeps_the_remaining_items_state():
    """Requests leaving a running batch take their rows of the cached residuals along."""
    cache = TeaCache(LINEAR, 10.0)
    x = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2).contiguous()
    cache.begin_step(0)
    cache.run(x, torch.ones(3, 2), {"cond": slice(0, 3)}, lambda h, rows: h * 10)
    cache.select(torch.tensor([0, 2]))
    x2 = x[[0, 2]]
    cache.begin_step(1)
    ran = []
    out = cache.run(x2, torch.ones(2, 2), {"cond": slice(0, 2)},
                    lambda h, rows: ran.append(1) or h)  # fmt: skip
    assert not ran  # skipped: the kept items' residuals (9x) are reused
    assert torch.equal(out, x2 * 10)


# --- MagCache ------------------------------------------------------------------------------
def _magcache_reference(ratios: list[tuple[float, float]], thresh, k, retention, branch):
    """The published MagCache rule for one branch, written out over all forwards."""
    steps = len(ratios)
    ratio, skips, err, ran = 1.0, 0, 0.0, []
    for i in range(steps):
        run = True
        if 2 * i + branch >= int(2 * steps * retention):
            ratio *= ratios[i][branch]
            skips += 1
            err += abs(1 - ratio)
            if err < thresh and skips <= k:
                run = False
            else:
                ratio, skips, err = 1.0, 0, 0.0
        ran.append(run)
    return ran


@pytest.mark.parametrize("thresh, k", [(0.12, 2), (0.05, 4), (0.3, 1)])
def test_magcache_follows_the_published_rule_on_wan_ratios(thresh, k):
    calibration = MagCacheCalibration(MAGCACHE_1_3B.ratios, thresh, k, 0.2)
    ratios = calibration.ratios_for(50)
    cache = MagCache(calibration, thresh, 50)
    branches = {"cond": slice(0, 1), "uncond": slice(1, 2)}
    x = torch.zeros(2, 3, 2)
    ran = {"cond": [], "uncond": []}
    for step in range(50):
        cache.begin_step(step)
        rows: list = []

        def blocks(h, r, rows=rows):
            rows.append(r)
            return h + 1

        cache.run(x, torch.ones(2, 1), branches, blocks)
        computed = rows[0] if rows else torch.tensor([])
        for name, index in (("cond", 0), ("uncond", 1)):
            ran[name].append(bool(rows) and (computed is None or index in computed.tolist()))
    for name, b in (("cond", 0), ("uncond", 1)):
        assert ran[name] == _magcache_reference(ratios, thresh, k, 0.2, b), name
    assert cache.skipped()["cond"] == ran["cond"].count(False) > 0


def test_magcache_interpolates_the_calibration_to_other_step_counts():
    cal = MAGCACHE_1_3B
    cond = np.array(cal.ratios[0::2])
    for steps in (8, 30, 50, 73):
        idx = np.round(np.arange(steps) * (len(cond) - 1) / (steps - 1)).astype(int)
        assert [c for c, _ in cal.ratios_for(steps)] == cond[idx].tolist()


def test_magcache_threshold_zero_never_skips():
    cache = MagCache(MAGCACHE_1_3B, 0.0, 20)
    assert all(_run_steps(cache, [torch.ones(1, 1)] * 20))
    assert cache.skipped() == {"cond": 0}


# --- pipeline level ------------------------------------------------------------------------
RUN = dict(negative_prompt="blurry", seed=3, num_inference_steps=12, height=32, width=32,
           num_frames=5, output_type="latent")  # fmt: skip
CACHES = {"teacache": 5.0, "magcache": 0.5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cache_runs(tiny_gen):
    runs = {"off": tiny_gen.generate_video("a fox", **RUN)}
    for cache, high in CACHES.items():
        runs[f"{cache}-zero"] = tiny_gen.generate_video("a fox", cache=cache, cache_thresh=0.0,
                                                       **RUN)  # fmt: skip
        runs[f"{cache}-high"] = tiny_gen.generate_video("a fox", cache=cache, cache_thresh=high,
                                                       **RUN)  # fmt: skip
    return runs


@pytest.mark.parametrize("cache", list(CACHES))
def test_threshold_zero_is_identical_to_no_cache(cache_runs, cache):
    zero = cache_runs[f"{cache}-zero"]
    assert torch.equal(zero.latents, cache_runs["off"].latents)
    assert zero.stats[f"{cache}_skipped_cond"] == 0
    assert zero.stats[f"{cache}_computed_uncond"] == 12
    assert f"{cache}_skipped_cond" not in cache_runs["off"].stats


@pytest.mark.parametrize("cache", list(CACHES))
def test_high_threshold_skips_steps(cache_runs, cache):
    high = cache_runs[f"{cache}-high"]
    skipped = high.stats[f"{cache}_skipped_cond"]
    assert 0 < skipped < 12
    assert high.stats[f"{cache}_computed_cond"] + skipped == 12
    assert torch.isfinite(high.latents).all()
    assert not torch.equal(high.latents, cache_runs["off"].latents)
    assert _rel(high.latents, cache_runs["off"].latents) < 0.5  # residual reuse stays close


@pytest.mark.slow
@pytest.mark.parametrize("plan", [dict(ulysses_degree=2, cfg_parallel=False), {}])
def test_two_rank_parallelism_takes_the_same_decisions(tiny_a, cache_runs, plan):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), num_gpus=2, **plan) as gen:
        for cache, high in CACHES.items():
            out = gen.generate_video("a fox", cache=cache, cache_thresh=high, **RUN)
            assert out.plan == ("Ulysses 2" if plan else "CFG 2")
            ref = cache_runs[f"{cache}-high"]
            assert out.stats == ref.stats, cache
            assert _rel(out.latents, ref.latents) < 1e-5, cache


def test_cache_request_validation(tiny_gen):
    with pytest.raises(ValueError, match="cache_thresh must be a finite number >= 0"):
        tiny_gen.generate_video("a fox", cache="teacache", cache_thresh=-1.0)
    with pytest.raises(TypeError, match="enable_teacache must be a bool"):
        tiny_gen.generate_video("a fox", enable_teacache="yes")
    with pytest.raises(ValueError, match="cache must be one of"):
        tiny_gen.generate_video("a fox", cache="fastcache")


def test_uncalibrated_cache_fails_at_submission(tiny_a):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), executor="inproc", magcache=None) as gen:
        with pytest.raises(ValueError, match="no magcache calibration"):
            gen.generate_video("a fox", cache="magcache", **RUN)
        assert gen.generate_video("a fox", cache="teacache", **RUN).latents is not None


def test_frames_still_decode_with_a_cache(tiny_gen):
    out = tiny_gen.generate_video(
        "a fox", cache="magcache", num_inference_steps=8, height=32, width=32, num_frames=5
    )
    assert out.frames.dtype == np.uint8 and out.frames.shape == (5, 32, 32, 3)
