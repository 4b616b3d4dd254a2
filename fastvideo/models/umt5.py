"""The UMT5 encoder (Wan's text encoder) without transformers' modeling code.

Building ``transformers.UMT5EncoderModel`` imports its generation and masking utilities
(which import ``torch._dynamo``): seconds of every worker's start-up for an encoder that
is a plain stack of pre-norm blocks. This module computes what transformers' encoder
computes, operation for operation (its SDPA path: the relative position bias of each layer
plus the padding mask as one additive mask, no 1/sqrt(d) scaling; RMS norms with fp32
statistics; the gated GELU feed-forward with ``wo`` computing in its own dtype), with the
same state-dict keys (``shared``, ``encoder.block.N.layer.0.SelfAttention.q`` ...), so a
checkpoint saved by transformers loads as it is.

Configs this module does not cover (a non-gated or other activation than the ones listed
in ``ACTIVATIONS``, a decoder) are left to transformers (``supports``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_new`` (the tanh approximation, written out as it writes it)."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


ACTIVATIONS = {"gelu_new": _gelu_new, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    activation: str
    gated: bool
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> UMT5Config:
        """transformers' UMT5Config fields (its ``feed_forward_proj`` rule for the
        activation: ``gated-gelu`` means gated ``gelu_new``)."""
        proj = cfg.get("feed_forward_proj", "gated-gelu")
        parts = proj.split("-")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        return cls(
            vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"],
            d_ff=cfg["d_ff"], num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
            activation=act, gated=parts[0] == "gated",
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            eps=cfg.get("layer_norm_epsilon", 1e-6),
        )  # fmt: skip


def supports(cfg: dict[str, Any]) -> str | None:
    """None when this module computes what transformers' encoder does for ``cfg``, else
    why not."""
    if cfg.get("model_type") not in (None, "umt5"):
        return f"model_type {cfg.get('model_type')!r}"
    if cfg.get("is_decoder"):
        return "a decoder"
    act = UMT5Config.from_dict(cfg).activation
    return None if act in ACTIVATIONS else f"activation {act!r}"


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialised (the checkpoint fills it; ``normal_`` on meta
    tensors would import ``torch._dynamo``)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, fp32 statistics, back to the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class SelfAttention(nn.Module):
    def __init__(self, c: UMT5Config):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.heads, self.d_kv = c.num_heads, c.d_kv
        self.num_buckets, self.max_distance = c.num_buckets, c.max_distance
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.relative_attention_bias = _embedding(c.num_buckets, c.num_heads)

    def _buckets(self, relative: torch.Tensor) -> torch.Tensor:
        """Bidirectional T5 buckets: half for each sign, exact below a quarter of them,
        logarithmic up to ``max_distance``."""
        half = self.num_buckets // 2
        buckets = (relative > 0).to(torch.long) * half
        relative = torch.abs(relative)
        exact = half // 2
        log_ratio = torch.log(relative.float() / exact) / math.log(self.max_distance / exact)
        large = exact + (log_ratio * (half - exact)).to(torch.long)
        large = torch.min(large, torch.full_like(large, half - 1))
        return buckets + torch.where(relative < exact, relative, large)

    def bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, H, L, L] relative position bias."""
        pos = torch.arange(length, dtype=torch.long, device=device)
        values = self.relative_attention_bias(self._buckets(pos[None, :] - pos[:, None]))
        return values.permute([2, 0, 1]).unsqueeze(0)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n = x.shape[:2]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        mask = self.bias(n, x.device)
        if keep is not None:
            mask = torch.where(keep, mask, torch.finfo(k.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.contiguous(), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1).contiguous())


class _AttentionLayer(nn.Module):
    def __init__(self, c: UMT5Config):
        super().__init__()
        self.SelfAttention = SelfAttention(c)
        self.layer_norm = RMSNorm(c.d_model, c.eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), keep)


class _FeedForward(nn.Module):
    def __init__(self, c: UMT5Config):
        super().__init__()
        self.gated = c.gated
        self.act = ACTIVATIONS[c.activation]
        if c.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        wo_dtype = self.wo.weight.dtype
        if h.dtype != wo_dtype and wo_dtype.is_floating_point:  # wo kept in fp32 for fp16
            h = h.to(wo_dtype)
        return self.wo(h)


class _FeedForwardLayer(nn.Module):
    def __init__(self, c: UMT5Config):
        super().__init__()
        self.DenseReluDense = _FeedForward(c)
        self.layer_norm = RMSNorm(c.d_model, c.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class _Block(nn.Module):
    def __init__(self, c: UMT5Config):
        super().__init__()
        self.layer = nn.ModuleList([_AttentionLayer(c), _FeedForwardLayer(c)])

    @staticmethod
    def _clamp(x: torch.Tensor) -> torch.Tensor:
        """fp16 only: inf clamped below the largest value, as transformers does."""
        if x.dtype != torch.float16:
            return x
        top = torch.finfo(x.dtype).max
        limit = torch.where(torch.isinf(x).any(), top - 1000, top)
        return torch.clamp(x, min=-limit, max=limit)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self._clamp(self.layer[0](x, keep))
        return self._clamp(self.layer[1](x))


class _Stack(nn.Module):
    def __init__(self, c: UMT5Config, shared: nn.Embedding):
        super().__init__()
        self.embed_tokens = shared
        self.block = nn.ModuleList([_Block(c) for _ in range(c.num_layers)])
        self.final_layer_norm = RMSNorm(c.d_model, c.eps)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor


class UMT5Encoder(nn.Module):
    """``UMT5EncoderModel``'s forward on its state dict: (ids [B, L], mask [B, L]) ->
    ``.last_hidden_state`` [B, L, d_model]."""

    # As transformers declares them: the loader reads these.
    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight"}
    _keep_in_fp32_modules = ["wo"]

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = _Stack(config, self.shared)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> EncoderOutput:
        x = self.encoder.embed_tokens(input_ids)
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: keys to attend
        for block in self.encoder.block:
            x = block(x, keep)
        return EncoderOutput(self.encoder.final_layer_norm(x))
