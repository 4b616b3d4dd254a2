"""Float8 weight storage: a module's linear layers keep their weights in float8 (e4m3, one
scale per output row) and compute in the activations' dtype, through torchao's weight-only
float8 quantisation (an optional extra: ``fastvideo[fp8]``)."""

from __future__ import annotations

import torch
import torch.nn as nn


def store_linears_in_fp8(module: nn.Module) -> int:
    """Quantise every ``nn.Linear`` of ``module`` in place; returns how many."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    count = sum(isinstance(m, nn.Linear) for m in module.modules())
    quantize_(module, Float8WeightOnlyConfig(), filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters hold (float8 weights count their data and scales)."""
    total = 0
    for p in module.parameters():
        parts = [
            getattr(p, a)
            for a in ("qdata", "scale")
            if isinstance(getattr(p, a, None), torch.Tensor)
        ]
        tensors = parts or [p]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
