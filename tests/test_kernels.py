"""Attention backends, sliding-tile attention and regional compile.

CPU-only: backend selection and fallback, STA masks against a brute-force mask written in
this file, STA with a whole-grid window equal to dense attention, compile equal to eager
and really compiling; the pipeline-level ones also under 2-rank sequence parallelism
(gloo) and CFG parallelism. The 480p STA layouts are checked in the GPU suite.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from fastvideo import VideoGenerator
from fastvideo.cache.calibration import MagCacheCalibration, TeaCacheCalibration
from fastvideo.kernels_bridge import attention as bridge
from fastvideo.kernels_bridge.sta import (
    STAConfig,
    dense_token_mask,
    sta_attention,
    sta_layout,
)
from fastvideo.layers.sequence import TokenGrid

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


# --- FlashAttention-4 ---------------------------------------------------------------------
def _sdpa_blhd(q, k, v):
    """What flash_attn.cute.flash_attn_func computes: [B, L, H, D] in, (out, lse) out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), None


@pytest.fixture
def fake_fa4(monkeypatch):
    """A stand-in ``flash_attn.cute`` package; tests set its ``flash_attn_func``."""
    import importlib.machinery
    import sys
    import types

    parent, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    parent.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    cute.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute", None)
    parent.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", parent)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return cute


def test_fa4_without_its_package_names_the_extra():
    with pytest.raises(ValueError, match=r"attention_backend='fa4' cannot run") as e:
        bridge.resolve_backend("fa4", CPU, torch.bfloat16)
    assert "fastvideo[fa4]" in str(e.value)


def test_fa4_installed_still_needs_cuda(fake_fa4):
    fake_fa4.flash_attn_func = _sdpa_blhd
    why = bridge._BACKENDS["fa4"].why_unavailable(CPU, torch.bfloat16)
    assert why is not None and "CUDA" in why


