"""Attention backends, sliding-tile attention, TeaCache and regional compile.

CPU-only: backend selection and fallback, STA masks against a brute-force reference, STA
with a whole-grid window equal to dense attention, TeaCache at threshold 0 equal to no
cache and skipping at a high threshold, compile equal to eager; the pipeline-level ones
also under 2-rank sequence parallelism (gloo) and CFG parallelism.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastvideo import VideoGenerator
from fastvideo.kernels_bridge import attention as bridge
from fastvideo.kernels_bridge.sta import (
    STAConfig,
    dense_token_mask,
    reference_mask,
    sta_attention,
    sta_layout,
)
from fastvideo.layers.sequence import TokenGrid
from fastvideo.pipelines.teacache import TeaCache, TeaCacheParams, polyval

CPU = torch.device("cpu")


# --- backend registry ----------------------------------------------------------------------
def test_auto_picks_sdpa_on_cpu_and_logs_it(caplog):
    bridge._logged_choice.clear()
    with caplog.at_level(logging.INFO, logger="fastvideo"):
        assert bridge.resolve_backend(None, CPU, torch.float32) == "sdpa"
        assert bridge.resolve_backend("auto", CPU, torch.float32) == "sdpa"
    assert "attention backend: sdpa (auto) on cpu" in caplog.text


def test_auto_falls_back_past_unavailable_backends_and_says_why(monkeypatch, caplog):
    bridge._logged_choice.clear()
    monkeypatch.setattr(bridge, "auto_preference", lambda device: ["sage", "flash_attn", "sdpa"])
    with caplog.at_level(logging.INFO, logger="fastvideo"):
        assert bridge.resolve_backend("auto", CPU, torch.float32) == "sdpa"
    assert "passed over sage:" in caplog.text and "flash_attn:" in caplog.text


@pytest.mark.parametrize(
    "name, reason",
    [
        ("sage", "sageattention"),  # not installed here, or needs CUDA
        ("flash_attn", "flash_attn"),
        ("sdpa_cudnn", "CUDA"),
        ("sdpa_flash", "CUDA"),
    ],
)
def test_requested_backend_that_cannot_run_is_a_clear_error(name, reason):
    with pytest.raises(ValueError, match=rf"attention_backend='{name}' cannot run on cpu") as e:
        bridge.resolve_backend(name, CPU, torch.float32)
    assert reason in str(e.value) or "CUDA" in str(e.value)


def test_unknown_backend_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown; allowed: 'auto', .*'sta'"):
        bridge.resolve_backend("flashy", CPU, torch.float32)


def test_unknown_backend_in_config_fails_before_workers_start(tiny_a):
    folder, _ = tiny_a
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        VideoGenerator.from_pretrained(str(folder), attention_backend="flashy")
    with pytest.raises(ValueError, match="not ring_degree"):
        VideoGenerator.from_pretrained(
            str(folder), num_gpus=2, attention_backend="sta", ring_degree=2, cfg_parallel=False
        )
    with pytest.raises(ValueError, match="multiple of 64"):
        VideoGenerator.from_pretrained(str(folder), sta_tile_size=(1, 3, 3))
    with pytest.raises(ValueError, match="'HxWxF'"):
        VideoGenerator.from_pretrained(str(folder), sta_window_size={"480p": (1, 1, 1)})


@pytest.mark.parametrize(
    "num_gpus, opts",
    [
        (4, dict(attention_backend="sta")),  # 6 heads, guidance off: Ulysses 2 x ring 2
        (2, dict(attention_backend="sage", ulysses_degree=1, cfg_parallel=False)),  # ring 2
    ],
)
def test_backend_without_ring_support_fails_before_workers_start(tiny_a, num_gpus, opts):
    """An automatic plan that needs ring attention is refused at start-up when the chosen
    backend cannot run it (instead of failing every request on the workers)."""
    folder, _ = tiny_a
    with pytest.raises(ValueError, match="cannot run ring attention.*ring 2"):
        VideoGenerator.from_pretrained(str(folder), num_gpus=num_gpus, **opts)


def test_teacache_without_calibration_fails_at_submission(tiny_a):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(
        str(folder), executor="inproc", teacache_coefficients=None
    ) as gen:
        with pytest.raises(ValueError, match="no TeaCache calibration"):
            gen.generate_video("a fox", enable_teacache=True, **TEA)
        assert gen.generate_video("a fox", **TEA).latents is not None  # still serving


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("torch_compile_mode", "bogus", "torch_compile_mode must be one of"),
        ("teacache_warmup_steps", -3, "teacache_warmup_steps must be an int >= 0"),
        ("teacache_coefficients", ("a",), "teacache_coefficients must be a non-empty"),
    ],
)
def test_bad_speed_settings_fail_before_workers_start(tiny_a, field, value, message):
    folder, _ = tiny_a
    with pytest.raises(ValueError, match=message):
        VideoGenerator.from_pretrained(str(folder), **{field: value})


def test_unknown_compile_backend_fails_before_workers_start(tiny_a):
    folder, _ = tiny_a
    with pytest.raises(ValueError, match="torch_compile_backend must be one of"):
        VideoGenerator.from_pretrained(
            str(folder), enable_torch_compile=True, torch_compile_backend="nope"
        )


def test_two_engines_in_one_process_keep_their_own_backend(tiny_a, dense_and_sta):
    """Each model carries its backend: starting an STA engine must not change the results
    of a dense one alive in the same process."""
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as dense:
        with VideoGenerator.from_pretrained(
            str(folder), executor="inproc", sta_window_size=(1, 1, 1), **STA_OPTS
        ) as sparse:
            a = dense.generate_video("a fox", **STA_SIZE, **COMMON).latents
            b = sparse.generate_video("a fox", **STA_SIZE, **COMMON).latents
    assert torch.equal(a, dense_and_sta["dense"])
    assert torch.equal(b, dense_and_sta["sta_1"])


def test_bad_backend_from_the_environment_fails_at_the_api_boundary(tiny_a, monkeypatch):
    folder, _ = tiny_a
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", "flashy")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        VideoGenerator.from_pretrained(str(folder), executor="inproc")


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math"])
def test_cpu_backends_match_a_float64_reference(name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16) for _ in range(3))
    ref = torch.softmax(
        q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2) / 4.0, -1
    ) @ v.double().transpose(1, 2)
    bridge.set_backend(name)
    try:
        out = bridge.attention(q, k, v)
    finally:
        bridge.set_backend(None)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


# --- sliding-tile attention ----------------------------------------------------------------
STA_CASES = [
    # grid (F, H, W), tile, window: padding in every dim, windows clamped at the edges.
    ((3, 5, 7), (2, 2, 3), (1, 2, 2)),
    ((4, 4, 4), (1, 2, 2), (3, 1, 2)),
    ((2, 6, 5), (1, 3, 2), (2, 1, 2)),
    ((5, 3, 8), (2, 1, 4), (2, 3, 1)),
]


@pytest.mark.parametrize("grid, tile, window", STA_CASES)
def test_sta_mask_equals_brute_force(grid, tile, window):
    g = TokenGrid(*grid)
    layout = sta_layout(g, tile, window, CPU)
    ours = dense_token_mask(layout)
    ref = reference_mask(g, tile, window)
    assert ref.float().mean() < 1.0, "the case must actually be sparse"
    assert torch.equal(ours, ref)


def test_sta_window_shifts_inside_the_grid_at_the_edges():
    """Every query tile sees exactly prod(window) tiles, also at the grid's corners."""
    g, tile, window = TokenGrid(1, 6, 6), (1, 2, 2), (1, 2, 2)
    mask = reference_mask(g, tile, window)
    assert set(mask.sum(1).tolist()) == {16}  # 2x2 tiles of 2x2 tokens
    assert torch.equal(dense_token_mask(sta_layout(g, tile, window, CPU)), mask)


