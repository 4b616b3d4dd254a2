"""Full-size DiT configurations, built directly on the device with seeded random weights,
ours and diffusers' sharing one copy of them, and one denoising step's inputs for each.

Configs are diffusers' ``config.json`` fields of the released checkpoints (checked against
diffusers' class defaults and the original repos' configs):

- Wan2.1-I2V-14B-480P: the 14B T2V shape with 36 input channels (16 noise + 4 mask + 16
  image latents), CLIP image states (257 tokens of 1280: ViT-H/14 at 224 px) embedded and
  attended through extra K/V projections (``image_dim`` 1280, ``added_kv_proj_dim`` 5120);
- Wan2.2-T2V-A14B: two 14B experts of the Wan2.1-14B shape (16 input channels), switched
  by timestep;
- Wan2.2-TI2V-5B: dim 3072 (24 heads x 128), 30 layers, FFN 14336, 48 latent channels in
  and out (its VAE compresses 16x spatially), one timestep per token;
- HunyuanVideo: diffusers' ``HunyuanVideoTransformer3DModel`` defaults (20 dual-stream + 40
  single-stream blocks, 24 heads x 128, Llama text states 4096, CLIP pooled 768, patch
  1x2x2), embedded guidance (no CFG).

Random init: speed does not depend on the values. diffusers' model is built for real
(its own init, seeded) and cast as ``from_pretrained(torch_dtype=...)`` would (its
``_keep_in_fp32_modules`` stay fp32); ours is built on the meta device and takes the same
tensors (no copy), so both run the same weights and outputs can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import WAN_14B

WAN_I2V_14B = {**WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
WAN_TI2V_5B = {
    **WAN_14B, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
    "in_channels": 48, "out_channels": 48,
}  # fmt: skip
HUNYUAN_13B = {
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
    "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0,
    "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
    "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
}  # fmt: skip
# CPU smoke runs: the same structure at toy widths.
_WAN_TINY = {**WAN_14B, "num_attention_heads": 2, "attention_head_dim": 16, "text_dim": 32,
             "freq_dim": 32, "ffn_dim": 64, "num_layers": 2}  # fmt: skip
_HUNYUAN_TINY = {**HUNYUAN_13B, "num_attention_heads": 2, "attention_head_dim": 16,
                 "num_layers": 1, "num_single_layers": 1, "text_embed_dim": 32,
                 "pooled_projection_dim": 24, "rope_axes_dim": [4, 6, 6]}  # fmt: skip


@dataclass(frozen=True)
class ModelCase:
    """One model at its published size: what one denoising step runs."""

    name: str
    family: str  # "wan" or "hunyuan"
    config: dict[str, Any]
    height: int
    width: int
    frames: int
    vae_spatial: int = 8
    vae_temporal: int = 4
    cfg: bool = True  # conditional + unconditional pass per step
    experts: int = 1
    image_tokens: int = 0  # CLIP image states (Wan2.1 I2V)
    per_token_timestep: bool = False  # Wan2.2 TI2V
    text_tokens: int = 512
    text_valid: int | None = None  # HunyuanVideo: valid (unpadded) text tokens
    notes: tuple[str, ...] = field(default=())
    hf_id: str = ""  # the registered variant whose shipped settings (STA windows) apply

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C_in, F, H, W) of the DiT's input."""
        frames = (self.frames - 1) // self.vae_temporal + 1
        return (self.config["in_channels"], frames, self.height // self.vae_spatial,
                self.width // self.vae_spatial)  # fmt: skip

    @property
    def patch(self) -> tuple[int, int, int]:
        if self.family == "wan":
            return tuple(self.config["patch_size"])  # type: ignore[return-value]
        p = self.config["patch_size"]
        return (self.config["patch_size_t"], p, p)

    @property
    def tokens(self) -> int:
        _, f, h, w = self.latent_shape
        pt, ph, pw = self.patch
        return (f // pt) * (h // ph) * (w // pw)


CASES = {
    "wan2.1-i2v-14b": ModelCase("wan2.1-i2v-14b", "wan", WAN_I2V_14B, 480, 832, 81,
                                image_tokens=257,
                                hf_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    "wan2.2-a14b": ModelCase("wan2.2-a14b", "wan", WAN_14B, 720, 1280, 81, experts=2,
                             hf_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
    "wan2.2-ti2v-5b": ModelCase("wan2.2-ti2v-5b", "wan", WAN_TI2V_5B, 704, 1280, 121,
                                vae_spatial=16, per_token_timestep=True,
                                hf_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
    "hunyuanvideo": ModelCase("hunyuanvideo", "hunyuan", HUNYUAN_13B, 720, 1280, 129,
                              cfg=False, text_tokens=256, text_valid=80,
                              notes=("80 valid of 256 text tokens (right padding)",),
                              hf_id="hunyuanvideo-community/HunyuanVideo"),
}  # fmt: skip


def tiny_case(case: ModelCase) -> ModelCase:
    """The same model structure at toy sizes (CPU smoke runs)."""
    from dataclasses import replace

    if case.family == "hunyuan":
        return replace(case, config=_HUNYUAN_TINY, height=32, width=32, frames=5,
                       text_tokens=12, text_valid=7)  # fmt: skip
    cfg = {**_WAN_TINY, "in_channels": case.config["in_channels"],
           "out_channels": case.config["out_channels"]}  # fmt: skip
    if case.config.get("image_dim"):
        cfg.update(image_dim=24, added_kv_proj_dim=32)
    size = 64 if case.vae_spatial == 16 else 32
    # 512 text tokens even here: diffusers' I2V attention takes everything before the
    # last 512 context tokens as the image's.
    return replace(case, config=cfg, height=size, width=size, frames=5,
                   image_tokens=min(case.image_tokens, 5))  # fmt: skip


# --- building ------------------------------------------------------------------------------
def _keep_fp32(name: str, patterns: list[str] | None) -> bool:
    """diffusers' rule: a parameter stays fp32 when a dotted component of its name is one
    of the class's ``_keep_in_fp32_modules``."""
    return bool(patterns) and any(p in name.split(".") for p in patterns)  # type: ignore[union-attr]


def build_diffusers(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int):
    """diffusers' DiT with its own random init (seeded), cast like from_pretrained."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if case.family == "wan" else HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**case.config)
    keep = getattr(cls, "_keep_in_fp32_modules", None)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not _keep_fp32(name, keep):
            param.data = param.data.to(dtype)
    return model.eval().requires_grad_(False)


def build_ours(case: ModelCase, reference: torch.nn.Module, dtype: torch.dtype, backend: str):
    """Our DiT on the meta device, given ``reference``'s tensors (shared, not copied; cast
    only where our fp32 rule differs)."""
    from fastvideo.models.loader import meta_module

    if case.family == "wan":
        from fastvideo.models.wan.transformer import (
            FP32_PARAM_PATTERNS,
            WanTransformer3D,
            WanTransformerConfig,
        )

        model = meta_module(lambda: WanTransformer3D(WanTransformerConfig.from_dict(case.config)))

        def want(name: str) -> torch.dtype:
            return torch.float32 if any(p in name for p in FP32_PARAM_PATTERNS) else dtype
    else:
        from fastvideo.models.hunyuan.transformer import (
            HunyuanTransformer3D,
            HunyuanTransformerConfig,
        )

        cfg = HunyuanTransformerConfig.from_dict(case.config)
        model = meta_module(lambda: HunyuanTransformer3D(cfg))

        def want(name: str) -> torch.dtype:
            return dtype

    expected = model.state_dict().keys()
    source = reference.state_dict()
    missing = sorted(set(expected) - set(source))
    if missing:
        raise KeyError(f"{case.name}: diffusers' model lacks {missing[:5]}")
    state = {k: source[k] if source[k].dtype == want(k) else source[k].to(want(k))
             for k in expected}  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    model.set_attention(backend)
    return model.eval().requires_grad_(False)


# --- one step's inputs -----------------------------------------------------------------------
@dataclass
class StepInputs:
    """Tensors of one denoising step: ``ours`` (kwargs of ``forward_tokens``, batch 2 with
    CFG: conditional rows first) and ``diffusers`` (kwargs of each forward it runs per step:
    one per CFG branch, batch 1)."""

    ours: dict[str, Any]
    diffusers: list[dict[str, Any]]


def step_inputs(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from fastvideo.layers.sequence import TokenGrid, patchify

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = randn(1, *case.latent_shape)
    pt, ph, pw = case.patch
    _, f, h, w = case.latent_shape
    grid = TokenGrid(f // pt, h // ph, w // pw)
    tokens = patchify(x, case.patch)
    branches = 2 if case.cfg else 1
    if case.family == "hunyuan":
        return _hunyuan_inputs(case, x, tokens, grid, randn, device)
    text = [randn(1, case.text_tokens, case.config["text_dim"]) for _ in range(branches)]
    t = torch.full((1,), 999.0, device=device)
    if case.per_token_timestep:
        t = t[:, None].expand(1, grid.num_tokens).contiguous()
    image = randn(1, case.image_tokens, case.config["image_dim"]) if case.image_tokens else None
    ours: dict[str, Any] = {
        "tokens": tokens.repeat(branches, 1, 1),
        "timestep": t.repeat(branches, *[1] * (t.ndim - 1)),
        "text": torch.cat(text),
        "grid": grid,
    }
    if image is not None:
        ours["image"] = image.repeat(branches, 1, 1)
    theirs = [
        {"hidden_states": x, "timestep": t, "encoder_hidden_states": c,
         "encoder_hidden_states_image": image, "return_dict": False}
        for c in text
    ]  # fmt: skip
    return StepInputs(ours, theirs)


def _hunyuan_inputs(case, x, tokens, grid, randn, device) -> StepInputs:
    text = randn(1, case.text_tokens, case.config["text_embed_dim"])
    mask = torch.zeros(1, case.text_tokens, dtype=torch.long, device=device)
    mask[:, : case.text_valid or case.text_tokens] = 1
    pooled = randn(1, case.config["pooled_projection_dim"])
    t = torch.full((1,), 999.0, device=device)
    guidance = torch.full((1,), 6000.0, device=device)  # guidance 6.0 x 1000, as diffusers
    ours = {"tokens": tokens, "timestep": t, "text_states": text, "text_mask": mask,
            "pooled": pooled, "guidance": guidance, "grid": grid}  # fmt: skip
    theirs = [{"hidden_states": x, "timestep": t, "encoder_hidden_states": text,
               "encoder_attention_mask": mask, "pooled_projections": pooled,
               "guidance": guidance, "return_dict": False}]  # fmt: skip
    return StepInputs(ours, theirs)
