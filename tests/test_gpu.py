"""GPU tests (marked ``gpu``; skipped without CUDA). ``python -m benchmarks.run gpu-tests``
runs them on the lent GPU machine (sized for about 3 minutes on one H200; not yet timed
there) and stores the outcome of each as ``benchmarks/results/gpu_tests_<gpu>.json``.

- every attention backend that runs here against an fp32 reference at Wan shapes
  (self-attention over 4,096 and 32,760 tokens, cross-attention to 512 text keys);
- sliding-tile attention at the 480p grid: the layout's kept fraction and padding blocks,
  and the compiled FlexAttention kernel against the masked fp32 reference;
- inductor's compile of a Wan block against eager;
- step-cache decisions (TeaCache, MagCache) on the GPU equal to the CPU path's;
- our bf16 DiTs against diffusers' on a tiny and a mid-size config;
- with two GPUs: CFG / Ulysses / ring plans equal to one GPU, and STA + TeaCache under
  Ulysses taking one GPU's decisions.

Tolerances: one bf16 forward differs from fp32 (or from diffusers' bf16) by a few 1e-3
relative (bf16 keeps 8 significant bits), so 1e-2 for one forward and 3e-2 after several
denoising steps; SageAttention quantises q and k to int8 (~1.4e-2 at 32k tokens in an
earlier H200 run): 3e-2. Every comparison also checks that a wrong answer would be caught:
a perturbed input (keys shifted against values, another timestep or text, latents shifted
by a frame) must land at least five tolerances away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

from fastvideo import DEMO_MODEL_ID, VideoGenerator
from fastvideo.kernels_bridge import attention as bridge
from fastvideo.layers.sequence import TokenGrid

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BF16_TOL = 1e-2  # one forward
STEPS_TOL = 3e-2  # several denoising steps
BACKEND_TOL = {"sage": 3e-2}
POWER = 5  # a wrong answer (a perturbed input) must land this many tolerances away
WAN_HEADS, HEAD_DIM = 12, 128


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()  # results of a CPU and a GPU run meet here
    return float((a - b).norm() / b.norm())


def _fp32_attention(q, k, v, mask=None) -> torch.Tensor:
    """fp32 reference of model-layout [B, L, H, D] inputs (memory-efficient kernel: no
    N x N scores), returned in the same layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    kernels = [SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda else [SDPBackend.FLASH_ATTENTION,
                                                                  SDPBackend.MATH]  # fmt: skip
    with sdpa_kernel(kernels):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


# --- attention backends --------------------------------------------------------------------
DENSE = [n for n in bridge.available_backends() if not bridge._BACKENDS[n].video_only]
SHAPES = {"self-4096": (4096, 4096), "self-32760": (32760, 32760), "cross-32760x512": (32760, 512)}


@pytest.fixture(scope="module")
def attention_cases():
    """Shape name -> (q, k, v bf16 [1, L, 12, 128], fp32 reference, a wrong answer)."""
    cases = {}
    for name, (lq, lk) in SHAPES.items():
        g = torch.Generator(device=CUDA).manual_seed(lq + lk)
        q = torch.randn(1, lq, WAN_HEADS, HEAD_DIM, device=CUDA, generator=g).bfloat16()
        k, v = (torch.randn(1, lk, WAN_HEADS, HEAD_DIM, device=CUDA, generator=g).bfloat16()
                for _ in range(2))  # fmt: skip
        # Keys shifted by one position against their values: what a kernel mixing up
        # its operands would give.
        cases[name] = (q, k, v, _fp32_attention(q, k, v), _fp32_attention(q, k.roll(1, 1), v))
    return cases


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", DENSE)
def test_attention_backend_matches_fp32(attention_cases, backend, shape):
    why = bridge._BACKENDS[backend].why_unavailable(CUDA, torch.bfloat16)
    why = why or bridge._probe(backend, CUDA, torch.bfloat16)
    if why is not None:
        pytest.skip(f"{backend} cannot run here: {why}")
    q, k, v, ref, wrong = attention_cases[shape]
    if backend == "sdpa_math" and q.shape[1] * k.shape[1] > 4096 * 4096:
        pytest.skip("sdpa_math materialises the L x L scores: checked at 4096 tokens only")
    out = bridge.attention(q, k, v, backend=backend)
    tol = BACKEND_TOL.get(backend, BF16_TOL)
    err = _rel(out, ref)
    print(f"\n{backend} {shape}: relative error vs fp32 {err:.2e}")
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert err < tol
    assert _rel(wrong, ref) > POWER * tol, "the reference cannot tell a wrong answer"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fa4_log_sum_exp_matches_sdpas(attention_cases, shape):
    """Ring attention's partials from FA4 (attention_with_lse with the fa4 backend): the
    output as accurate as FA4's own and the log-sum-exp equal to SDPA's kernel's."""
    why = bridge._BACKENDS["fa4"].why_unavailable(CUDA, torch.bfloat16)
    why = why or bridge._probe("fa4", CUDA, torch.bfloat16)
    if why is not None:
        pytest.skip(f"fa4 cannot run here: {why}")
    q, k, v, ref, _ = attention_cases[shape]
    out, lse = bridge.attention_with_lse(q, k, v, "fa4")
    sdpa_out, sdpa_lse = bridge.attention_with_lse(q, k, v)
    assert out.shape == q.shape and lse.shape == sdpa_lse.shape and lse.dtype == torch.float32
    assert _rel(out, ref) < BACKEND_TOL.get("fa4", BF16_TOL)
    assert (lse - sdpa_lse).abs().max() < 1e-2, (lse - sdpa_lse).abs().max()


# --- sliding-tile attention at 480p ------------------------------------------------------------
GRID_480P = TokenGrid(21, 30, 52)  # 480x832x81: 21 latent frames, 60x104 latents, patch 2x2
TILE = (3, 8, 8)


@pytest.mark.parametrize("window", [(5, 2, 5), (7, 3, 5)])
def test_sta_layout_at_480p(window):
    """Tiles 3x8x8 -> 7x4x7 tiles. Blocks of 64 never straddle tiles, so the kernel
    computes the window's tiles minus the key blocks that hold only padding (a tile's real
    tokens come first): within [0.9, 1] x the window's tile fraction, and no block of pure
    padding is ever computed."""
    from fastvideo.kernels_bridge.sta import sta_layout

    layout = sta_layout(GRID_480P, TILE, window, CUDA)
    assert layout.block == (64, 64)
    tiles_kept = (window[0] * window[1] * window[2]) / (7 * 4 * 7)
    kept = layout.kept_fraction
    assert 0.9 * tiles_kept <= kept <= tiles_kept, (kept, tiles_kept)
    valid = (layout.order < GRID_480P.num_tokens).view(-1, 64).any(dim=1)
    assert (~valid).any(), "the 480p grid has padding blocks: the check must have power"
    dense = layout.block_mask.to_dense()[0, 0]
    assert not dense[:, ~valid].any()


def test_sta_layout_at_hunyuan_720p_fits():
    """HunyuanVideo 720x1280x129 (33x45x80 tokens, 126,720 slots with tile padding): the
    block mask is built without the size^2 token mask (120 GiB as int64), and keeps about
    the window's share of the tiles."""
    from fastvideo.kernels_bridge.sta import sta_layout

    grid, window = TokenGrid(33, 45, 80), (7, 4, 6)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    layout = sta_layout(grid, TILE, window, CUDA)
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
    assert peak_gib < 4, f"building the mask took {peak_gib:.1f} GiB"
    tiles_kept = (7 * 4 * 6) / (11 * 6 * 10)
    assert 0.85 * tiles_kept <= layout.kept_fraction <= tiles_kept, layout.kept_fraction


def _wan_1_3b_spec():
    from fastvideo.wire.spec import ModelSpec

    return ModelSpec(family="wan", pipeline_class_name="WanPipeline", num_heads=WAN_HEADS,
                     in_channels=16, patch_size=(1, 2, 2), vae_scale_spatial=8,
                     vae_scale_temporal=4, max_positions=1024)  # fmt: skip


def test_sta_compiled_kernel_matches_masked_reference_at_480p():
    """The shipped 480x832x81 window (5x2x5 tiles, ~25% of the blocks) through the
    attention function the model calls, compiled FlexAttention on CUDA, against fp32
    attention under the same token mask; dense attention is far from it."""
    from fastvideo.config import PipelineConfig
    from fastvideo.kernels_bridge import sta as sta_module
    from fastvideo.kernels_bridge.sta import dense_token_mask, sta_layout
    from fastvideo.models.wan.registration import STA_WINDOWS
    from fastvideo.worker.worker import sta_config

    config = PipelineConfig(sta_tile_size=TILE, sta_window_size=STA_WINDOWS)
    sta = sta_config(config, _wan_1_3b_spec())
    assert sta.window_for(GRID_480P) == (5, 2, 5)
    n = GRID_480P.num_tokens
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, HEAD_DIM, device=CUDA, generator=g).bfloat16()
               for _ in range(3))  # fmt: skip
    out = bridge.attention(q, k, v, grid=GRID_480P, backend="sta", sta=sta)
    assert sta_module._compiled_flex is not None, "FlexAttention ran eagerly"
    mask = dense_token_mask(sta_layout(GRID_480P, TILE, (5, 2, 5), CUDA))
    ref = _fp32_attention(q, k, v, mask)
    err, dense_err = _rel(out, ref), _rel(out, _fp32_attention(q, k, v))
    print(f"\nSTA 480p: relative error vs masked fp32 {err:.2e}, vs dense {dense_err:.2e}")
    assert err < BF16_TOL
    assert dense_err > POWER * BF16_TOL


