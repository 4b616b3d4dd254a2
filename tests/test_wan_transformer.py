"""Our Wan DiT against diffusers' WanTransformer3DModel (the oracle), loaded from the same
diffusers-saved checkpoint through our real loader.

Tolerance (fp32): relative error ||ours - ref|| / ||ref|| < 1e-5. Measured: see -s output
(the implementations run the same operations, so 0 is typical).
"""

from __future__ import annotations

import pytest
import torch

from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, unpatchify
from fastvideo.models.wan.components import load_transformer
from fastvideo.models.wan.registration import read_wan_spec
from fastvideo.pipelines.base import PipelineRuntime

REL_TOL = 1e-5


def _load(folder):
    cpu = torch.device("cpu")
    env = PipelineRuntime(
        ParallelRuntime(0, 1, cpu), cpu, read_wan_spec(folder), {"transformer": torch.float32}
    )
    return load_transformer(folder / "transformer", env)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("fixture", ["tiny_a", "tiny_b"])
@pytest.mark.parametrize(
    "shape", [(1, 16, 4, 6, 10), (2, 16, 1, 8, 8)], ids=["13-frames-non-square", "image-batch2"]
)
def test_dit_matches_diffusers(request, fixture, shape):
    folder, pipe = request.getfixturevalue(fixture)
    ours = _load(folder)  # fused q/k/v projection, as the engine runs it
    torch.manual_seed(0)
    x = torch.randn(shape)
    t = torch.tensor([937.0, 251.0][: shape[0]])
    text = torch.randn(shape[0], 11, pipe.transformer.config.text_dim)
    with torch.no_grad():
        ref = pipe.transformer(x, t, text, return_dict=False)[0]
        out = ours(x, t, text)
    err = _rel(out, ref)
    print(f"\n{fixture} {shape}: DiT relative error {err:.2e}")
    assert out.shape == ref.shape
    assert err < REL_TOL


def test_padded_shard_equals_the_full_forward(tiny_a):
    """A shard padded past the real tokens (as sequence parallelism pads) gives the real
    tokens exactly the whole-video forward: padding keys are never attended to."""
    folder, _ = tiny_a
    model = _load(folder)
    x = torch.randn(1, 16, 2, 6, 10)  # 2 x 3 x 5 = 30 tokens
    grid = TokenGrid(2, 3, 5)
    tokens = patchify(x, (1, 2, 2))
    text = torch.randn(1, 7, 32)
    t = torch.tensor([500.0])
    padded = SequenceShard(total=30, padded=36, start=0, length=36)
    garbage = torch.randn(1, 6, tokens.shape[2]) * 100  # what padding holds must not matter
    with torch.no_grad():
        full = model.forward_tokens(tokens, t, text, grid)
        out = model.forward_tokens(torch.cat([tokens, garbage], dim=1), t, text, grid, padded)
        attended = padded_without_cut(model, tokens, garbage, t, text, grid)
    torch.testing.assert_close(out[:, :30], full, rtol=1e-5, atol=1e-6)
    assert (attended - full).abs().max() > 1e-3, "the check would not see attended padding"
    assert torch.equal(unpatchify(full, grid, (1, 2, 2)), model(x, t, text))


def padded_without_cut(model, tokens, garbage, t, text, grid):
    """The same forward, but with the padding counted as real tokens (what a bug in the
    key cut would compute)."""
    shard = SequenceShard(total=36, padded=36, start=0, length=36)  # nothing is cut
    out = model.forward_tokens(torch.cat([tokens, garbage], dim=1), t, text, grid, shard)
    return out[:, :30]
