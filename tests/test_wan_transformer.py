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


def test_token_shards_reassemble_the_full_forward(tiny_a):
    """Running the DiT on padded token shards and concatenating equals the whole-video
    forward when attention sees all tokens (the single-rank path of sharded inputs)."""
    folder, _ = tiny_a
    model = _load(folder)
    x = torch.randn(1, 16, 2, 6, 10)  # 2 x 3 x 5 = 30 tokens
    grid = TokenGrid(2, 3, 5)
    tokens = patchify(x, (1, 2, 2))
    text = torch.randn(1, 7, 32)
    t = torch.tensor([500.0])
    with torch.no_grad():
        full = model.forward_tokens(tokens, t, text, grid)
        shard = SequenceShard.split(grid.num_tokens, 1, 0)
        same = model.forward_tokens(tokens, t, text, grid, shard)
    assert torch.equal(full, same)
    assert torch.equal(unpatchify(full, grid, (1, 2, 2)), model(x, t, text))