# --- regional compile -------------------------------------------------------------------------
def _random_wan(cfg: dict, seed: int = 0):
    """Our Wan DiT on the GPU with seeded random weights (modulation tables ~N(0, 0.5), q/k
    norms ~N(2, 0.2): see ``_saved_diffusers``), bf16 with the loader's fp32 parameters
    (``FP32_PARAM_PATTERNS``)."""
    from fastvideo.models.wan.transformer import (
        FP32_PARAM_PATTERNS,
        WanTransformer3D,
        WanTransformerConfig,
    )

    torch.manual_seed(seed)
    with CUDA:
        model = WanTransformer3D(WanTransformerConfig.from_dict(cfg))
    for name, p in model.named_parameters():
        # Open gates and sharp attention, as in _saved_diffusers: the block must matter.
        if name.endswith("scale_shift_table"):
            p.data.normal_(0.0, 0.5)
        elif name.endswith(("norm_q.weight", "norm_k.weight")):
            p.data.normal_(2.0, 0.2)
        if not any(pat in name for pat in FP32_PARAM_PATTERNS):
            p.data = p.data.bfloat16()
    model.set_attention(bridge.resolve_backend("auto", CUDA, torch.bfloat16))
    return model.eval().requires_grad_(False)


WAN_1_3B_BLOCK = {
    "patch_size": [1, 2, 2], "num_attention_heads": WAN_HEADS, "attention_head_dim": HEAD_DIM,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960,
    "num_layers": 1, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("under_compile", [False, True], ids=["inductor_fuses", "our_kernels"])
def test_inductor_compiled_wan_block_matches_eager(under_compile, monkeypatch):
    """One Wan2.1-1.3B block (1,536 wide) over 3x16x16 tokens, regionally compiled with
    inductor (what ``enable_torch_compile`` runs), against eager: one graph (attention an
    op in it), with Inductor's fusion or our fused kernels kept as ops."""
    from torch._dynamo.utils import counters

    from fastvideo.kernels_bridge import fused

    monkeypatch.setattr(fused, "_UNDER_COMPILE", under_compile)

    model = _random_wan(WAN_1_3B_BLOCK)
    grid = TokenGrid(3, 16, 16)
    g = torch.Generator(device=CUDA).manual_seed(1)
    tokens = torch.randn(1, grid.num_tokens, 64, device=CUDA, generator=g).bfloat16()
    text = torch.randn(1, 512, 4096, device=CUDA, generator=g).bfloat16()
    t = torch.tensor([700.0], device=CUDA)
    eager = model.forward_tokens(tokens, t, text, grid)
    other = model.forward_tokens(tokens, torch.tensor([100.0], device=CUDA), text, grid)
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks("inductor")
    compiled = model.forward_tokens(tokens, t, text, grid)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    err = _rel(compiled, eager)
    print(f"\ninductor Wan block: relative error vs eager {err:.2e}")
    assert err < BF16_TOL
    assert _rel(other, eager) > POWER * BF16_TOL
    torch._dynamo.reset()


# --- step caches ------------------------------------------------------------------------------
CACHE_RUN = dict(negative_prompt="blurry", seed=3, num_inference_steps=12, height=32, width=32,
                 num_frames=5, output_type="latent")  # fmt: skip
CACHES = {"teacache": 5.0, "magcache": 0.5}  # thresholds that skip some steps of 12
FP32 = dict(dit_precision="fp32", text_encoder_precision="fp32")


def _cache_runs(folder, **options) -> dict:
    with VideoGenerator.from_pretrained(str(folder), executor="inproc", **options) as gen:
        return {c: gen.generate_video("a fox", cache=c, cache_thresh=th, **CACHE_RUN)
                for c, th in CACHES.items()}  # fmt: skip


@pytest.fixture(scope="module")
def cache_runs(tiny_a):
    """Device -> cache -> output, the tiny model in fp32 on both."""
    return {dev: _cache_runs(tiny_a[0], device=dev, **FP32) for dev in ("cpu", "cuda")}


@pytest.mark.parametrize("cache", list(CACHES))
def test_step_cache_decisions_on_gpu_equal_cpu(cache_runs, cache):
    """The same steps skipped per branch on both devices (TeaCache compares the timestep
    modulation, MagCache follows its calibration), and the same latents within fp32
    device noise."""
    gpu, cpu = cache_runs["cuda"][cache], cache_runs["cpu"][cache]
    skipped = cpu.stats[f"{cache}_skipped_cond"]
    assert 0 < skipped < 12, "the threshold must make some steps skip and others run"
    assert gpu.stats == cpu.stats
    assert _rel(gpu.latents, cpu.latents) < 1e-3


@pytest.mark.parametrize("dim, per_token", [(1536, False), (5120, False), (3072, True)])
def test_fused_elementwise_kernels_match_the_torch_ops(monkeypatch, dim, per_token):
    """kernels_bridge.fused's Triton kernels at the DiTs' widths (1.3B, 14B, TI2V-5B with
    per-token modulation) against the torch ops they replace: within one bf16 rounding of
    the same fp32 value, and mostly bit-equal."""
    from fastvideo.kernels_bridge import fused
    from fastvideo.models.wan.transformer import FP32LayerNorm

    assert fused.triton_available()
    monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", "1")
    g = torch.Generator("cuda").manual_seed(0)
    b, length, dev = 2, 4096, "cuda"
    x = (torch.randn(b, length, dim, device=dev, generator=g) * 3 + 1).to(torch.bfloat16)
    out = torch.randn(b, length, dim, device=dev, generator=g).to(torch.bfloat16)
    mod_shape = (b, length, dim) if per_token else (b, 1, dim)
    scale, shift, gate = (torch.randn(mod_shape, device=dev, generator=g) for _ in range(3))
    norm = FP32LayerNorm(dim, 1e-6, elementwise_affine=True).to(dev)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    plain = FP32LayerNorm(dim, 1e-6, elementwise_affine=False).to(dev)

    def both(fn):
        assert fused._fused(x, scale, shift)
        got = fn()
        monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", "0")
        try:
            return got, fn()
        finally:
            monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", "1")

    with torch.no_grad():
        cases = {
            "norm_modulate": both(lambda: fused.norm_modulate(x, plain, scale, shift)),
            "affine norm": both(lambda: fused.norm_modulate(x, norm)),
            "gated_residual": both(lambda: fused.gated_residual(x, out, gate)),
        }
        sums = both(lambda: fused.add_norm_modulate(x, out, plain, scale, shift))
        assert torch.equal(sums[0][0], sums[1][0]), "the residual sum is torch's add"
        cases["add_norm_modulate"] = (sums[0][1], sums[1][1])
        # Self-attention's q/k (RMSNorm over all heads + rotary, heads of 128) and the
        # FFN's first layer with its GELU (the epilogue's GELU is on the fp32 accumulator,
        # the torch ops' on the bf16-rounded output: two roundings apart at most).
        from fastvideo.layers.rotary import RotaryEmbedding3D, norm_and_rotate
        from fastvideo.layers.sequence import TokenGrid

        rms = torch.nn.RMSNorm(dim, eps=1e-6).to(dev, torch.bfloat16)
        torch.nn.init.normal_(rms.weight)
        rope = RotaryEmbedding3D(128)(TokenGrid(frames=4, height=32, width=32), None, x.device)
        assert fused.rotary_fusable(x, rms, *rope)
        cases["rms_norm_rotary"] = both(lambda: norm_and_rotate(x, rms, *rope))
        linear = torch.nn.Linear(dim, 4 * dim).to(dev, torch.bfloat16)
        assert fused._fused_linear_gelu(x, linear, "tanh")
        gelu = both(lambda: fused.linear_gelu(x, linear, "tanh"))
    got, want = (t.float() for t in gelu)
    assert ((got - want).abs() <= want.abs() * 2**-6 + 2e-2).all(), (got - want).abs().max()
    # About two thirds bit-equal (0.64 measured on an H200): the rest one rounding apart.
    assert (gelu[0] == gelu[1]).float().mean() > 0.5
    for name, (got, want) in cases.items():
        assert got.dtype == want.dtype == torch.bfloat16, name
        diff = (got.float() - want.float()).abs()
        bound = want.float().abs() * 2**-7  # one bf16 rounding of the value
        if name == "rms_norm_rotary":
            # The torch ops round the normalised values to bf16 before the rotation, which
            # mixes the two values of a pair: that rounding is at the pair's magnitude (the
            # rotation keeps it), so an output near 0 may differ by one step of that scale.
            pair = want.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True)
            bound = pair.expand(*pair.shape[:-1], 2).flatten(-2) * 2**-6
        assert (diff <= bound + 1e-6).all(), (name, diff.max().item())
        share = (got == want).float().mean().item()
        assert share > (0.9 if name == "rms_norm_rotary" else 0.99), (name, share)


