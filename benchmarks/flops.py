"""FLOPs of one DiT forward, split into attention (softmax(QK^T)V) and linear layers, and
the bf16 floor they give: attention at the measured best kernel's rate plus the linear
layers at a dense bf16 GEMM rate (~790 TFLOP/s: what large bf16 GEMMs reach on an H200;
its datasheet peak is ~990). Multiply-adds count as 2 FLOPs; norms, rotary, modulation
and other elementwise work are left out (memory-bound, small next to the GEMMs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LINEAR_TFLOPS = 790.0


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward of batch ``batch``."""

    attention: float
    linear: float

    @property
    def total(self) -> float:
        return self.attention + self.linear

    def floor_ms(self, attention_tflops: float, linear_tflops: float = LINEAR_TFLOPS) -> float:
        """Milliseconds if attention ran at ``attention_tflops`` and GEMMs at ``linear_tflops``."""
        return (self.attention / attention_tflops + self.linear / linear_tflops) / 1e9

    def record(self, attention_tflops: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {**asdict(self), "total": self.total, "linear_tflops": LINEAR_TFLOPS}
        if attention_tflops:
            out["attention_tflops"] = attention_tflops
            out["floor_ms"] = self.floor_ms(attention_tflops)
            out["attention_floor_ms"] = self.attention / attention_tflops / 1e9
            out["linear_floor_ms"] = self.linear / LINEAR_TFLOPS / 1e9
        return out


def wan_forward_flops(
    cfg: dict[str, Any],
    tokens: int,
    batch: int = 1,
    text_tokens: int = 512,
    image_tokens: int = 0,
    per_token_timestep: bool = False,
) -> ForwardFlops:
    """One Wan DiT forward (``cfg``: diffusers ``WanTransformer3DModel`` fields) over
    ``tokens`` video tokens per sample."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, layers, n = cfg["ffn_dim"], cfg["num_layers"], tokens
    patch = cfg["patch_size"][0] * cfg["patch_size"][1] * cfg["patch_size"][2]
    per_block_linear = (
        4 * 2 * n * d * d  # self-attention q, k, v, out
        + 2 * 2 * n * d * d  # cross-attention q, out
        + 2 * 2 * (text_tokens + image_tokens) * d * d  # cross-attention k, v (text, image)
        + 2 * 2 * n * d * f  # FFN
    )
    per_block_attention = 4 * n * n * d + 4 * n * (text_tokens + image_tokens) * d
    linear = layers * per_block_linear
    linear += 2 * n * patch * (cfg["in_channels"] + cfg["out_channels"]) * d  # patch in/out
    linear += 2 * text_tokens * (cfg["text_dim"] * d + d * d)  # text embedder
    if image_tokens:
        image_dim = cfg["image_dim"]
        linear += 2 * image_tokens * (image_dim * image_dim + image_dim * d)
    if per_token_timestep:  # time embedder and 6-way projection on every token
        linear += 2 * n * (cfg["freq_dim"] * d + d * d + 6 * d * d)
    return ForwardFlops(batch * layers * per_block_attention, batch * linear)


def hunyuan_forward_flops(
    cfg: dict[str, Any], tokens: int, text_tokens: int, batch: int = 1
) -> ForwardFlops:
    """One HunyuanVideo DiT forward (diffusers ``HunyuanVideoTransformer3DModel`` fields):
    joint attention over ``tokens`` video + ``text_tokens`` (valid) text tokens."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = int(d * cfg["mlp_ratio"])
    joint = tokens + text_tokens
    dual = 2 * joint * (4 * d * d + 2 * d * mlp)  # q, k, v, out + FFN, each stream
    single = 2 * joint * (3 * d * d + d * mlp + (d + mlp) * d)  # qkv, proj_mlp, proj_out
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    linear = cfg["num_layers"] * dual + cfg["num_single_layers"] * single
    patch = cfg["patch_size_t"] * cfg["patch_size"] ** 2
    linear += 2 * tokens * patch * (cfg["in_channels"] + cfg["out_channels"]) * d
    attention = blocks * 4 * joint * joint * d
    return ForwardFlops(batch * attention, batch * linear)
