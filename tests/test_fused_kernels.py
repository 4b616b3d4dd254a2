"""The fused elementwise kernels (``kernels_bridge.fused``): the torch-op path is the
blocks' own arithmetic; the Triton kernels equal it (here through Triton's CPU
interpreter where Triton is installed; at full size on a GPU in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fastvideo.kernels_bridge import fused
from fastvideo.models.wan.transformer import FP32LayerNorm


def _mods(b: int, length: int, dim: int, per_token: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, length, dim) if per_token else (b, 1, dim)
    return [torch.randn(shape, generator=g) * 0.5 for _ in range(3)]


def _unfused_norm(x, norm, scale, shift):
    """WanBlock's arithmetic before the fused kernels."""
    h = norm(x.float())
    if scale is not None:
        h = h.mul_(1 + scale).add_(shift)
    return h.type_as(x)


@pytest.mark.parametrize("affine", [False, True])
def test_torch_path_is_the_blocks_arithmetic(affine, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", "1")
    x = torch.randn(2, 7, 32).to(torch.bfloat16)
    norm = FP32LayerNorm(32, 1e-6, elementwise_affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    scale, shift, gate = _mods(2, 7, 32, per_token=False)
    assert torch.equal(
        fused.norm_modulate(x, norm, scale, shift), _unfused_norm(x, norm, scale, shift)
    )
    assert torch.equal(fused.norm_modulate(x, norm), norm(x.float()).type_as(x))
    out = torch.randn(2, 7, 32).to(torch.bfloat16)
    assert torch.equal(fused.gated_residual(x, out, gate), (out * gate).add_(x).type_as(x))
    total, h = fused.add_norm_modulate(x, out, norm, scale, shift)
    assert torch.equal(total, x + out)
    assert torch.equal(h, _unfused_norm(x + out, norm, scale, shift))
    with pytest.raises(ValueError, match="together"):
        fused.norm_modulate(x, norm, scale, None)
    with pytest.raises(ValueError, match="together"):
        fused.add_norm_modulate(x, out, norm, None, shift)


def test_the_switch_and_the_devices_pick_the_path(monkeypatch):
    x = torch.randn(1, 4, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused._fused(x), "CPU tensors take the torch ops"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    assert fused._fused(x)
    assert not fused._fused(x.transpose(1, 2).contiguous().transpose(1, 2)), "non-contiguous"
    assert not fused._fused(x, torch.randn(1, 4, 9)), "mismatched width"
    assert not fused._fused(x, torch.randn(8, 4, 1).transpose(0, 2)), "strided last dim"
    monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", "0")
    assert not fused._fused(x)


def test_rotary_and_gelu_torch_paths_are_the_models_ops(monkeypatch):
    """Off the GPU both ops are what the Wan attention and FFN computed before: the
    RMSNorm, then apply_rotary; the linear layer, then the tanh GELU."""
    from fastvideo.layers.rotary import RotaryEmbedding3D, apply_rotary, norm_and_rotate
    from fastvideo.layers.sequence import TokenGrid

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 12, 32).to(torch.bfloat16)
    norm = torch.nn.RMSNorm(32, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    cos, sin = RotaryEmbedding3D(16)(TokenGrid(frames=2, height=2, width=3), None, x.device)
    with torch.no_grad():
        want = apply_rotary(norm(x).unflatten(2, (2, 16)), cos, sin).flatten(2)
        assert torch.equal(norm_and_rotate(x, norm, cos, sin), want)
        linear = torch.nn.Linear(32, 48).to(torch.bfloat16)
        want = torch.nn.functional.gelu(linear(x), approximate="tanh")
        assert torch.equal(fused.linear_gelu(x, linear, "tanh"), want)


def test_the_rotary_and_gelu_fusions_refuse_what_they_do_not_compute(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    x = torch.randn(1, 6, 32)
    cos, sin = torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    norm = torch.nn.RMSNorm(32)
    assert fused.rotary_fusable(x, norm, cos, sin)
    with pytest.raises(ValueError, match="rotary_fusable"):
        fused.rms_norm_rotary(x, norm, cos[:, :5], sin[:, :5])
    assert not fused.rotary_fusable(x, torch.nn.RMSNorm(32, elementwise_affine=False), cos, sin)
    assert not fused.rotary_fusable(x, torch.nn.LayerNorm(32), cos, sin), "not an RMSNorm"
    assert not fused.rotary_fusable(x, norm, cos[:, :5], sin[:, :5]), "other token count"
    assert not fused.rotary_fusable(x, norm, cos.double(), sin.double()), "fp32 tables only"
    assert not fused.rotary_fusable(x, torch.nn.RMSNorm(30), cos, sin), "norm width"
    odd = torch.randn(1, 6, 1, 12)
    assert not fused.rotary_fusable(x, norm, odd, odd), "32 is not a multiple of 24"
    # The GELU epilogue: CUDA only, tanh only, plain half-precision nn.Linear, no hooks.
    linear = torch.nn.Linear(32, 48).to(torch.bfloat16)
    assert not fused._fused_linear_gelu(x.to(torch.bfloat16), linear, "tanh"), "CPU tensor"
    if torch.cuda.is_available():
        xc, lc = x.cuda().to(torch.bfloat16), linear.cuda()
        assert fused._fused_linear_gelu(xc, lc, "tanh")
        assert not fused._fused_linear_gelu(xc, lc, "none")
        assert not fused._fused_linear_gelu(xc.float(), lc.float(), "tanh")
        handle = lc.register_forward_hook(lambda *a: None)
        assert not fused._fused_linear_gelu(xc, lc, "tanh"), "hooks must run"
        handle.remove()


triton_cpu = pytest.mark.skipif(not fused.triton_available(), reason="Triton is not installed")

# Triton's interpreter must be chosen before triton is first imported: a fresh process.
INTERPRETED = """
import torch
from fastvideo.kernels_bridge import fused
from fastvideo.models.wan.transformer import FP32LayerNorm
from fastvideo.layers.rotary import RotaryEmbedding3D, apply_rotary
from fastvideo.layers.sequence import SequenceShard, TokenGrid
from tests.test_fused_kernels import _mods, _unfused_norm

torch.manual_seed(0)
b, length, cases = 2, 5, 0
for dtype in (torch.bfloat16, torch.float32):
    for dim in (48, 64):  # a masked row and a full one
        for per_token in (False, True):
            x = (torch.randn(b, length, dim) * 3 + 1).to(dtype)
            out = torch.randn(b, length, dim).to(dtype)
            scale, shift, gate = _mods(b, length, dim, per_token)
            assert fused._fused(x, scale, shift)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            for affine in (False, True):
                norm = FP32LayerNorm(dim, 1e-6, elementwise_affine=affine)
                if affine:
                    torch.nn.init.normal_(norm.weight)
                    torch.nn.init.normal_(norm.bias)
                with torch.no_grad():
                    for mods in ((scale, shift), (None, None)):
                        got = fused.norm_modulate(x, norm, *mods)
                        want = _unfused_norm(x, norm, *mods)
                        assert got.dtype == dtype and got.shape == want.shape
                        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
                        # The residual sum folded into the norm's pass: exact in fp32 (the
                        # interpreter rounds to bf16 by truncation, a GPU to nearest even).
                        total, got = fused.add_norm_modulate(x, out, norm, *mods)
                        torch.testing.assert_close(total, x + out, rtol=2**-6, atol=0)
                        assert dtype != torch.float32 or torch.equal(total, x + out)
                        want = _unfused_norm(total, norm, *mods)  # the norm of that sum
                        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
            got, want = fused.gated_residual(x, out, gate), (out * gate).add_(x).type_as(x)
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
            cases += 1
# RMSNorm + rotary: 2 and 3 heads of 16 (the last row masked), a grid and a shard of it.
for dtype in (torch.bfloat16, torch.float32):
    for heads in (2, 3):
        for shard in (None, SequenceShard.split(12, 2, 1)):
            grid = TokenGrid(frames=2, height=2, width=3)
            length = grid.num_tokens if shard is None else shard.length
            cos, sin = RotaryEmbedding3D(16)(grid, shard, torch.device("cpu"))
            x = (torch.randn(b, length, heads * 16) * 2).to(dtype)
            norm = torch.nn.RMSNorm(heads * 16, eps=1e-6).to(dtype)
            torch.nn.init.normal_(norm.weight)
            assert fused.rotary_fusable(x, norm, cos, sin)
            with torch.no_grad():
                got = fused.rms_norm_rotary(x, norm, cos, sin)
                want = apply_rotary(norm(x).unflatten(2, (heads, 16)), cos, sin).flatten(2)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
            cases += 1
print("cases", cases)
"""


@triton_cpu
def test_triton_kernels_equal_the_torch_ops():
    """The kernels through Triton's CPU interpreter: bf16 and fp32, a row that fills the
    block and one that is masked, per-sample and per-token modulation, with and without
    the norm's affine terms; RMSNorm + rotary over whole grids and over a shard."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTVIDEO_FUSED_KERNELS": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["cases", "16"]


TINY_WAN = {
    "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16,
    "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 32, "ffn_dim": 64,
    "num_layers": 1, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}  # fmt: skip


def _compiled_block_ops(monkeypatch, under_compile: bool):
    """A tiny bf16 Wan block regionally compiled (a recording backend that runs the graph
    as traced): the ``fastvideo::`` ops in its graphs, the graph breaks, and its output
    against eager."""
    from torch._dynamo.utils import counters

    from fastvideo.layers.sequence import TokenGrid
    from fastvideo.models.wan.transformer import (
        FP32_PARAM_PATTERNS,
        WanTransformer3D,
        WanTransformerConfig,
    )

    # CPU tensors count as kernel-capable (the interpreter's rule); without Triton the ops
    # run the torch path at run time, as on a GPU without a fitting input.
    monkeypatch.setattr(fused, "_interpreting", lambda: True)
    monkeypatch.setattr(fused, "triton_available", lambda: False)
    monkeypatch.setattr(fused, "_UNDER_COMPILE", under_compile)
    torch.manual_seed(0)
    model = WanTransformer3D(WanTransformerConfig.from_dict(TINY_WAN))
    for name, p in model.named_parameters():
        if name.endswith("scale_shift_table"):
            p.data.normal_(0.0, 0.5)
        if not any(pat in name for pat in FP32_PARAM_PATTERNS):
            p.data = p.data.bfloat16()
    model.eval().requires_grad_(False)
    grid = TokenGrid(2, 2, 3)
    tokens = torch.randn(1, grid.num_tokens, 16).bfloat16()
    text = torch.randn(1, 5, 24).bfloat16()
    t = torch.tensor([500.0])
    with torch.no_grad():
        eager = model.forward_tokens(tokens, t, text, grid)
        ops: list[str] = []

        def record(gm, example_inputs):  # noqa: ANN001, ANN202
            ops.extend(str(n.target) for n in gm.graph.nodes if "fastvideo" in str(n.target))
            return gm.forward

        torch._dynamo.reset()
        counters.clear()
        model.compile_blocks(record)  # type: ignore[arg-type]
        compiled = model.forward_tokens(tokens, t, text, grid)
        breaks = dict(counters["graph_break"])
        torch._dynamo.reset()
    return ops, breaks, compiled, eager


def test_under_compile_the_fused_kernels_stay_in_the_graph_as_ops(monkeypatch):
    """FASTVIDEO_FUSED_UNDER_COMPILE: a compiled Wan block holds our kernels as opaque ops
    (the three norms, both gated residuals, both q/k norm+rotary passes, the FFN's
    GELU linear, attention), no graph break, and its output is eager's; switched off, only
    attention is ours and Inductor gets the torch ops."""
    ops, breaks, compiled, eager = _compiled_block_ops(monkeypatch, under_compile=True)
    assert not breaks, breaks
    names = sorted(set(ops))
    assert [n.split(".")[1] for n in names] == [
        "dense_attention", "gated_residual", "linear_gelu", "norm_modulate", "norm_rotate",
    ], names  # fmt: skip
    assert ops.count("fastvideo.norm_modulate") == 3
    assert ops.count("fastvideo.norm_rotate") == 2
    assert ops.count("fastvideo.dense_attention") == 2, "self- and cross-attention"
    assert torch.equal(compiled, eager)
    ops, breaks, compiled, eager = _compiled_block_ops(monkeypatch, under_compile=False)
    assert not breaks, breaks
    assert set(ops) == {"fastvideo.dense_attention"}, ops
    assert torch.equal(compiled, eager)


def test_the_fused_ops_pass_torch_library_opcheck():
    """Each op's fake (shape, dtype, strides) matches what it computes; schemas and
    autograd registration are consistent (torch.library.opcheck)."""
    from fastvideo.layers.rotary import RotaryEmbedding3D
    from fastvideo.layers.sequence import TokenGrid

    x = torch.randn(2, 12, 32).to(torch.bfloat16)
    w, b = torch.randn(32), torch.randn(32)
    scale, shift, _ = _mods(2, 12, 32, per_token=False)
    ops = torch.ops.fastvideo
    torch.library.opcheck(ops.norm_modulate.default, (x, w, b, scale, shift, 1e-6))
    torch.library.opcheck(ops.norm_modulate.default, (x, None, None, None, None, 1e-6))
    out, gate = torch.randn(2, 12, 32).to(torch.bfloat16), torch.randn(2, 1, 32)
    torch.library.opcheck(ops.gated_residual.default, (x, out, gate))
    lw, lb = torch.randn(48, 32).to(torch.bfloat16), torch.randn(48).to(torch.bfloat16)
    torch.library.opcheck(ops.linear_gelu.default, (x, lw, lb))
    cos, sin = RotaryEmbedding3D(16)(TokenGrid(frames=2, height=2, width=3), None, x.device)
    torch.library.opcheck(ops.norm_rotate.default, (x, w.bfloat16(), 1e-6, cos, sin))
    q, k = torch.randn(1, 12, 2, 16), torch.randn(1, 5, 2, 16)
    torch.library.opcheck(ops.dense_attention.default, (q, k, k.clone(), "sdpa"))