def test_in_process_engine_on_cuda_returns_host_frames(tiny_a):
    """executor='inproc' on a GPU hands back what the worker processes do: frames and
    latents on the host, the frames equal to the multi-process engine's."""
    run = dict(height=32, width=48, num_frames=5, num_inference_steps=3, seed=3)
    outs = {}
    for executor in ("inproc", "mp"):
        with VideoGenerator.from_pretrained(str(tiny_a[0]), executor=executor, **FP32) as gen:
            outs[executor] = gen.generate_video("a fox", **run)
    inproc, mp = outs["inproc"], outs["mp"]
    assert inproc.frames.shape == mp.frames.shape == (5, 32, 48, 3)
    diff = abs(inproc.frames.astype(int) - mp.frames.astype(int)).max()
    assert diff <= 1, diff


# --- our DiTs vs diffusers in bf16 ------------------------------------------------------------
def _bf16_runtime(spec):
    """What our loaders read on one GPU: bf16 DiT, the attention backend ``auto`` picks."""
    from fastvideo.distributed.runtime import ParallelRuntime
    from fastvideo.pipelines.base import PipelineRuntime, PipelineSettings

    settings = PipelineSettings(
        attention_backend=bridge.resolve_backend("auto", CUDA, torch.bfloat16)
    )
    dtypes = {"transformer": torch.bfloat16}
    return PipelineRuntime(ParallelRuntime(0, 1, CUDA), CUDA, spec, dtypes, settings)