@pytest.mark.parametrize("grid, tile, window", STA_CASES)
def test_sta_attention_equals_masked_dense_attention(grid, tile, window):
    g = TokenGrid(*grid)
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, g.num_tokens, 8) for _ in range(3))
    out = sta_attention(q, k, v, g, STAConfig(tile=tile, default_window=window))
    mask = reference_mask(g, tile, window)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid, tile", [((3, 5, 7), (2, 2, 3)), ((2, 4, 8), (1, 8, 8))])
def test_sta_whole_grid_window_is_dense_attention(grid, tile):
    g = TokenGrid(*grid)
    torch.manual_seed(2)
    extra = 3  # sequence-parallel padding rows of q: their output must be zero
    q = torch.randn(1, 2, g.num_tokens + extra, 16)
    k, v = (torch.randn(1, 2, g.num_tokens, 16) for _ in range(2))
    out = sta_attention(q, k, v, g, STAConfig(tile=tile, default_window=(99, 99, 99)))
    ref = F.scaled_dot_product_attention(q[:, :, : g.num_tokens], k, v)
    torch.testing.assert_close(out[:, :, : g.num_tokens], ref, atol=1e-5, rtol=1e-5)
    assert out[:, :, g.num_tokens :].abs().max() == 0


def test_sta_windows_per_resolution_and_default():
    cfg = STAConfig(tile=(1, 2, 2), windows=(((2, 4, 4), (1, 1, 1)),))
    assert cfg.window_for(TokenGrid(2, 4, 4)) == (1, 1, 1)
    # Not listed: the whole clip in time, ~60% of the tiles in height and width.
    assert cfg.window_for(TokenGrid(4, 10, 10)) == (4, 3, 3)


