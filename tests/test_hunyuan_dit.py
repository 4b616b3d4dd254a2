"""Our HunyuanVideo DiT against diffusers' HunyuanVideoTransformer3DModel (the oracle),
loaded from the same diffusers-saved checkpoint through our real loader; and the sharded
forward (2, 3 and 4 gloo CPU ranks; Ulysses, ring and both) against the unsharded one.

Tolerance (fp32): relative error ||ours - ref|| / ||ref|| < 1e-5. Measured: see -s output
(typically 1e-7 or 0: the implementations run the same operations; ours cuts padded text
tokens instead of masking them, and the sharded runs reorder the softmax by log-sum-exp).

diffusers is imported lazily: the spawned rank processes import this module too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvideo.distributed.plan import ParallelPlan
from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, take_shard
from fastvideo.models.hunyuan.transformer import HunyuanTransformer3D, HunyuanTransformerConfig
from fastvideo.models.loader import load_checkpoint, meta_module

REL_TOL = 1e-5
BF16_REL_TOL = 1e-2  # bf16 keeps 8 significant bits; measured 2.6e-3
TINY = dict(
    in_channels=4, out_channels=6, num_attention_heads=6, attention_head_dim=16, num_layers=2,
    num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24,
    rope_theta=256.0, rope_axes_dim=(4, 6, 6),
)  # fmt: skip
TEXT_LEN = 10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).norm() / b.double().norm())


def _load(folder: Path, runtime: ParallelRuntime | None = None) -> HunyuanTransformer3D:
    cfg = HunyuanTransformerConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = meta_module(lambda: HunyuanTransformer3D(cfg, runtime))
    return load_checkpoint(model, folder, torch.device("cpu"), lambda _: torch.float32)


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """(folder, diffusers model, our model loaded from the folder)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # norms are created as ones: randomise so a mix-up would show
        for name, param in ref.named_parameters():
            if "norm" in name and name.endswith("weight") and param.ndim == 1:
                param.normal_(1.0, 0.2)
    folder = tmp_path_factory.mktemp("hunyuan-dit")
    ref.save_pretrained(str(folder))
    return folder, ref, _load(folder)


def _inputs(batch: int, latent_shape: tuple[int, int, int], lens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], *latent_shape, generator=g)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    return dict(
        hidden_states=x,
        timestep=torch.tensor([937.0, 251.0][:batch]),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TINY["text_embed_dim"], generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        guidance=torch.tensor([6000.0, 3500.0][:batch]),
    )