def test_tiny_wan_dit_matches_diffusers_in_bf16(tiny_a):
    from diffusers import WanTransformer3DModel

    from fastvideo.models.wan.components import load_transformer
    from fastvideo.models.wan.registration import read_wan_spec

    folder, _ = tiny_a
    ours = load_transformer(folder / "transformer", _bf16_runtime(read_wan_spec(folder)))
    ref = WanTransformer3DModel.from_pretrained(str(folder / "transformer"),
                                                torch_dtype=torch.bfloat16).to(CUDA)  # fmt: skip
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(2, 16, 3, 16, 24, device=CUDA, generator=g).bfloat16()
    text = torch.randn(2, 12, 32, device=CUDA, generator=g).bfloat16()
    t = torch.tensor([900, 300], device=CUDA)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        err = _rel(ours(x, t, text), expected)
        other = _rel(ours(x, t, text.flip(0)), expected)
    print(f"\ntiny Wan DiT bf16 vs diffusers: relative error {err:.2e}")
    assert err < BF16_TOL
    assert other > POWER * BF16_TOL, "the text hardly matters"


MID_WAN = {**WAN_1_3B_BLOCK, "num_layers": 4, "rope_max_seq_len": 1024}  # 1.3B width, 4 blocks
MID_HUNYUAN = dict(num_attention_heads=8, attention_head_dim=128, num_layers=2,
                   num_single_layers=2, num_refiner_layers=1, text_embed_dim=1024,
                   pooled_projection_dim=256)  # fmt: skip