@pytest.mark.parametrize("window", [(7, 3, 5), (5, 2, 5)])
def test_sta_kept_fraction_at_480p(window):
    """480x832x81: grid 21x30x52, tiles 3x8x8 -> 7x4x7 (5x2x5 is the shipped window).
    Blocks of 64 never straddle tiles, so the kernel computes the window's tiles minus the
    key blocks that hold nothing but padding (real tokens come first inside a tile)."""
    g = TokenGrid(21, 30, 52)
    tiles_kept = (window[0] * window[1] * window[2]) / (7 * 4 * 7)
    layout = sta_layout(g, (3, 8, 8), window, CPU)
    assert layout.block == (64, 64)
    kept = layout.kept_fraction
    assert 0.9 * tiles_kept < kept <= tiles_kept, (kept, tiles_kept)
    # Key blocks of only padding are never computed.
    valid = (layout.order < g.num_tokens).view(-1, 64).any(dim=1)
    dense = layout.block_mask.to_dense()[0, 0]
    assert not dense[:, ~valid].any()


# --- TeaCache (unit) -----------------------------------------------------------------------
def test_polyval_is_highest_power_first():
    assert polyval((2.0, -1.0, 3.0), 2.0) == 2 * 4 - 2 + 3


def test_teacache_decisions_accumulate_and_reset():
    """Linear calibration (poly(x) = x): skip while the accumulated change < 0.25."""
    cache = TeaCache(TeaCacheParams(thresh=0.25, coefficients=(1.0, 0.0), warmup_steps=1))
    x = torch.zeros(1, 4, 2)
    calls = []

    def blocks(rows):
        calls.append(rows)
        return x + 1.0

    mods = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]  # relative changes ~0.1, 0.09, 0.083, ...
    ran = []
    for step, m in enumerate(mods):
        cache.step = step
        before = len(calls)
        out = cache.run(x, torch.full((1, 3), m), {"cond": slice(0, 1)}, blocks)
        ran.append(len(calls) > before)
        assert torch.equal(out, x + 1.0)  # computed or cached residual: same here
    # step 0 warm-up; then 0.1, 0.19 skip; 0.27 >= 0.25 runs; then 0.077, 0.15 skip.
    assert ran == [True, False, False, True, False, False]
    assert cache.stats() == {"teacache_skipped_cond": 4.0, "teacache_computed_cond": 2.0}


