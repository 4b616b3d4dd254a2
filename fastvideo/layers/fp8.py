"""Float8 weight storage: a module's linear layers keep their weights in float8 (e4m3, one
scale per output row) and compute in the activations' dtype, the weight dequantised for
each call. torch's own float8 dtype, no extra package: with torchao installed, transformers
imports it in every process that loads a model (~0.5 s each), which a storage format that
fits in a few lines does not need."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class Fp8WeightLinear(nn.Module):
    """``nn.Linear`` with its weight held as float8 e4m3 data and fp32 per-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("qdata", (weight / scale).to(FP8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.compute_dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the compute dtype on the weight's device: for model code that
        reads ``layer.weight.dtype`` (T5's feed-forward casts its input to it)."""
        return self.qdata.new_empty(0, dtype=self.compute_dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qdata.to(dtype) * self.scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def store_linears_in_fp8(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an :class:`Fp8WeightLinear` (in
    place); returns how many."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, Fp8WeightLinear(child))
    return len(targets)