def _saved_diffusers(cls, config: dict, folder, gate_std: float | None = None, qk: float = 2.0):
    """diffusers' model saved to ``folder``; returns it read back in bf16 (as a user loads
    it) and in fp32 (the reference both bf16 models are held to).

    Its own random init leaves the blocks almost silent (gates ~1/sqrt(dim), near-uniform
    attention), so the output would hardly depend on attention, rotary or the text. Here
    q/k norm weights ~N(qk, 0.2) sharpen attention, other norms ~N(1, 0.2), and with
    ``gate_std`` the blocks' modulation tables ~N(0, gate_std) open the gates: a mistake
    in those paths then moves the output by several tolerances (checked by the tests).
    """
    torch.manual_seed(0)
    model = cls(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                              "norm_added_k.weight")):  # fmt: skip
                p.normal_(qk, 0.2)
            elif "norm" in name and p.ndim == 1:
                p.normal_(1.0, 0.2)
            elif gate_std and name.startswith("blocks.") and name.endswith("scale_shift_table"):
                p.normal_(0.0, gate_std)
    model.save_pretrained(str(folder))
    bf16 = cls.from_pretrained(str(folder), torch_dtype=torch.bfloat16).to(CUDA).eval()
    return bf16, cls.from_pretrained(str(folder)).to(CUDA).eval()