def test_teacache_mixed_branches_compute_only_their_rows():
    cache = TeaCache(TeaCacheParams(thresh=0.5, coefficients=(1.0, 0.0), warmup_steps=1))
    x = torch.arange(4.0).view(4, 1, 1)
    seen = []

    def blocks(rows):
        seen.append(None if rows is None else rows.tolist())
        h = x if rows is None else x[rows]
        return h * 10

    branches = {"cond": slice(0, 2), "uncond": slice(2, 4)}
    cache.step = 0
    cache.run(x, torch.ones(4, 1), branches, blocks)
    cache.step = 1
    mod = torch.tensor([[1.0], [1.0], [2.0], [2.0]])  # uncond changed by 100%: it runs
    out = cache.run(x, mod, branches, blocks)
    assert seen == [None, [2, 3]]
    assert torch.equal(out, x * 10)  # cond rows from the cached residual (x*10 - x)


def test_teacache_sync_makes_every_rank_decide_alike():
    """The consensus takes the max of the ranks' accumulated values per branch."""
    cache = TeaCache(
        TeaCacheParams(thresh=0.5, coefficients=(1.0, 0.0), warmup_steps=1),
        sync=lambda v: v.copy_(torch.maximum(v, torch.tensor([0.9, float("-inf")]))),
    )
    x = torch.zeros(1, 2, 2)
    cache.step = 0
    cache.run(x, torch.ones(1, 2), {"cond": slice(0, 1)}, lambda rows: x + 1)
    cache.step = 1
    ran = []
    cache.run(x, torch.ones(1, 2), {"cond": slice(0, 1)}, lambda rows: ran.append(1) or x + 1)
    assert ran == [1]  # this rank saw no change, another rank's 0.9 >= 0.5 wins


def test_teacache_select_keeps_the_remaining_items_state():
    """Requests leaving a running batch take their rows of the cached residuals along."""
    cache = TeaCache(TeaCacheParams(thresh=10.0, coefficients=(1.0, 0.0), warmup_steps=1))
    x = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2).contiguous()
    cache.step = 0
    cache.run(x, torch.ones(3, 2), {"cond": slice(0, 3)}, lambda rows: x * 10)
    cache.select(torch.tensor([0, 2]))
    x2 = x[[0, 2]]
    cache.step = 1
    ran = []
    out = cache.run(x2, torch.ones(2, 2), {"cond": slice(0, 2)}, lambda r: ran.append(1) or x2)
    assert not ran  # skipped: the kept items' residuals (9x) are reused
    assert torch.equal(out, x2 * 10)


# --- pipeline level ------------------------------------------------------------------------
STA_SIZE = dict(height=64, width=128, num_frames=5)  # token grid 2 x 4 x 8
STA_OPTS = dict(attention_backend="sta", sta_tile_size=(1, 8, 8))
COMMON = dict(negative_prompt="blurry", seed=5, num_inference_steps=4, output_type="latent")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def dense_and_sta(tiny_a):
    """In-process latents: dense SDPA, STA with a whole-grid window, STA 1-tile window."""
    folder, _ = tiny_a
    out = {}
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        out["dense"] = gen.generate_video("a fox", **STA_SIZE, **COMMON).latents
    for name, window in (("sta_full", (2, 1, 1)), ("sta_1", (1, 1, 1))):
        with VideoGenerator.from_pretrained(
            str(folder), executor="inproc", sta_window_size=window, **STA_OPTS
        ) as gen:
            out[name] = gen.generate_video("a fox", **STA_SIZE, **COMMON).latents
    return out


def test_sta_pipeline_whole_window_equals_dense_and_small_window_differs(dense_and_sta):
    assert _rel(dense_and_sta["sta_full"], dense_and_sta["dense"]) < 1e-5
    assert _rel(dense_and_sta["sta_1"], dense_and_sta["dense"]) > 1e-3


@pytest.mark.parametrize("plan", [dict(ulysses_degree=2, cfg_parallel=False), {}])
def test_sta_under_two_rank_parallelism_equals_one_rank(tiny_a, dense_and_sta, plan):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(
        str(folder), num_gpus=2, sta_window_size=(1, 1, 1), **STA_OPTS, **plan
    ) as gen:
        out = gen.generate_video("a fox", **STA_SIZE, **COMMON)
    assert out.plan == ("Ulysses 2" if plan else "CFG 2")
    assert _rel(out.latents, dense_and_sta["sta_1"]) < 1e-5


