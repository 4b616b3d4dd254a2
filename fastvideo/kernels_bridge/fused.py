"""Fused elementwise kernels around the DiT blocks (Triton, CUDA; exact in fp32).

Each block of the Wan DiT normalises, modulates and gates its residual stream in fp32:
``LayerNorm(x.float()) * (1 + scale) + shift`` cast back to bf16, and ``x + out * gate``.
Written as torch ops those are five and three passes over a [B, L, D] tensor (copies to
fp32 and back included); here each is one pass: a row of ``D`` per Triton program, the
statistics and the arithmetic in fp32, one rounding to the output dtype at the end (as the
torch ops round once, at ``type_as``). Self-attention's queries and keys get the same
treatment: RMSNorm over all heads, then the rotary embedding, in one pass
(``rms_norm_rotary``, rounding where the torch ops round: after the norm and after the
rotation); and the FFN's first linear layer applies its tanh GELU in cuBLASLt's epilogue
(``linear_gelu``), so the widest activation of the block is written once; the
cross-attention's residual sum is taken in the next norm's pass (``add_norm_modulate``).

The torch ops stay the reference and the path everywhere else: on CPU, inside
``torch.compile`` (Inductor fuses them itself), for non-contiguous inputs, without Triton,
and with ``FASTVIDEO_FUSED_KERNELS=0``. ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)
runs the kernels on CPU tensors, which is how the CPU tests check them where Triton is
installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo import envs


def norm_modulate(
    x: torch.Tensor,
    norm: nn.Module,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(x.float()) * (1 + scale) + shift`` (or just the norm) in ``x``'s dtype.

    x: [B, L, D]; norm: an fp32 LayerNorm over D (``eps``, optional ``weight``/``bias``);
    scale, shift: fp32, broadcast to [B, L, D] from [B, 1, D] or given per token.
    """
    if (scale is None) != (shift is None):
        raise ValueError("norm_modulate takes scale and shift together")
    if in_graph(x) and isinstance(norm, nn.LayerNorm) and norm.normalized_shape == x.shape[-1:]:
        w, b = norm.weight, norm.bias
        return torch.ops.fastvideo.norm_modulate(x, w, b, scale, shift, float(norm.eps))
    if not _fused(x, scale, shift):
        h = norm(x.float())
        if scale is not None:
            h = h.mul_(1 + scale).add_(shift)
        return h.type_as(x)
    return _norm_modulate_kernel(x, None, norm, scale, shift)[1]


