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
    with pytest.raises(ValueError, match="together"):
        fused.norm_modulate(x, norm, scale, None)


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


triton_cpu = pytest.mark.skipif(not fused.triton_available(), reason="Triton is not installed")

# Triton's interpreter must be chosen before triton is first imported: a fresh process.
INTERPRETED = """
import torch
from fastvideo.kernels_bridge import fused
from fastvideo.models.wan.transformer import FP32LayerNorm
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
            got, want = fused.gated_residual(x, out, gate), (out * gate).add_(x).type_as(x)
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
            cases += 1
print("cases", cases)
"""


@triton_cpu
def test_triton_kernels_equal_the_torch_ops():
    """Both kernels through Triton's CPU interpreter: bf16 and fp32, a row that fills the
    block and one that is masked, per-sample and per-token modulation, with and without
    the norm's affine terms."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTVIDEO_FUSED_KERNELS": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["cases", "8"]
