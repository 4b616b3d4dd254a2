"""Draw the initial noise for the whole video from each item's seed, exactly as diffusers
draws it (fp32 on a CPU generator), then keep this rank's token shard.

Every rank draws the same full noise, so the result never depends on the rank count.
"""

from __future__ import annotations

import torch

from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, take_shard
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard normal noise, item b drawn from ``seeds[b]``."""
    draws = [
        torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds
    ]
    return torch.cat(draws)


class LatentPreparationStage(PipelineStage):
    name = "latent_preparation"

    def __init__(self, env: PipelineRuntime, latent_channels: int):
        self.env = env
        self.latent_channels = latent_channels

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        spec, first = self.env.spec, batch.first
        frames = spec.latent_frames(first.num_frames)
        h, w = first.height // spec.vae_scale_spatial, first.width // spec.vae_scale_spatial
        seeds = [item.seed for item in batch.items]
        noise = initial_noise(seeds, (self.latent_channels, frames, h, w))
        pt, ph, pw = spec.patch_size
        batch.grid = TokenGrid(frames // pt, h // ph, w // pw)
        sp = self.env.runtime.groups.sp
        batch.shard = SequenceShard.split(batch.grid.num_tokens, sp.size, sp.rank)
        tokens = patchify(noise, spec.patch_size)
        batch.latents = take_shard(tokens, batch.shard).to(self.env.device)
        return batch