def _shifted(model, x: torch.Tensor, *rest) -> torch.Tensor:
    """The model's output for the latents shifted by one frame, shifted back: equal to the
    unshifted output only if positions did not matter (rotary, attention)."""
    return model(x.roll(1, 2), *rest).roll(-1, 2)


@contextlib.contextmanager
def _exact_fp32():
    """fp32 without TF32 (cuDNN convolutions default to it: diffusers' patch conv)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _check_bf16(name: str, ours: torch.Tensor, ref: torch.Tensor, fp32: torch.Tensor) -> None:
    """Ours within BF16_TOL of diffusers' bf16 output, and no further from diffusers' fp32
    output than diffusers' own bf16 output is (plus a little slack)."""
    err, ours_fp32, ref_fp32 = _rel(ours, ref), _rel(ours, fp32), _rel(ref, fp32)
    print(f"\n{name} bf16: vs diffusers bf16 {err:.2e}; vs diffusers fp32: ours {ours_fp32:.2e}, "
          f"diffusers bf16 {ref_fp32:.2e}")  # fmt: skip
    assert err < BF16_TOL
    assert ours_fp32 <= 1.25 * ref_fp32 + 1e-3


@torch.no_grad()
def test_mid_size_wan_dit_matches_diffusers_in_bf16(tmp_path):
    """Wan2.1-1.3B's width (12 heads x 128, FFN 8960, UMT5 4096) with 4 blocks over
    5x15x26 tokens and 512 text tokens, through our loader."""
    from diffusers import WanTransformer3DModel

    from fastvideo.models.wan.components import load_transformer

    ref, fp32 = _saved_diffusers(WanTransformer3DModel, MID_WAN, tmp_path, gate_std=0.5)
    ours = load_transformer(tmp_path, _bf16_runtime(_wan_1_3b_spec()))
    g = torch.Generator(device=CUDA).manual_seed(2)
    x = torch.randn(1, 16, 5, 30, 52, device=CUDA, generator=g).bfloat16()
    text = torch.randn(2, 512, 4096, device=CUDA, generator=g).bfloat16()
    t = torch.tensor([650.0], device=CUDA)
    expected = ref(x, t, text[:1], return_dict=False)[0]
    with _exact_fp32():
        exact = fp32(x.float(), t, text[:1].float(), return_dict=False)[0]
    _check_bf16("mid-size Wan DiT", ours(x, t, text[:1]), expected, exact)
    assert _rel(ours(x, t, text[1:]), expected) > POWER * BF16_TOL, "text hardly matters"
    assert _rel(_shifted(ours, x, t, text[:1]), expected) > POWER * BF16_TOL, "positions"