def test_auto_tries_fa4_first_on_hopper_and_newer(monkeypatch):
    cuda = torch.device("cuda", 0)
    for capability, expected in (((9, 0), "fa4"), ((10, 0), "fa4"), ((8, 0), "flash_attn")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert bridge.auto_preference(cuda)[0] == expected
    assert bridge.auto_preference(CPU) == ["sdpa"]


def test_fa4_forward_uses_the_model_layout_and_its_output(fake_fa4):
    """[B, H, L, D] in and out around FA4's [B, L, H, D]; the (out, lse) pair unpacked."""
    calls = []

    def flash_attn_func(q, k, v):
        calls.append(q.shape)
        return _sdpa_blhd(q, k, v)

    fake_fa4.flash_attn_func = flash_attn_func
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    out = bridge._BACKENDS["fa4"].forward(q, k, v)
    assert calls == [torch.Size([2, 10, 3, 8])]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("wrong", ["values", "unscaled", "shape"])
def test_auto_passes_over_an_fa4_build_that_computes_something_else(
    fake_fa4, monkeypatch, caplog, wrong
):
    """The start-up probe compares FA4 with fp32 attention: a build that returns the wrong
    thing is passed over (logged), a right one is chosen."""
    bridge._logged_choice.clear()
    monkeypatch.setattr(bridge, "auto_preference", lambda device: ["fa4", "sdpa"])
    fa4 = bridge._BACKENDS["fa4"]
    monkeypatch.setitem(
        bridge._BACKENDS,
        "fa4",
        bridge.AttentionBackend("fa4", lambda d, t: None, fa4.forward, checked=True),
    )
    broken = {
        "values": lambda q, k, v: (v, None),
        "unscaled": lambda q, k, v: _sdpa_blhd(q * q.shape[-1] ** 0.5, k, v),
        "shape": lambda q, k, v: (_sdpa_blhd(q, k, v)[0][:, :-1], None),
    }
    fake_fa4.flash_attn_func = broken[wrong]
    with caplog.at_level(logging.INFO, logger="fastvideo"):
        assert bridge.resolve_backend("auto", CPU, torch.float32) == "sdpa"
    assert "passed over fa4: its output" in caplog.text
    bridge._logged_choice.clear()
    fake_fa4.flash_attn_func = _sdpa_blhd
    assert bridge.resolve_backend("auto", CPU, torch.float32) == "fa4"
    assert bridge.resolve_backend("fa4", CPU, torch.float32) == "fa4"


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
        VideoGenerator.from_pretrained(str(folder), num_gpus=num_gpus, device="cpu", **opts)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("torch_compile_mode", "bogus", "torch_compile_mode must be one of"),
        ("teacache", TeaCacheCalibration((1.0,), warmup_steps=-3), "warmup_steps must be"),
        ("teacache", TeaCacheCalibration(("a",)), "coefficients must be a non-empty"),
        ("magcache", MagCacheCalibration((1.0, 1.0, 0.9)), "even-length"),
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
    out = bridge.attention(q, k, v, backend=name)
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


def reference_mask(grid: TokenGrid, tile, window) -> torch.Tensor:
    """Brute-force [N, N] token mask in raster order, from STA's definition: query token i
    attends key token j iff j's tile lies in the window centred on i's tile, the window
    shifted inside the tile grid at its edges."""
    tiles = [-(-n // t) for n, t in zip(grid, tile, strict=True)]
    pos = [(f, h, w) for f in range(grid.frames) for h in range(grid.height)
           for w in range(grid.width)]  # fmt: skip
    mask = torch.zeros(len(pos), len(pos), dtype=torch.bool)
    for i, qp in enumerate(pos):
        lo = []
        for c, t, win, n in zip(qp, tile, window, tiles, strict=True):
            centre = c // t
            lo.append(min(max(centre - (win - 1) // 2, 0), n - win))
        for j, kp in enumerate(pos):
            mask[i, j] = all(
                lo_d <= c // t < lo_d + win
                for c, t, lo_d, win in zip(kp, tile, lo, window, strict=True)
            )
    return mask


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


@pytest.mark.parametrize("text_lens", [None, [5, 2]])
@pytest.mark.parametrize("grid, tile, window", STA_CASES[:2])
def test_joint_sta_equals_a_masked_softmax_over_video_and_text(grid, tile, window, text_lens):
    """HunyuanVideo's joint attention under STA: a video query sees the video keys of its
    window and every valid text key, a text query sees every key, as one masked softmax
    over [video; text] (the mask from the brute-force definition; invalid text keys are
    masked for every query). Differs from dense joint attention (the window is sparse)."""
    from fastvideo.layers.joint_attention import joint_local

    g = TokenGrid(*grid)
    n, lt, b = g.num_tokens, 6, 2
    torch.manual_seed(3)
    qv, kv, vv = (torch.randn(b, n, 2, 8) for _ in range(3))
    qt, kt, vt = (torch.randn(b, lt, 2, 8) for _ in range(3))
    sta = STAConfig(tile=tile, default_window=window)
    out, t_out = joint_local(qv, kv, vv, (qt, kt, vt), text_lens, "sta", sta, g)
    video = reference_mask(g, tile, window)
    refs = []
    for i in range(b):
        valid = lt if text_lens is None else text_lens[i]
        mask = torch.zeros(n + lt, n + lt, dtype=torch.bool)
        mask[:n, :n] = video
        mask[:, n : n + valid] = True
        mask[n:, :n] = True
        q, k, v = (torch.cat(x, 1)[i : i + 1].transpose(1, 2).double()
                   for x in ((qv, qt), (kv, kt), (vv, vt)))  # fmt: skip
        refs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2))
    ref = torch.cat(refs)
    torch.testing.assert_close(out.double(), ref[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_out.double(), ref[:, n:], atol=1e-5, rtol=1e-5)
    dense, _ = joint_local(qv, kv, vv, (qt, kt, vt), text_lens, "sdpa", None, g)
    assert (dense - out).abs().max() > 1e-2, "the window must leave keys out"


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


def test_sta_window_table_maps_resolutions_to_their_own_token_grids(tiny_a):
    """'HxWxF' keys become (frames, height, width) token grids: a non-square size whose
    height and width swapped would land on a different grid."""
    from fastvideo.config import PipelineConfig
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.worker.worker import sta_config

    spec = read_wan_spec(tiny_a[0])  # VAE 8x / 4x, patch 1x2x2
    config = PipelineConfig(sta_window_size={"64x128x9": (1, 1, 2), "128x64x9": (2, 1, 1)})
    sta = sta_config(config, spec)
    assert sta.window_for(TokenGrid(3, 4, 8)) == (1, 1, 1)  # 64x128: clamped to 1x1x1 tiles
    grids = dict(sta.windows)
    assert grids[(3, 4, 8)] == (1, 1, 2) and grids[(3, 8, 4)] == (2, 1, 1)


def test_sta_windows_per_resolution_and_default():
    cfg = STAConfig(tile=(1, 2, 2), windows=(((2, 4, 4), (1, 1, 1)),))
    assert cfg.window_for(TokenGrid(2, 4, 4)) == (1, 1, 1)
    # Not listed: the whole clip in time, ~60% of the tiles in height and width.
    assert cfg.window_for(TokenGrid(4, 10, 10)) == (4, 3, 3)


@pytest.mark.parametrize("window", [(3, 2, 2), (1, 1, 3), (2, 1, 2)])
def test_sta_kept_fraction_follows_the_window(window):
    """Grid 7x12x20 with the shipped 3x8x8 tiles -> 3x2x3 tiles, padding in every dim.
    Blocks of 64 never straddle tiles and a tile's real tokens come first, so the kernel
    computes, for each query tile, ceil(real tokens / 64) key blocks of every tile in its
    window: the expected fraction, derived here from the tile geometry alone."""
    g, tile = TokenGrid(7, 12, 20), (3, 8, 8)
    layout = sta_layout(g, tile, window, CPU)
    assert layout.block == (64, 64)
    tiles = [-(-n // t) for n, t in zip(g, tile, strict=True)]
    per_tile = 3 * 8 * 8 // 64  # query (and key) blocks per tile

    def real(index, axis):  # real tokens of tile ``index`` along ``axis``
        return min(tile[axis], g[axis] - index * tile[axis])

    def window_of(c, axis):
        lo = min(max(c - (window[axis] - 1) // 2, 0), tiles[axis] - window[axis])
        return range(lo, lo + window[axis])

    kept = 0
    for qf in range(tiles[0]):
        for qh in range(tiles[1]):
            for qw in range(tiles[2]):
                for kf in window_of(qf, 0):
                    for kh in window_of(qh, 1):
                        for kw in window_of(qw, 2):
                            tokens = real(kf, 0) * real(kh, 1) * real(kw, 2)
                            kept += per_tile * -(-tokens // 64)
    blocks = tiles[0] * tiles[1] * tiles[2] * per_tile
    assert layout.kept_fraction == pytest.approx(kept / blocks**2)


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
def eager_latents(tiny_gen):
    return tiny_gen.generate_video("a fox", **TEA).latents


# --- regional compile ---------------------------------------------------------------------
def test_compiled_blocks_equal_eager_and_really_compile(tiny_a, eager_latents):
    """Regional compile (aot_eager on CPU CI: the same graph capture and graph breaks as
    inductor, without a C++ toolchain) gives the eager result, and dynamo really captured
    graphs for the blocks (one per block shape, not per block), each whole: attention is
    an op of the graph, not a break."""
    from torch._dynamo.utils import counters

    folder, _ = tiny_a
    torch._dynamo.reset()
    counters.clear()
    with VideoGenerator.from_pretrained(
        str(folder), executor="inproc", enable_torch_compile=True,
        torch_compile_backend="aot_eager",
        compile_warmup=False,  # the model's default size (480x832x81) is slow on a CPU
    ) as gen:  # fmt: skip
        dit = gen.executor._worker.pipeline.components["transformer"]
        assert all(block._compiled_call_impl is not None for block in dit.blocks)
        out = gen.generate_video("a fox", **TEA)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, dict(counters["stats"])
    # One rank: attention is one op of the graph, so a block compiles without a break.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _rel(out.latents, eager_latents) < 1e-5


COMPILE_RUN = """
import json, sys, time
from torch._dynamo.utils import counters
from fastvideo import DEMO_MODEL_ID, VideoGenerator

start = time.perf_counter()
gen = VideoGenerator.from_pretrained(DEMO_MODEL_ID, executor="inproc", device="cpu",
                                     enable_torch_compile=True, compile_cache_dir=sys.argv[1])
ready = time.perf_counter() - start
at_ready = dict(counters["inductor"]), counters["stats"]["unique_graphs"]
out = gen.generate_video("a fox", num_inference_steps=2, output_type="latent", seed=1)
gen.shutdown()
print("RESULT", json.dumps(dict(inductor=at_ready[0], graphs=at_ready[1], ready_s=ready,
      after=dict(counters["inductor"]), latents=out.latents.flatten()[:64].tolist())))
"""


def _compile_run(folder) -> dict:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", COMPILE_RUN, str(folder)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def test_inductor_compiles_at_start_up_and_a_restart_reads_the_disk_cache(tmp_path):
    """enable_torch_compile with inductor (the default): the warm-up step compiles the
    blocks before from_pretrained returns, into compile_cache_dir; a second process with
    the same folder finds every graph there (each lookup a hit, no miss), and the first
    request after start-up compiles nothing new."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    first = _compile_run(tmp_path)
    assert first["graphs"] >= 1, "nothing was compiled before the engine was ready"
    misses, hits = (first["inductor"].get(f"fxgraph_cache_{k}", 0) for k in ("miss", "hit"))
    assert misses >= 1, first["inductor"]  # (a hit: a graph the same as one before it)
    assert any((tmp_path / "fxgraph").rglob("*")), "no FX graph was written to the folder"
    assert first["after"] == first["inductor"], "the first request compiled again"
    second = _compile_run(tmp_path)
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second["inductor"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) == misses + hits, second["inductor"]
    assert second["latents"] == first["latents"]
    print(f"\nready: {first['ready_s']:.1f} s compiling, {second['ready_s']:.1f} s from the cache")


@pytest.mark.slow
def test_compiled_blocks_under_ulysses_equal_eager(tiny_a, eager_latents):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(
        str(folder), num_gpus=2, enable_torch_compile=True, torch_compile_backend="aot_eager",
        ulysses_degree=2, cfg_parallel=False, compile_warmup=False,
    ) as gen:  # fmt: skip
        out = gen.generate_video("a fox", **TEA)
    assert out.plan == "Ulysses 2"
    assert _rel(out.latents, eager_latents) < 1e-5


def test_fa4_compiled_kernels_persist_on_disk_unless_the_user_says_otherwise(monkeypatch, tmp_path):
    """FlashAttention-4's persistent JIT cache is switched on, under FASTVIDEO_CACHE_DIR,
    before flash_attn.cute is imported; the user's own settings of its switches stay."""
    from fastvideo.kernels_bridge import attention

    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTVIDEO_CACHE_DIR", str(tmp_path))
    attention.fa4_disk_cache()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "fa4")
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "/elsewhere")
    attention.fa4_disk_cache()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == "/elsewhere"


def test_fa4_log_sum_exp_feeds_ring_attentions_merge(fake_fa4):
    """attention_with_lse with the fa4 backend calls FA4 for its log-sum-exp ([B, H, L],
    natural log): the partials over two halves of the keys, merged as the ring merges
    them, equal attention over all keys, and SDPA's own (out, lse)."""
    from fastvideo.layers.attention import _merge

    calls = []

    def flash_attn_func(q, k, v, return_lse=False):
        calls.append(return_lse)
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * q.shape[-1] ** -0.5
        out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.float()).to(q.dtype)
        return out, (torch.logsumexp(scores, -1) if return_lse else None)

    fake_fa4.flash_attn_func = flash_attn_func
    q, k, v = (torch.randn(2, 12, 3, 8) for _ in range(3))
    out, lse = bridge.attention_with_lse(q, k, v, "fa4")
    ref_out, ref_lse = bridge.attention_with_lse(q, k, v)  # SDPA's kernel
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    merged = merged_lse = None
    for keys in (slice(0, 5), slice(5, None)):  # two ring chunks of the keys
        part = bridge.attention_with_lse(q, k[:, keys], v[:, keys], "fa4")
        merged, merged_lse = _merge(merged, merged_lse, *part)
    assert merged is not None and merged_lse is not None
    torch.testing.assert_close(merged.to(q.dtype), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert calls and all(calls)


def test_lazy_package_init_defers_the_packages_own_init(tmp_path, monkeypatch):
    """lazy_package_init (FA4's import without quack's heavy __init__): submodules import
    without running __init__, the eager ones at once; a name __init__ binds (even one that
    is also a submodule's) runs it, once; an already imported package is left alone; a
    failing eager import leaves no half-registered package behind."""
    import sys

    pkg = tmp_path / "heavypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import sys\nsys.modules['heavypkg.trace'].ran.append('init')\n"
        "from heavypkg import slow\nfrom heavypkg.tool import tool\nVALUE = 41 + slow.ONE\n"
    )
    (pkg / "tool.py").write_text("def tool():\n    return 'fn'\n")
    (pkg / "trace.py").write_text("ran = []\n")
    (pkg / "slow.py").write_text("import heavypkg.trace as t\nt.ran.append('slow')\nONE = 1\n")
    (pkg / "dsl.py").write_text("import heavypkg.trace as t\nt.ran.append('dsl')\n")
    (pkg / "util.py").write_text("X = 3\n")
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("")
    (tmp_path / "brokenpkg" / "dsl.py").write_text("raise ImportError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in list(sys.modules):
        if name.split(".")[0] in ("heavypkg", "brokenpkg"):
            monkeypatch.delitem(sys.modules, name)
    import importlib

    # trace first, so __init__ can record into it (imported as a submodule: no __init__)
    assert bridge.lazy_package_init("heavypkg", eager=("trace", "dsl"))
    trace = sys.modules["heavypkg.trace"]
    assert trace.ran == ["dsl"]
    from heavypkg import util  # a submodule: still no __init__

    assert util.X == 3 and trace.ran == ["dsl"]
    heavypkg = importlib.import_module("heavypkg")
    # A submodule's name that __init__ rebinds (to a function) is __init__'s binding.
    assert heavypkg.tool() == "fn" and trace.ran == ["dsl", "init", "slow"]
    assert heavypkg.VALUE == 42 and trace.ran == ["dsl", "init", "slow"]
    assert heavypkg.VALUE == 42 and trace.ran == ["dsl", "init", "slow"]  # ran once
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        heavypkg.missing  # noqa: B018
    assert not bridge.lazy_package_init("heavypkg")
    with pytest.raises(ImportError, match="no"):
        bridge.lazy_package_init("brokenpkg", eager=("dsl",))
    assert not any(n.split(".")[0] == "brokenpkg" for n in sys.modules)
    for name in list(sys.modules):
        if name.split(".")[0] in ("heavypkg", "brokenpkg"):
            del sys.modules[name]


def test_fa4_preload_imports_on_a_thread_only_where_fa4_would_run(monkeypatch, fake_fa4):
    """preload: on a CUDA device where auto (or an explicit fa4) would use FA4, its import
    starts on a thread (the worker's weight reads overlap it); elsewhere nothing starts."""
    cuda = torch.device("cuda", 0)
    assert bridge.preload("auto", CPU) is None
    assert bridge.preload("sdpa", cuda) is None
    monkeypatch.setattr(bridge, "auto_preference", lambda device: ["fa4", "sdpa"])
    import dataclasses

    fa4 = bridge._BACKENDS["fa4"]
    monkeypatch.setitem(
        bridge._BACKENDS, "fa4", dataclasses.replace(fa4, why_unavailable=lambda d, t: "no")
    )
    assert bridge.preload("auto", cuda) is None
    monkeypatch.setitem(
        bridge._BACKENDS, "fa4", dataclasses.replace(fa4, why_unavailable=lambda d, t: None)
    )
    imported = []
    monkeypatch.setattr(bridge, "_fa4_func", lambda: imported.append(True))
    for name in ("auto", "fa4", None):
        thread = bridge.preload(name, cuda)
        assert thread is not None
        thread.join(5)
    assert imported == [True, True, True]


def test_fa4_preload_before_args_guesses_from_the_environment_only(monkeypatch, fake_fa4):
    """A CUDA worker waiting for its arguments starts FA4's import when FA4 is installed
    and the backend asked for (the driver's hint, else FASTVIDEO_ATTENTION_BACKEND) is
    auto or fa4; never for another backend."""
    imported = []
    monkeypatch.setattr(bridge, "_fa4_func", lambda: imported.append(True))
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", "sdpa")
    assert bridge.preload_before_args() is None
    for value in ("", "auto", "fa4"):
        monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", value)
        thread = bridge.preload_before_args()
        assert thread is not None
        thread.join(5)
    assert imported == [True, True, True]
    # The driver's reading of the configuration (which already took the variable into
    # account) wins over the variable.
    assert bridge.preload_before_args("sdpa") is None
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", "sdpa")
    thread = bridge.preload_before_args("fa4")
    assert thread is not None
    thread.join(5)
    assert imported == [True] * 4
    monkeypatch.setattr(bridge, "_installed", lambda module: False)
    monkeypatch.delenv("FASTVIDEO_ATTENTION_BACKEND")
    assert bridge.preload_before_args() is None
    assert imported == [True] * 4


def test_the_first_fa4_import_records_when_it_ran(monkeypatch, fake_fa4):
    """The worker's start-up breakdown reports when FA4's import started and ended; an
    import already done records nothing new."""
    import sys

    monkeypatch.setattr(bridge, "fa4_import_times", {})
    monkeypatch.delitem(sys.modules, "flash_attn.cute")
    monkeypatch.setattr(bridge, "lazy_package_init", lambda *a, **k: False)
    monkeypatch.setattr(sys.modules["flash_attn"], "__path__", [], raising=False)
    import importlib.abc
    import importlib.machinery

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == "flash_attn.cute" else None

        def create_module(self, spec):
            return fake_fa4

        def exec_module(self, module):
            module.flash_attn_func = _sdpa_blhd

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert bridge._fa4_func() is _sdpa_blhd
    times = dict(bridge.fa4_import_times)
    assert set(times) == {"start", "end"} and times["start"] <= times["end"]
    bridge._fa4_func()
    assert bridge.fa4_import_times == times


def test_a_running_fa4_preload_is_joined_not_started_again(monkeypatch, fake_fa4):
    """The worker's early preload is still importing when its weight reads start: the
    second preload hands back that thread instead of starting another import."""
    import threading

    release, imported = threading.Event(), []
    monkeypatch.setattr(bridge, "_fa4_func", lambda: (release.wait(5), imported.append(True)))
    monkeypatch.setattr(bridge, "_import_threads", [])
    monkeypatch.setattr(bridge, "auto_preference", lambda device: ["fa4", "sdpa"])
    import dataclasses

    fa4 = bridge._BACKENDS["fa4"]
    monkeypatch.setitem(
        bridge._BACKENDS, "fa4", dataclasses.replace(fa4, why_unavailable=lambda d, t: None)
    )
    first = bridge.preload_before_args("auto")
    assert first is not None and bridge.preload("auto", torch.device("cuda", 0)) is first
    release.set()
    first.join(5)
    assert imported == [True]