TEA = dict(negative_prompt="blurry", seed=3, num_inference_steps=12, height=32, width=32,
           num_frames=5, output_type="latent")  # fmt: skip


@pytest.fixture(scope="module")
def teacache_runs(tiny_gen):
    on = dict(enable_teacache=True, **TEA)
    return {
        "off": tiny_gen.generate_video("a fox", **TEA),
        "zero": tiny_gen.generate_video("a fox", teacache_thresh=0.0, **on),
        "high": tiny_gen.generate_video("a fox", teacache_thresh=5.0, **on),
    }


def test_teacache_threshold_zero_is_identical_to_no_cache(teacache_runs):
    assert torch.equal(teacache_runs["zero"].latents, teacache_runs["off"].latents)
    assert teacache_runs["zero"].stats["teacache_skipped_cond"] == 0
    assert teacache_runs["zero"].stats["teacache_computed_uncond"] == 12
    assert "teacache_skipped_cond" not in teacache_runs["off"].stats


def test_teacache_high_threshold_skips_steps(teacache_runs):
    high = teacache_runs["high"]
    skipped = high.stats["teacache_skipped_cond"]
    assert 0 < skipped <= 12 - 5  # the 5 warm-up steps always run
    assert high.stats["teacache_skipped_uncond"] == skipped
    assert high.stats["teacache_computed_cond"] + skipped == 12
    assert torch.isfinite(high.latents).all()
    assert not torch.equal(high.latents, teacache_runs["off"].latents)
    # Skipping reuses residuals: the result stays close to the exact one.
    assert _rel(high.latents, teacache_runs["off"].latents) < 0.5


@pytest.mark.parametrize("plan", [dict(ulysses_degree=2, cfg_parallel=False), {}])
def test_teacache_under_two_rank_parallelism_takes_the_same_decisions(tiny_a, teacache_runs, plan):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), num_gpus=2, **plan) as gen:
        high = gen.generate_video("a fox", enable_teacache=True, teacache_thresh=5.0, **TEA)
    assert high.plan == ("Ulysses 2" if plan else "CFG 2")
    assert high.stats == teacache_runs["high"].stats
    assert _rel(high.latents, teacache_runs["high"].latents) < 1e-5


def test_teacache_request_validation(tiny_gen):
    with pytest.raises(ValueError, match="teacache_thresh must be a finite number >= 0"):
        tiny_gen.generate_video("a fox", enable_teacache=True, teacache_thresh=-1.0)
    with pytest.raises(TypeError, match="enable_teacache must be a bool"):
        tiny_gen.generate_video("a fox", enable_teacache="yes")


# --- regional compile ----------------------------------------------------------------------
@pytest.mark.parametrize("num_gpus", [1, 2])
def test_compiled_blocks_equal_eager(tiny_a, teacache_runs, num_gpus):
    """Regional compile (aot_eager on CPU CI: the same graph capture and graph breaks as
    inductor, without a C++ toolchain) gives the eager result, also under Ulysses."""
    folder, _ = tiny_a
    plan = dict(ulysses_degree=2, cfg_parallel=False) if num_gpus == 2 else {}
    with VideoGenerator.from_pretrained(
        str(folder),
        num_gpus=num_gpus,
        enable_torch_compile=True,
        torch_compile_backend="aot_eager",
        **plan,
    ) as gen:
        out = gen.generate_video("a fox", **TEA)
    assert _rel(out.latents, teacache_runs["off"].latents) < 1e-5


def test_frames_still_decode_with_teacache(tiny_gen):
    out = tiny_gen.generate_video(
        "a fox", enable_teacache=True, num_inference_steps=8, height=32, width=32, num_frames=5
    )
    assert out.frames.dtype == np.uint8 and out.frames.shape == (5, 32, 32, 3)