FP8_TOL = 8e-2  # float8 e4m3 has a 3-bit mantissa: ~4x bf16's rounding per matmul


@torch.no_grad()
def test_mid_size_wan_dit_in_fp8_stays_close_to_fp32(tmp_path):
    """dit_precision='fp8' (torchao float8 matmuls in the blocks) on the mid-size Wan DiT:
    the blocks' linears really become float8 tensors, and the output stays within FP8_TOL
    of diffusers' fp32 output while differing from our bf16 output."""
    pytest.importorskip("torchao", reason="dit_precision='fp8' needs torchao (fastvideo[fp8])")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    from diffusers import WanTransformer3DModel

    from fastvideo.layers.fp8 import fp8_matmul_targets
    from fastvideo.models.wan.components import load_transformer

    _, fp32 = _saved_diffusers(WanTransformer3DModel, MID_WAN, tmp_path, gate_std=0.5)
    runtime = _bf16_runtime(_wan_1_3b_spec())
    bf16 = load_transformer(tmp_path, runtime)
    settings = dataclasses.replace(runtime.settings, dit_fp8=True)
    fp8 = load_transformer(tmp_path, dataclasses.replace(runtime, settings=settings))
    targets = fp8_matmul_targets(fp8)
    kinds = {type(fp8.get_submodule(n).weight).__name__ for n in targets}
    assert targets and kinds.isdisjoint({"Tensor", "Parameter"}), kinds
    g = torch.Generator(device=CUDA).manual_seed(2)
    x = torch.randn(1, 16, 5, 30, 52, device=CUDA, generator=g).bfloat16()
    text = torch.randn(1, 512, 4096, device=CUDA, generator=g).bfloat16()
    t = torch.tensor([650.0], device=CUDA)
    with _exact_fp32():
        exact = fp32(x.float(), t, text.float(), return_dict=False)[0]
    out8, out16 = fp8(x, t, text), bf16(x, t, text)
    err8, err16 = _rel(out8, exact), _rel(out16, exact)
    print(f"\nmid-size Wan DiT vs diffusers fp32: fp8 {err8:.2e}, bf16 {err16:.2e}")
    assert err8 < FP8_TOL
    assert _rel(out8, out16) > 0


