"""Peak activation memory of our DiT forward and VAE decode vs diffusers', on CPU.

A dispatch mode counts the bytes of every tensor storage an op creates until that storage
is freed, so the peak is the largest set of live intermediates (inputs and weights, which
exist before the call, are not counted). GPU peaks additionally include kernel workspaces;
``benchmarks/latency.py`` measures those on a GPU.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastvideo.models.wan.transformer import (
    FP32_PARAM_PATTERNS,
    WanTransformer3D,
    WanTransformerConfig,
)
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig


class PeakTracker(TorchDispatchMode):
    """Peak bytes of live storages created inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn) -> int:
    tracker = PeakTracker()
    with torch.no_grad(), tracker:
        out = fn()
        del out
    return tracker.peak


DIT = dict(
    patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=32, in_channels=16,
    out_channels=16, text_dim=64, freq_dim=32, ffn_dim=512, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)  # fmt: skip


def test_tracker_counts_live_intermediates():
    def two_alive():
        a = torch.ones(1000)
        b = a * 2
        return a + b  # a, b and the result: 3 x 4000 bytes

    def one_at_a_time():
        a = torch.ones(1000)
        a = a * 2
        return a * 3  # at most 2 alive

    assert peak_bytes(two_alive) == 12000
    assert peak_bytes(one_at_a_time) == 8000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_forward_peak_not_above_diffusers(dtype):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**DIT).eval()
    ours = WanTransformer3D(WanTransformerConfig.from_dict(DIT)).eval()
    ours.load_state_dict(ref.state_dict())
    if dtype != torch.float32:  # the mixed precision both use on GPU
        ref.to(dtype)
        ours.to(dtype)
        for model, keep in ((ref, ref._keep_in_fp32_modules), (ours, FP32_PARAM_PATTERNS)):
            for name, p in model.named_parameters():
                if any(k in name for k in keep):
                    p.data = p.data.float()
    x = torch.randn(1, 16, 9, 64, 96, dtype=dtype)
    t, text = torch.tensor([999]), torch.randn(1, 32, 64, dtype=dtype)
    ours_peak = peak_bytes(lambda: ours(x, t, text))
    ref_peak = peak_bytes(lambda: ref(x, t, text, return_dict=False)[0])
    # ours counts its own copy of the input in token layout (diffusers' conv reads x in
    # place): allow exactly that much.
    allowance = x.numel() * x.element_size() * 2
    print(f"\nDiT {dtype}: ours {ours_peak / 1e6:.2f} MB, diffusers {ref_peak / 1e6:.2f} MB")
    assert ours_peak <= ref_peak + allowance


# bf16 at a smaller size: CPUs without AVX-512 run bf16 convolutions about 20x slower
# than fp32 (the 12x16 latents took minutes per decode on this project's AVX2 machine).
@pytest.mark.parametrize(
    "dtype, hw", [(torch.float32, (12, 16)), (torch.bfloat16, (4, 6))], ids=["fp32", "bf16"]
)
def test_vae_decode_peak_not_above_diffusers(dtype, hw):
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]).eval()  # fmt: skip
    cfg = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    ours = WanVAE(WanVAEConfig.from_dict(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    ref.to(dtype)
    ours.to(dtype)
    z = torch.randn(1, 16, 3 if dtype == torch.float32 else 2, *hw, dtype=dtype)
    ours_peak = peak_bytes(lambda: ours.decode(z))
    ref_peak = peak_bytes(lambda: ref.decode(z, return_dict=False)[0])
    print(f"\nVAE {dtype}: ours {ours_peak / 1e6:.2f} MB, diffusers {ref_peak / 1e6:.2f} MB")
    assert ours_peak <= ref_peak
