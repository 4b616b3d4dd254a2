"""Sequence/CFG parallelism: the result must not depend on the number of ranks or the plan.

Every multi-process plan is compared with the in-process executor (one rank, no
torch.distributed) on the same checkpoint, seed and prompts.

Tolerance (fp32 on CPU): final latents (``output_type="latent"``) within relative error
1e-5 (L2 norm of the difference over the L2 norm of the reference), and uint8 frames off by
at most one level. Plans only reorder the arithmetic (batched vs. CFG-split forwards, the
all-to-all, log-sum-exp merging of ring chunks), so only rounding differences are allowed.
Measured: run with ``-s``; typically ~1e-7 without guidance, ~6e-7 with CFG, frames 0-1.
Latents are compared for every (size, guidance); frames (the VAE decode of those same
gathered latents on rank 0) for two combinations per plan, to keep the runtime low.

Sizes are chosen so that padding happens: 30 tokens (pads for 4-way SP), 25 tokens (pads
for 2-, 3- and 4-way SP) and 2 tokens (some ranks hold nothing but padding).

Also here: the plan chooser and the rank layout (pure Python), impossible forced plans,
and single-process unit tests of the building blocks (sharding, patchify, rotary tables,
log-sum-exp merge, attention with LSE).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import psutil
import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.distributed.plan import ParallelPlan, choose_plan
from fastvideo.kernels_bridge.attention import attention, attention_with_lse
from fastvideo.layers.attention import _merge
from fastvideo.layers.rotary import RotaryEmbedding3D
from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, take_shard, unpatchify

LATENT_RTOL = 1e-5
FRAME_ATOL = 1

PROMPT = "a red fox walking through a snowy forest at dawn"
NEGATIVE = "blurry, low quality"
COMMON = dict(negative_prompt=NEGATIVE, seed=11, num_inference_steps=3)
SIZES = {
    "30tok": dict(height=48, width=80, num_frames=5),  # latent grid 2 x 3 x 5
    "25tok": dict(height=80, width=80, num_frames=1),  # 1 x 5 x 5: pads for 2, 3 and 4
    "2tok": dict(height=16, width=32, num_frames=1),  # 1 x 1 x 2: ranks with only padding
}
GUIDANCE = (5.0, 1.0)
FRAME_CHECKS = {("30tok", 5.0), ("25tok", 1.0)}  # unpadded with CFG, padded without


# --- in-process references ---------------------------------------------------------------
class _References:
    """Lazily computed in-process results per (model, size, guidance, output_type)."""

    def __init__(self, folders: dict[str, str]):
        self._folders = folders
        self._gens: dict[str, VideoGenerator] = {}
        self._cache: dict[tuple, object] = {}

    def get(self, model: str, size: str, guidance: float, output_type: str):
        key = (model, size, guidance, output_type)
        if key not in self._cache:
            if model not in self._gens:
                self._gens[model] = VideoGenerator.from_pretrained(
                    self._folders[model], executor="inproc"
                )
            self._cache[key] = self._gens[model].generate_video(
                PROMPT, guidance_scale=guidance, output_type=output_type, **SIZES[size], **COMMON
            )
        return self._cache[key]

    def close(self) -> None:
        for gen in self._gens.values():
            gen.shutdown()


@pytest.fixture(scope="module")
def references(tiny_a, tiny_b):
    refs = _References({"tiny_a": str(tiny_a[0]), "tiny_b": str(tiny_b[0])})
    yield refs
    refs.close()


# --- output does not depend on the plan -----------------------------------------------------
# (id, model fixture, num_gpus, forced PipelineConfig fields, expected plan per guidance)
PLAN_CASES = [
    ("1-rank", "tiny_a", 1, {}, {5.0: "single rank", 1.0: "single rank"}),
    ("2-auto", "tiny_a", 2, {}, {5.0: "CFG 2", 1.0: "Ulysses 2"}),
    ("3-auto-ulysses", "tiny_a", 3, {}, {5.0: "Ulysses 3", 1.0: "Ulysses 3"}),
    ("4-auto", "tiny_a", 4, {}, {5.0: "CFG 2 x Ulysses 2", 1.0: "Ulysses 2 x ring 2"}),
    # 4 heads: 3 ranks cannot split heads, so ring attention is chosen automatically.
    ("3-auto-ring-4heads", "tiny_b", 3, {}, {5.0: "ring 3", 1.0: "ring 3"}),
]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == ref.dtype == torch.float32
    return ((ours - ref).norm() / ref.norm()).item()


def _frame_diff(ours: np.ndarray, ref: np.ndarray) -> int:
    assert ours.dtype == ref.dtype == np.uint8
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return int(np.abs(ours.astype(np.int16) - ref.astype(np.int16)).max())


@pytest.mark.parametrize(
    "model, num_gpus, forced, plans", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES]
)
def test_output_independent_of_plan(request, references, model, num_gpus, forced, plans):
    folder, _ = request.getfixturevalue(model)
    rows, failures = [], []
    with VideoGenerator.from_pretrained(
        str(folder), num_gpus=num_gpus, device="cpu", **forced
    ) as gen:
        for size, guidance in itertools.product(SIZES, GUIDANCE):
            params = dict(guidance_scale=guidance, **SIZES[size], **COMMON)
            expected = plans[guidance]
            lat = gen.generate_video(PROMPT, output_type="latent", **params)
            ref_lat = references.get(model, size, guidance, "latent")
            assert ref_lat.plan == "single rank" and ref_lat.latents.abs().max() > 0
            rel = _rel_err(lat.latents, ref_lat.latents)
            diff = None
            if (size, guidance) in FRAME_CHECKS:
                frames = gen.generate_video(PROMPT, **params)
                ref_frames = references.get(model, size, guidance, "np")
                assert ref_frames.frames.std() > 1.0, "flat frames would prove nothing"
                diff = _frame_diff(frames.frames, ref_frames.frames)
                if frames.plan != expected:
                    failures.append(f"{size} g={guidance}: plan {frames.plan!r} != {expected!r}")
                if diff > FRAME_ATOL:
                    failures.append(f"{size} g={guidance}: frame max |diff| {diff}")
            rows.append((size, guidance, lat.plan, rel, diff))
            if lat.plan != expected:
                failures.append(f"{size} g={guidance}: plan {lat.plan!r} != {expected!r}")
            if not rel < LATENT_RTOL:
                failures.append(f"{size} g={guidance}: latent rel err {rel:.2e}")
    print(f"\n{model} num_gpus={num_gpus} {forced or ''}")
    for size, guidance, plan, rel, diff in rows:
        shown = "-" if diff is None else diff
        print(f"  {size:>5} g={guidance}: {plan:<20} latent rel err {rel:.2e}  frames {shown}")
    assert not failures, "\n".join(failures)


# --- impossible forced plans fail early --------------------------------------------------
@pytest.mark.parametrize(
    "num_gpus, forced, match",
    [
        (4, dict(ulysses_degree=4), "ulysses_degree=4 must divide the model's 6 attention heads"),
        (4, dict(ring_degree=3), "ring_degree=3"),
        (4, dict(sp_degree=3), "sp_degree=3"),
        (3, dict(cfg_parallel=True), "cfg_parallel=True needs an even number of GPUs"),
        (2, dict(ulysses_degree=0), "ulysses_degree must be >= 1"),
    ],
)
def test_impossible_forced_plan_is_a_value_error_before_workers_start(
    tiny_a, num_gpus, forced, match
):
    folder, _ = tiny_a
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    start = time.monotonic()
    with pytest.raises(ValueError, match=match):
        VideoGenerator.from_pretrained(str(folder), num_gpus=num_gpus, device="cpu", **forced)
    elapsed = time.monotonic() - start
    assert {p.pid for p in me.children(recursive=True)} <= before, "a worker was started"
    assert elapsed < 2.0, f"took {elapsed:.1f}s: workers were probably started first"


# --- the plan chooser ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "world, heads, use_cfg, expected",
    [
        (8, 12, True, ParallelPlan(2, 4, 1)),
        (5, 12, True, ParallelPlan(1, 1, 5)),
        (5, 12, False, ParallelPlan(1, 1, 5)),
        (8, 12, False, ParallelPlan(1, 4, 2)),
        (1, 12, True, ParallelPlan(1, 1, 1)),
        (1, 12, False, ParallelPlan(1, 1, 1)),
        (2, 6, True, ParallelPlan(2, 1, 1)),
        (2, 6, False, ParallelPlan(1, 2, 1)),
        (3, 6, True, ParallelPlan(1, 3, 1)),
        (4, 6, True, ParallelPlan(2, 2, 1)),
        (4, 6, False, ParallelPlan(1, 2, 2)),
        (3, 4, False, ParallelPlan(1, 1, 3)),
        (6, 40, True, ParallelPlan(2, 1, 3)),
    ],
)
def test_choose_plan_automatic(world, heads, use_cfg, expected):
    plan = choose_plan(world, heads, use_cfg)
    assert plan == expected
    assert plan.world_size == world
    assert heads % plan.ulysses_degree == 0


def test_plan_descriptions():
    assert choose_plan(8, 12, True).describe() == "CFG 2 x Ulysses 4"
    assert choose_plan(5, 12, True).describe() == "ring 5"
    assert choose_plan(8, 12, False).describe() == "Ulysses 4 x ring 2"
    assert choose_plan(1, 12, True).describe() == "single rank"


@pytest.mark.parametrize(
    "world, heads, use_cfg, forced, expected",
    [
        (4, 6, True, dict(ring_degree=4, cfg_parallel=False), ParallelPlan(1, 1, 4)),
        (4, 6, True, dict(ring_degree=4), ParallelPlan(1, 1, 4)),
        (4, 6, True, dict(ring_degree=2), ParallelPlan(2, 1, 2)),
        (4, 6, False, dict(ring_degree=2), ParallelPlan(1, 2, 2)),
        (4, 6, True, dict(cfg_parallel=False), ParallelPlan(1, 2, 2)),
        (4, 6, False, dict(cfg_parallel=True), ParallelPlan(1, 2, 2)),
        (8, 12, True, dict(sp_degree=8), ParallelPlan(1, 4, 2)),
        (8, 12, True, dict(ulysses_degree=2, ring_degree=2), ParallelPlan(2, 2, 2)),
    ],
)
def test_choose_plan_forced(world, heads, use_cfg, forced, expected):
    assert choose_plan(world, heads, use_cfg, **forced) == expected


@pytest.mark.parametrize(
    "world, heads, forced",
    [
        (4, 6, dict(ulysses_degree=4)),
        (4, 6, dict(ring_degree=3)),
        (4, 6, dict(sp_degree=3)),
        (3, 6, dict(cfg_parallel=True)),
        (4, 6, dict(ulysses_degree=2, ring_degree=3)),
        (4, 4, dict(ring_degree=1, cfg_parallel=False, ulysses_degree=4, sp_degree=2)),
        (4, 6, dict(ring_degree=-1)),
    ],
)
def test_choose_plan_rejects_impossible(world, heads, forced):
    for use_cfg in (True, False):
        with pytest.raises(ValueError):
            choose_plan(world, heads, use_cfg, **forced)


@pytest.mark.parametrize("degrees", [(1, 1, 1), (2, 1, 1), (1, 4, 1), (1, 1, 3), (2, 2, 2),
                                     (1, 2, 3), (2, 3, 2), (2, 4, 1)])  # fmt: skip
def test_plan_group_layout(degrees):
    plan = ParallelPlan(*degrees)
    world, u, sp = plan.world_size, plan.ulysses_degree, plan.sp_degree
    kinds = {
        "ulysses": (plan.ulysses_groups(), u),
        "ring": (plan.ring_groups(), plan.ring_degree),
        "sp": (plan.sp_groups(), sp),
        "cfg": (plan.cfg_groups(), plan.cfg_degree),
    }
    for name, (groups, size) in kinds.items():
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)), f"{name} groups do not partition the ranks"
        assert all(len(g) == size for g in groups), name
    for g in plan.ulysses_groups():  # neighbouring sequence shards, starting at ring_rank*U
        assert g == list(range(g[0], g[0] + u))
        assert (g[0] % sp) % u == 0
    for g in plan.ring_groups():  # one member per Ulysses group, at stride U
        assert all(b - a == u for a, b in itertools.pairwise(g))
    for g in plan.sp_groups():
        assert g == list(range(g[0], g[0] + sp)) and g[0] % sp == 0
    for g in plan.cfg_groups():  # the same sequence shard in each CFG half
        assert all(b - a == sp for a, b in itertools.pairwise(g))
    for rank in range(world):
        c, r, uu = plan.coords(rank)
        assert plan.rank_of(c, r, uu) == rank
        # sp rank order == sequence order: ring chunk r, then Ulysses member uu within it
        assert rank % sp == r * u + uu


# --- building blocks (one process, no torch.distributed) -----------------------------------
@pytest.mark.parametrize("total, parts", [(30, 4), (30, 3), (25, 2), (2, 4), (1, 3), (8, 8)])
def test_sequence_shard_split(total, parts):
    shards = [SequenceShard.split(total, parts, i) for i in range(parts)]
    length = -(-total // parts)
    assert all(s.length == length and s.padded == length * parts for s in shards)
    assert [s.start for s in shards] == [i * length for i in range(parts)]
    assert sum(s.valid for s in shards) == total
    # the real tokens are covered once, in order; padding only after the last real token
    covered = [t for s in shards for t in range(s.start, s.start + s.valid)]
    assert covered == list(range(total))
    for s, nxt in itertools.pairwise(shards):
        assert 0 <= s.valid <= s.length
        if s.valid < s.length:
            assert nxt.valid == 0

    tokens = torch.arange(total, dtype=torch.float32).view(1, total, 1).expand(2, total, 3)
    pieces = [take_shard(tokens, s) for s in shards]
    assert all(p.shape == (2, length, 3) for p in pieces)
    joined = torch.cat(pieces, dim=1)
    torch.testing.assert_close(joined[:, :total], tokens, rtol=0, atol=0)
    assert (joined[:, total:] == 0).all()


def test_sequence_shard_examples():
    s = SequenceShard.split(30, 4, 3)
    assert (s.total, s.padded, s.start, s.length, s.valid) == (30, 32, 24, 8, 6)
    s = SequenceShard.split(2, 4, 2)
    assert (s.start, s.length, s.valid) == (2, 1, 0)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1)])
def test_patchify_unpatchify_round_trip_and_order(patch):
    torch.manual_seed(0)
    pt, ph, pw = patch
    b, c, f, h, w = 2, 5, 2 * pt, 3 * ph, 4 * pw
    latents = torch.randn(b, c, f, h, w)
    grid = TokenGrid(f // pt, h // ph, w // pw)
    tokens = patchify(latents, patch)
    assert tokens.shape == (b, grid.num_tokens, pt * ph * pw * c)
    assert torch.equal(unpatchify(tokens, grid, patch), latents)
    # token index is (f, h, w) raster order; features are ordered (pt, ph, pw, C)
    for fi, hi, wi in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        idx = (fi * grid.height + hi) * grid.width + wi
        block = latents[1, :, fi * pt : (fi + 1) * pt, hi * ph : (hi + 1) * ph,
                        wi * pw : (wi + 1) * pw]  # fmt: skip
        assert torch.equal(tokens[1, idx], block.permute(1, 2, 3, 0).reshape(-1))


def test_rotary_tables_of_a_shard_are_rows_of_the_full_table():
    rope = RotaryEmbedding3D(head_dim=12, max_positions=64)
    grid = TokenGrid(2, 3, 5)
    cos_full, sin_full = rope(grid, None, torch.device("cpu"))
    assert cos_full.shape == (1, 30, 1, 6)
    for parts in (2, 3, 4, 7):
        for i in range(parts):
            shard = SequenceShard.split(grid.num_tokens, parts, i)
            cos, sin = rope(grid, shard, torch.device("cpu"))
            assert cos.shape == (1, shard.length, 1, 6)
            sl = slice(shard.start, shard.start + shard.valid)
            assert torch.equal(cos[:, : shard.valid], cos_full[:, sl])
            assert torch.equal(sin[:, : shard.valid], sin_full[:, sl])


def _reference_attention(q, k, v):
    """float64 softmax attention and its log-sum-exp; inputs [B, L, H, D]."""
    q64, k64, v64 = (x.double().transpose(1, 2) for x in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5
    out = torch.softmax(scores, dim=-1) @ v64
    return out.transpose(1, 2), torch.logsumexp(scores, dim=-1)  # [B,L,H,D], [B,H,L]


def _qkv(b=2, lq=7, lk=11, h=3, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, h, d, generator=g) * scale for n in (lq, lk, lk))


def test_attention_with_lse_matches_float64_reference():
    q, k, v = _qkv(scale=2.0)  # peaky softmax
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = _reference_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
    out_err = (out.double() - ref_out).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    print(f"\nattention_with_lse fp32: out max err {out_err:.1e}, lse max err {lse_err:.1e}")
    assert out_err < 1e-5 and lse_err < 1e-5
    torch.testing.assert_close(out, attention(q, k, v), rtol=0, atol=2e-6)


def test_attention_with_lse_bf16_inputs():
    q, k, v = (x.bfloat16() for x in _qkv(seed=1, scale=2.0))
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = _reference_attention(q, k, v)  # exact math on the bf16 inputs
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    # bf16 output (8 significant bits; the kernel also rounds the probabilities to bf16)
    torch.testing.assert_close(out.double(), ref_out, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("bounds", [(0, 11), (0, 4, 5, 11), (0, 1, 2, 3, 11), (0, 6, 11)])
def test_lse_merge_of_key_chunks_equals_full_attention(bounds):
    q, k, v = _qkv(seed=2)
    full = attention(q, k, v)
    ref_out, ref_lse = _reference_attention(q, k, v)
    chunks = list(itertools.pairwise(bounds))
    for order in (chunks, chunks[::-1]):  # the merge must not depend on the ring order
        out = lse = None
        for a, b in order:
            part, part_lse = attention_with_lse(q, k[:, a:b], v[:, a:b])
            out, lse = _merge(out, lse, part, part_lse)
        errors = (
            (out - full).abs().max().item(),
            (out.double() - ref_out).abs().max().item(),
            (lse.double() - ref_lse).abs().max().item(),
        )
        full_err, ref_err, lse_err = errors
        print(f"\nmerge {order}: vs full {full_err:.1e}, fp64 {ref_err:.1e}, lse {lse_err:.1e}")
        assert out.dtype == torch.float32
        assert max(errors) <= 1e-6
