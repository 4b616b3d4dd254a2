"""Tiny random Wan2.1 checkpoints written by diffusers' own classes (the reference oracle)
with ``save_pretrained``, in the real diffusers layout, for fastvideo to load."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5Config, UMT5EncoderModel

from fastvideo.models.wan.demo import _write_tokenizer
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig


@dataclass(frozen=True)
class TinyWan:
    """Architecture knobs of a tiny test checkpoint."""

    name: str
    heads: int = 6
    head_dim: int = 8
    layers: int = 2
    text_dim: int = 32
    cross_attn_norm: bool = True
    vae_base_dim: int = 8
    scheduler: str = "unipc"  # or "euler"
    flow_shift: float = 3.0
    seed: int = 0
    extra: dict = field(default_factory=dict)


# Two configurations: the default (UniPC, 6 heads) and one with Euler, 4 heads,
# no cross-attention norm and a different shift.
TINY_A = TinyWan("tiny-a")
TINY_B = TinyWan(
    "tiny-b", heads=4, head_dim=12, cross_attn_norm=False, scheduler="euler", flow_shift=5.0, seed=1
)


def unipc_scheduler(flow_shift: float = 3.0) -> UniPCMultistepScheduler:
    """The Wan checkpoints' flow-matching UniPC scheduler."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        num_train_timesteps=1000,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
        predict_x0=True,
    )


def _scheduler(cfg: TinyWan):
    if cfg.scheduler == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)
    return unipc_scheduler(cfg.flow_shift)


def vae_pair(config: dict) -> tuple[AutoencoderKLWan, WanVAE]:
    """diffusers' AutoencoderKLWan from ``config`` (seed 0, norm gammas randomised so that
    a swapped norm shows) and our WanVAE holding the same weights, both in eval mode."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):  # ones at init
                param.add_(0.2 * torch.randn_like(param))
    with torch.device("meta"):
        ours = WanVAE(WanVAEConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def build_diffusers_pipeline(cfg: TinyWan, folder: Path) -> WanPipeline:
    """Create the tiny pipeline with diffusers' classes and save it to ``folder``."""
    torch.manual_seed(cfg.seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=cfg.text_dim,
        freq_dim=32,
        ffn_dim=2 * cfg.heads * cfg.head_dim,
        num_layers=cfg.layers,
        cross_attn_norm=cfg.cross_attn_norm,
        rope_max_seq_len=256,
    )
    if cfg.cross_attn_norm:  # randomise the affine norm so a mix-up would show
        for block in transformer.blocks:
            block.norm2.weight.data.normal_(1.0, 0.2)
            block.norm2.bias.data.normal_(0.0, 0.2)
    vae = AutoencoderKLWan(
        base_dim=cfg.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    tokenizer = _write_tokenizer(Path(tempfile.mkdtemp(prefix="tok-")))
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.text_dim,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        )
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_scheduler(cfg),
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    for module in (transformer, vae, text_encoder):
        module.eval()  # freshly built modules are in training mode (UMT5 has dropout)
    return pipe


def run_diffusers(
    pipe: WanPipeline, prompt: str, negative_prompt: str, seed: int, **kwargs
) -> torch.Tensor:
    """diffusers' frames for one prompt as float [T, H, W, 3] in [0, 1]."""
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    return torch.from_numpy(out.frames[0])