def add_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    norm: nn.Module,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum ``s = x + y`` (in x's dtype, as torch adds) and
    ``norm_modulate(s, norm, scale, shift)``: one pass on a GPU (x, y: [B, L, D])."""
    if (scale is None) != (shift is None):
        raise ValueError("add_norm_modulate takes scale and shift together")
    if in_graph(x) or not _fused(x, y, scale, shift) or y.shape != x.shape or y.dtype != x.dtype:
        total = x + y
        return total, norm_modulate(total, norm, scale, shift)
    total, h = _norm_modulate_kernel(x, y, norm, scale, shift)
    assert total is not None
    return total, h


def _norm_modulate_kernel(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm: nn.Module,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The norm_modulate kernel on ``x`` (or on ``x + residual``, also returned)."""
    b, length, dim = x.shape
    y = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    s_strides = _row_strides(scale, b, length, dim) if scale is not None else (0, 0)
    h_strides = _row_strides(shift, b, length, dim) if shift is not None else (0, 0)
    block, warps = _block(dim)
    _kernels()["norm_modulate"][(b * length,)](
        x, residual if residual is not None else x, total if total is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        scale if scale is not None else x, shift if shift is not None else x, y,
        length, dim, *s_strides, *h_strides, float(norm.eps),
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=scale is not None,
        HAS_ADD=residual is not None, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return total, y


def gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + out * gate`` in fp32, cast to ``x``'s dtype. x, out: [B, L, D]; gate: fp32,
    broadcast to [B, L, D] from [B, 1, D] or given per token."""
    if in_graph(x) and out.shape == x.shape:
        return torch.ops.fastvideo.gated_residual(x, out, gate)
    if not _fused(x, out, gate) or out.shape != x.shape:
        return (out * gate).add_(x).type_as(x)
    b, length, dim = x.shape
    y = torch.empty_like(x)
    block, warps = _block(dim)
    _kernels()["gated_residual"][(b * length,)](
        x, out, gate, y, length, dim, *_row_strides(gate, b, length, dim),
        BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return y


def rms_norm_rotary(
    x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RMSNorm of x [B, L, D] over D (``norm``: an ``nn.RMSNorm``), then the rotary
    embedding of its interleaved pairs by cos, sin (fp32 [1, L, 1, Dh/2], heads of Dh),
    in one pass -> [B, L, D] in x's dtype. The norm's output is rounded to x's dtype
    before the rotation, as the torch ops round it. Only where ``rotary_fusable``
    (``fastvideo.layers.rotary.norm_and_rotate`` picks)."""
    if not rotary_fusable(x, norm, cos, sin):
        raise ValueError("rms_norm_rotary: inputs the kernel does not take (see rotary_fusable)")
    return rms_norm_rotary_of(x, norm.weight, norm.eps, cos, sin)


def rms_norm_rotary_of(
    x: torch.Tensor, weight: torch.Tensor, eps: float | None, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``rms_norm_rotary`` given the RMSNorm's weight and eps (inputs ``rotary_fusable_of``
    takes)."""
    b, length, dim = x.shape
    y = torch.empty_like(x)
    eps = eps if eps is not None else torch.finfo(x.dtype).eps
    block, warps = _block(dim // 2)
    _kernels()["rms_norm_rotary"][(b * length,)](
        x, weight, cos, sin, y, length, dim // 2, cos.shape[-1], cos.stride(1),
        sin.stride(1), float(eps), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return y


def linear_gelu(x: torch.Tensor, linear: nn.Linear, approximate: str) -> torch.Tensor:
    """``F.gelu(linear(x), approximate=approximate)``; on a GPU, for a plain bf16/fp16
    ``nn.Linear`` and the tanh GELU, one cuBLASLt matmul with a bias + GELU epilogue (the
    GELU taken on the fp32 accumulator, then rounded once)."""
    if in_graph(x) and approximate == "tanh" and _plain_linear(linear, x.dtype):
        return torch.ops.fastvideo.linear_gelu(x, linear.weight, linear.bias)
    if not _fused_linear_gelu(x, linear, approximate):
        return F.gelu(linear(x), approximate=approximate)
    return _gelu_epilogue(x, linear.weight, linear.bias)


def _gelu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` with the tanh GELU in cuBLASLt's epilogue; x [..., K]."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


# --- inside torch.compile ----------------------------------------------------------------
# FASTVIDEO_FUSED_UNDER_COMPILE, read once at import (a compiled graph cannot read it).
_UNDER_COMPILE = envs.fused_under_compile()


def in_graph(x: torch.Tensor) -> bool:
    """torch.compile is tracing and our kernels stay in its graph, as opaque ops (each one
    of the functions above at run time, kernel or torch ops as they pick), instead of the
    torch ops Inductor would fuse itself."""
    if not (torch.compiler.is_compiling() and _UNDER_COMPILE):
        return False
    return x.is_cuda or _interpreting()


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """A dense (contiguous) empty tensor of x's shape: what each op's fake returns."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class _LayerNorm:
    """The fp32 LayerNorm over the last dim that norm_modulate's op was handed as tensors
    (the attributes norm_modulate reads of it, and its fp32 forward)."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        self.weight, self.bias, self.eps = weight, bias, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), x.shape[-1:], w, b, self.eps)


@torch.library.custom_op("fastvideo::norm_modulate", mutates_args=())
def _norm_modulate_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    norm = _LayerNorm(weight, bias, eps)
    return norm_modulate(x, norm, scale, shift).contiguous()  # type: ignore[arg-type]


@_norm_modulate_op.register_fake
def _(x, weight, bias, scale, shift, eps):  # noqa: ANN001, ANN202
    return dense_like(x)


@torch.library.custom_op("fastvideo::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gated_residual(x, out, gate).contiguous()


@_gated_residual_op.register_fake
def _(x, out, gate):  # noqa: ANN001, ANN202
    return dense_like(x)


@torch.library.custom_op("fastvideo::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.is_contiguous() and _enabled():
        return _gelu_epilogue(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh").contiguous()


@_linear_gelu_op.register_fake
def _(x, weight, bias):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# --- dispatch --------------------------------------------------------------------------
def _enabled() -> bool:
    """Fusion is on: not while torch.compile traces (Inductor fuses), nor switched off."""
    return not torch.compiler.is_compiling() and envs.fused_kernels()


def _fused(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these tensors (else the torch ops run)."""
    if not _enabled() or x.ndim != 3:
        return False
    if not (x.is_cuda or (_interpreting() and x.device.type == "cpu")):
        return False
    if not x.is_contiguous() or x.requires_grad or not triton_available():
        return False
    for t in others:
        if t is None:
            continue
        if t.device != x.device or t.requires_grad or t.ndim != 3 or t.stride(-1) != 1:
            return False
        if t.shape[0] not in (1, x.shape[0]) or t.shape[1] not in (1, x.shape[1]):
            return False
        if t.shape[2] != x.shape[2]:
            return False
        if t.shape == x.shape and not t.is_contiguous():
            return False
    return True


def rotary_fusable(x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rms_norm_rotary`` takes these tensors (else the torch ops run)."""
    if type(norm) is not nn.RMSNorm or norm.weight is None:
        return False
    return rotary_fusable_of(x, norm.weight, cos, sin)


def rotary_fusable_of(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> bool:
    """``rotary_fusable`` given the RMSNorm's weight."""
    if not _fused(x) or weight.shape != (x.shape[2],) or weight.device != x.device:
        return False
    half = cos.shape[-1]
    for t in (cos, sin):
        if t.device != x.device or t.dtype != torch.float32 or t.ndim != 4:
            return False
        if t.shape != (1, x.shape[1], 1, half) or t.stride(-1) != 1:
            return False
    return x.shape[2] % (2 * half) == 0


def _fused_linear_gelu(x: torch.Tensor, linear: nn.Linear, approximate: str) -> bool:
    if approximate != "tanh" or not x.is_cuda or x.requires_grad or not _enabled():
        return False
    return _plain_linear(linear, x.dtype) and linear.weight.device == x.device and x.is_contiguous()


def _plain_linear(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A plain half-precision ``nn.Linear`` with a bias: no hooks, no quantised weight."""
    if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks:
        return False
    w, bias = linear.weight, linear.bias
    if type(w) is not nn.Parameter or bias is None or type(bias) is not nn.Parameter:
        return False
    return dtype in (torch.bfloat16, torch.float16) and w.dtype == dtype and bias.dtype == dtype


def _row_strides(t: torch.Tensor, b: int, length: int, dim: int) -> tuple[int, int]:
    """Element strides over (batch, token) of ``t`` broadcast to [b, length, dim]."""
    e = t.expand(b, length, dim)
    return e.stride(0), e.stride(1)


def _block(dim: int) -> tuple[int, int]:
    block = 1 << (dim - 1).bit_length()
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def norm_modulate_kernel(X, R, SUM, W, Bias, S, SH, Y, L, D, ssb, ssl, shb, shl, eps,
                             HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
                             HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        b = row // L
        tok = row - b * L
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_ADD:  # the residual sum first, rounded to its dtype as torch's add rounds
            r = tl.load(R + row * D + cols, mask=m, other=0.0).to(tl.float32)
            x = (x + r).to(SUM.dtype.element_ty)
            tl.store(SUM + row * D + cols, x, mask=m)
            x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        y = xc * (1.0 / tl.sqrt(var + eps))
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(Bias + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_MOD:
            s = tl.load(S + b * ssb + tok * ssl + cols, mask=m, other=0.0).to(tl.float32)
            sh = tl.load(SH + b * shb + tok * shl + cols, mask=m, other=0.0).to(tl.float32)
            y = y * (1.0 + s) + sh
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def gated_residual_kernel(X, Out, G, Y, L, D, sgb, sgl, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = row // L
        tok = row - b * L
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        o = tl.load(Out + row * D + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + b * sgb + tok * sgl + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (o * g + x).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def rms_norm_rotary_kernel(X, W, C, S, Y, L, PAIRS, HALF, csl, ssl, eps,
                               BLOCK: tl.constexpr):  # fmt: skip
        # A row of D = 2 * PAIRS values, read and written whole (coalesced), split into the
        # even and odd members of each pair for the rotation.
        row = tl.program_id(0).to(tl.int64)
        tok = row % L
        cols = tl.arange(0, 2 * BLOCK)
        m = cols < 2 * PAIRS
        x = tl.load(X + row * 2 * PAIRS + cols, mask=m, other=0.0).to(tl.float32)
        ms = tl.sum(x * x, axis=0) / (2 * PAIRS)
        r = 1.0 / tl.sqrt(ms + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        y = (x * r * w).to(Y.dtype.element_ty).to(tl.float32)
        ye, yo = tl.split(tl.reshape(y, (BLOCK, 2)))
        i = tl.arange(0, BLOCK)
        j = i % HALF
        c = tl.load(C + tok * csl + j, mask=i < PAIRS, other=0.0)
        s = tl.load(S + tok * ssl + j, mask=i < PAIRS, other=0.0)
        out = tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), (2 * BLOCK,))
        tl.store(Y + row * 2 * PAIRS + cols, out.to(Y.dtype.element_ty), mask=m)

    return {
        "norm_modulate": norm_modulate_kernel,
        "gated_residual": gated_residual_kernel,
        "rms_norm_rotary": rms_norm_rotary_kernel,
    }