@torch.no_grad()
def test_mid_size_hunyuan_dit_matches_diffusers_in_bf16(tmp_path):
    """HunyuanVideo's block structure at 8 heads x 128 (2 dual + 2 single blocks) over
    3x16x24 tokens, 40 of 64 text tokens valid (ours cuts the padding, diffusers masks
    it), through our loader. Everything runs in bf16 on both sides (the residual stream
    too), so both are ~9e-3 from fp32 (7e-3 apart, measured on CPU): attention is sharpened
    less (qk 1.5) than for Wan."""
    from diffusers import HunyuanVideoTransformer3DModel

    from fastvideo.models.hunyuan.transformer import (
        HunyuanTransformer3D,
        HunyuanTransformerConfig,
    )
    from fastvideo.models.loader import load_checkpoint, meta_module

    ref, fp32 = _saved_diffusers(HunyuanVideoTransformer3DModel, MID_HUNYUAN, tmp_path, qk=1.5)
    cfg = HunyuanTransformerConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    ours = load_checkpoint(meta_module(lambda: HunyuanTransformer3D(cfg)), tmp_path, CUDA,
                           lambda _: torch.bfloat16)  # fmt: skip
    ours.set_attention(bridge.resolve_backend("auto", CUDA, torch.bfloat16))
    g = torch.Generator(device=CUDA).manual_seed(3)
    x = torch.randn(1, 16, 3, 32, 48, device=CUDA, generator=g).bfloat16()
    text = torch.randn(1, 64, 1024, device=CUDA, generator=g).bfloat16()
    mask = torch.zeros(1, 64, dtype=torch.long, device=CUDA)
    mask[:, :40] = 1
    pooled = torch.randn(1, 256, device=CUDA, generator=g).bfloat16()
    t, guidance = torch.tensor([500.0], device=CUDA), torch.tensor([6000.0], device=CUDA)
    rest = (t, text, mask, pooled, guidance)
    expected = ref(x, *rest, return_dict=False)[0]
    with _exact_fp32():
        exact = fp32(x.float(), t, text.float(), mask, pooled.float(), guidance, return_dict=False)
    exact = exact[0]
    _check_bf16("mid-size HunyuanVideo DiT", ours(x, *rest), expected, exact)
    assert _rel(_shifted(ours, x, *rest), expected) > POWER * BF16_TOL, "positions hardly matter"


# --- two GPUs -----------------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason=f"needs 2 GPUs ({torch.cuda.device_count() if torch.cuda.is_available() else 0} "
    "visible)",
)
PLAN_RUN = dict(height=96, width=160, num_frames=9, num_inference_steps=3, seed=5,
                output_type="latent", guidance_scale=5.0)  # fmt: skip


@pytest.fixture(scope="module")
def one_gpu_latents():
    """1-GPU latents of the demo model, and of another seed (a wrong answer)."""
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=1) as gen:
        ref = gen.generate_video("a fox", **PLAN_RUN).latents
        other = gen.generate_video("a fox", **{**PLAN_RUN, "seed": 6}).latents
    return ref, other


@two_gpus
@pytest.mark.parametrize(
    "overrides, plan",
    [({}, "CFG 2"), ({"cfg_parallel": False}, "Ulysses 2"), ({"ring_degree": 2}, "ring 2")],
)
def test_two_gpus_match_one_gpu_over_nccl(one_gpu_latents, overrides, plan):
    ref, other = one_gpu_latents
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=2, **overrides) as gen:
        out = gen.generate_video("a fox", **PLAN_RUN)
    err = _rel(out.latents, ref)
    print(f"\n{plan}: latents relative error vs 1 GPU {err:.2e}")
    assert out.plan == plan
    assert err < STEPS_TOL
    assert _rel(other, ref) > POWER * STEPS_TOL


@two_gpus
def test_sta_and_teacache_under_ulysses_take_one_gpus_decisions(tiny_a):
    """STA (a 1-tile window: sparse) and TeaCache under Ulysses 2 over NCCL: the same skip
    decisions and latents as one GPU (fp32, so only the device's reduction order differs).
    TeaCache's signal depends on the timesteps only, so 5.0 skips some of 12 steps as on
    the CPU (tests/test_step_caches.py)."""
    opts = dict(attention_backend="sta", sta_tile_size=(1, 8, 8), sta_window_size=(1, 1, 1),
                **FP32)  # fmt: skip
    run = dict(CACHE_RUN, height=64, width=128, cache="teacache", cache_thresh=CACHES["teacache"])
    outs = {}
    for gpus, plan in ((1, {}), (2, dict(ulysses_degree=2, cfg_parallel=False))):
        with VideoGenerator.from_pretrained(str(tiny_a[0]), num_gpus=gpus, **opts, **plan) as gen:
            outs[gpus] = gen.generate_video("a fox", **run)
    assert outs[2].plan == "Ulysses 2"
    assert 0 < outs[1].stats["teacache_skipped_cond"] < 12
    assert outs[2].stats == outs[1].stats
    assert _rel(outs[2].latents, outs[1].latents) < 1e-4
