"""Gather the latent shards once, after the last step, and decode them on the output rank
into uint8 frames."""

from __future__ import annotations

from typing import Protocol

import torch

from fastvideo.layers.sequence import unpatchify
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl


class VideoDecoder(Protocol):
    """What the stage needs of a family's VAE."""

    dtype: torch.dtype

    def unnormalize_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] latents -> [B, 3, T, H', W'] video in [-1, 1]."""
        ...


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] (rounded to nearest)."""
    x = (video.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


class DecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, vae: VideoDecoder | None, env: PipelineRuntime):
        self.vae = vae  # None on ranks that never lead a replica
        self.env = env

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        assert batch.latents is not None and batch.grid is not None
        if batch.batch_size == 0:  # all items left during denoising (a collective decision)
            return batch
        runtime = self.env.runtime
        tokens = runtime.all_gather(runtime.groups.sp, batch.latents, dim=1)
        tokens = tokens[:, : batch.grid.num_tokens]
        if not self.env.is_output_rank:
            return batch
        latents = unpatchify(tokens, batch.grid, self.env.spec.patch_size)
        batch.output_latents = latents
        if batch.first.output_type == "latent":
            return batch
        assert self.vae is not None, "the output rank loads the VAE"
        z = self.vae.unnormalize_latents(latents.to(self.vae.dtype))
        batch.frames = to_uint8_frames(self.vae.decode(z))
        return batch
