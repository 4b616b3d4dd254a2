"""Float8 in two forms.

* Weight storage (``text_encoder_precision="fp8"``): a module's linear layers keep their
  weights in float8 (e4m3, one scale per output row) and compute in the activations'
  dtype, the weight dequantised for each call. torch's own float8 dtype, no extra
  package: with torchao installed, transformers imports it in every process that loads a
  model (~0.5 s each), which a storage format that fits in a few lines does not need.
* Float8 matmuls (``dit_precision="fp8"``): torchao's dynamic float8 quantisation of the
  DiT blocks' linear layers (weights and activations in e4m3 with per-row scales, the
  matmul on float8 tensor cores), for GPUs of compute capability 8.9 or newer; torchao
  is the ``fp8`` extra and is imported only when the option is used."""

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


def fp8_matmul_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers that ``dit_precision="fp8"`` runs in float8: every
    ``nn.Linear`` inside the model's repeated blocks whose sizes the float8 matmul takes
    (multiples of 16). Embeddings, the output head and other small layers stay bf16."""
    from fastvideo.layers.offload import block_lists

    inside = {id(m) for blocks in block_lists(model) for b in blocks for m in b.modules()}
    return [
        name
        for name, m in model.named_modules()
        if id(m) in inside
        and type(m) is nn.Linear
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    ]


FP8_MIN_CAPABILITY = (8, 9)  # float8 tensor-core matmuls: Ada, Hopper, Blackwell


def check_fp8_matmul_device(device: torch.device) -> None:
    """Raise ValueError unless ``device`` runs float8 matmuls (torchao's requirement)."""
    if device.type != "cuda":
        raise ValueError(f"dit_precision='fp8' needs a CUDA GPU, got device {device}")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"dit_precision='fp8' needs a GPU of compute capability 8.9 or newer (Ada, "
            f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
        )


def quantize_dit_fp8(model: nn.Module) -> int:
    """torchao's dynamic float8 quantisation (per-row scales for weights and activations)
    of :func:`fp8_matmul_targets`, in place; returns how many layers."""
    from torchao.quantization import (  # the fp8 extra: pip install 'fastvideo[fp8]'
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    targets = set(fp8_matmul_targets(model))
    quantize_(
        model,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda module, name: name in targets,
    )
    return len(targets)


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