# (batch, latent F x H x W, valid text tokens per item): >1 latent frame, non-square grids.
CASES = {
    "b2-unequal-text": (2, (3, 4, 10), [7, 4]),
    "b1-cut-text": (1, (2, 6, 4), [5]),
    "b2-equal-text": (2, (2, 4, 6), [6, 6]),
    "b1-full-text": (1, (3, 2, 6), [TEXT_LEN]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dit_matches_diffusers(tiny_dit, case):
    _, ref, ours = tiny_dit
    inputs = _inputs(*CASES[case])
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        out = ours(**inputs)
    err = _rel(out, expected)
    print(f"\n{case}: DiT relative error {err:.2e}")
    assert err < REL_TOL


def test_bf16_matches_diffusers(tiny_dit):
    """In bf16 too (everything runs in the model dtype, as in diffusers)."""
    import copy

    _, ref, ours = tiny_dit
    ref, ours = copy.deepcopy(ref).bfloat16(), copy.deepcopy(ours).bfloat16()
    inputs = _inputs(*CASES["b2-unequal-text"])
    # Timestep and guidance stay fp32 on both sides (they are embedded in fp32).
    tensors = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    bf16 = {k: v.bfloat16() if k in tensors else v for k, v in inputs.items()}
    with torch.no_grad():
        expected = ref(**bf16, return_dict=False)[0]
        out = ours(**inputs)  # fp32 inputs are cast to the model dtype
    assert out.dtype == torch.bfloat16
    err = _rel(out, expected)
    print(f"\nbf16: DiT relative error {err:.2e}")
    assert err < BF16_REL_TOL


def test_non_prefix_mask_follows_diffusers(tiny_dit):
    """diffusers' DiT attends the first mask.sum() text tokens (whatever the mask's holes),
    its refiner the masked ones: a mask with holes takes the general path."""
    _, ref, ours = tiny_dit
    inputs = _inputs(2, (2, 4, 6), [6, 4])
    inputs["encoder_attention_mask"][0, 2] = 0
    inputs["encoder_attention_mask"][1, 8] = 1
    with torch.no_grad():
        err = _rel(ours(**inputs), ref(**inputs, return_dict=False)[0])
    print(f"\nnon-prefix mask: DiT relative error {err:.2e}")
    assert err < REL_TOL


def test_padded_text_tokens_are_never_attended(tiny_dit):
    """Changing the states of masked text tokens changes nothing; unmasking them does."""
    _, _, ours = tiny_dit
    inputs = _inputs(2, (2, 4, 6), [7, 3])
    other = {k: v.clone() for k, v in inputs.items()}
    other["encoder_hidden_states"][0, 7:] = 100.0
    other["encoder_hidden_states"][1, 3:] = -50.0
    with torch.no_grad():
        out = ours(**inputs)
        assert torch.equal(ours(**other), out)
        unmasked = ours(**{**inputs, "encoder_attention_mask": torch.ones(2, TEXT_LEN)})
    assert _rel(unmasked, out) > 1e-3


def test_guidance_is_embedded(tiny_dit):
    _, ref, ours = tiny_dit
    inputs = _inputs(1, (2, 4, 6), [5])
    with torch.no_grad():
        base = ours(**inputs)
        other = ours(**{**inputs, "guidance": torch.tensor([1000.0])})
    assert _rel(other, base) > 1e-3
    with pytest.raises(ValueError, match="guidance"):
        ours(**{**inputs, "guidance": None})


def test_full_size_state_dict_matches_diffusers():
    """The default (real HunyuanVideo) config: same config fields, keys and shapes."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel()
        ours = HunyuanTransformer3D(HunyuanTransformerConfig.from_dict(dict(ref.config)))
    assert HunyuanTransformerConfig.from_dict(dict(ref.config)) == HunyuanTransformerConfig()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert list(ours.buffers()) == []


def test_config_rejects_unsupported_fields():
    with pytest.raises(ValueError, match="not_a_field"):
        HunyuanTransformerConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError, match="image-to-video"):
        HunyuanTransformerConfig.from_dict({"image_condition_type": "token_replace"})
    with pytest.raises(ValueError, match="rope_axes_dim"):
        HunyuanTransformerConfig.from_dict({"rope_axes_dim": [16, 56, 48]})


# --- sequence parallel ---------------------------------------------------------------------
# Grids chosen so that padding happens: 25 tokens pad for 2, 3 and 4 ranks; 2 tokens leave
# some ranks with nothing but padding. Batch 2 with unequal text lengths takes the
# per-item path, batch 1 the cut-text path.
SHARD_CASES = {
    "25tok-b2-unequal": (2, (5, 2, 10), [7, 4]),
    "2tok-b1": (1, (1, 2, 4), [5]),
    "25tok-b1-full": (1, (5, 2, 10), [TEXT_LEN]),
}
# world size -> plans (cfg, ulysses, ring); 6 heads split over 2 or 3 Ulysses ranks.
SHARD_PLANS = {
    2: [ParallelPlan(1, 2, 1), ParallelPlan(1, 1, 2)],
    3: [ParallelPlan(1, 3, 1), ParallelPlan(1, 1, 3)],
    4: [ParallelPlan(1, 2, 2), ParallelPlan(1, 1, 4)],
}


def _token_inputs(case: str) -> dict:
    batch, latent_shape, lens = SHARD_CASES[case]
    inputs = _inputs(batch, latent_shape, lens, seed=3)
    grid = TokenGrid(latent_shape[0], latent_shape[1] // 2, latent_shape[2] // 2)
    return dict(
        tokens=patchify(inputs["hidden_states"], (1, 2, 2)),
        timestep=inputs["timestep"],
        text_states=inputs["encoder_hidden_states"],
        text_mask=inputs["encoder_attention_mask"],
        pooled=inputs["pooled_projections"],
        guidance=inputs["guidance"],
        grid=grid,
    )


def _shard_worker(rank: int, world: int, folder: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        runtime = ParallelRuntime(rank, world, torch.device("cpu"))
        plans = SHARD_PLANS[world]
        runtime.prepare(plans)
        model = _load(Path(folder), runtime)
        results = {}
        for plan in plans:
            with runtime.activate(plan) as groups, torch.no_grad():
                for case in SHARD_CASES:
                    inputs = _token_inputs(case)
                    grid = inputs["grid"]
                    shard = SequenceShard.split(grid.num_tokens, groups.sp.size, groups.sp.rank)
                    inputs["tokens"] = take_shard(inputs["tokens"], shard)
                    out = model.forward_tokens(**inputs, shard=shard)
                    full = runtime.all_gather(groups.sp, out, dim=1)[:, : grid.num_tokens]
                    results[(plan.describe(), case)] = full
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(SHARD_PLANS))
def test_sharded_forward_equals_unsharded(tiny_dit, tmp_path, world):
    folder, _, ours = tiny_dit
    mp.spawn(
        _shard_worker,
        args=(world, str(folder), str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        join=True,
    )
    with torch.no_grad():
        expected = {case: ours.forward_tokens(**_token_inputs(case)) for case in SHARD_CASES}
    failures = []
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for (plan, case), out in sorted(ranks[0].items()):
        err = _rel(out, expected[case])
        print(f"\n{world} ranks, {plan:<18} {case:<18}: relative error {err:.2e}")
        if not err < REL_TOL:
            failures.append(f"{plan} {case}: {err:.2e}")
        # every rank gathered the same video (and so attended the same replicated text)
        assert all(torch.equal(r[(plan, case)], out) for r in ranks[1:])
    assert not failures, failures
