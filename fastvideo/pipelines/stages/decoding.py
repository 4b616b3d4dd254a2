"""Gather the latent shards once, after the last step, and decode them into uint8 frames.

The decode runs on the output rank, whole or in spatial tiles (``vae_tiling``: always, never,
or when the estimated memory of a whole decode exceeds what is free). A tiled decode can be
split across the ranks of the replica (``vae_parallel_decode``): each decodes its share of
the tiles and the output rank blends them, which gives exactly the one-rank result.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fastvideo.layers.frames import to_levels
from fastvideo.layers.offload import GiB, free_memory_bytes, resident
from fastvideo.layers.sequence import unpatchify
from fastvideo.layers.vae_tiling import TileGrid, TileSizes, run_tiles
from fastvideo.logger import init_logger
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl

logger = init_logger(__name__)

# Of the free memory, the share auto-sized exact tiles are planned within (the estimates
# are rough: about 9% above the measured whole-decode peak on the H200 at 720p).
FIT_MARGIN = 0.8


class VideoDecoder(Protocol):
    """What the stage needs of a family's VAE."""

    dtype: torch.dtype

    def unnormalize_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] latents -> [B, 3, T, H', W'] video in [-1, 1]."""
        ...


class TiledVideoDecoder(VideoDecoder, Protocol):
    """A VAE that can decode spatial tiles (see ``fastvideo.layers.vae_tiling``)."""

    def decode_grid(self, z_shape: tuple[int, ...], sizes: TileSizes) -> TileGrid | None:
        """The tiles of decoding latents of this shape (None: it fits one tile)."""
        ...

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """A tile of latents -> its decoded output, in the space tiles are blended in."""
        ...

    def finish_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Blended tiles -> [B, 3, T, H', W'] video in [-1, 1]."""
        ...

    def decode_memory_bytes(self, z_shape: tuple[int, ...]) -> int:
        """Estimated peak bytes of an untiled decode."""
        ...


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] (rounded to nearest)."""
    return to_levels(video).permute(0, 2, 3, 4, 1).contiguous()


def can_tile(vae: object) -> bool:
    return all(hasattr(vae, n) for n in ("decode_grid", "decode_tile", "finish_decode"))


class DecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, vae: VideoDecoder | None, env: PipelineRuntime):
        self.vae = vae  # None on ranks that never lead a replica (without parallel decode)
        self.env = env
        memory = env.settings.memory
        self.parallel = memory.vae_parallel_decode and vae is not None and can_tile(vae)

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        assert batch.latents is not None and batch.grid is not None
        if batch.batch_size == 0:  # all items left during denoising (a collective decision)
            return batch
        runtime = self.env.runtime
        tokens = runtime.all_gather(runtime.groups.sp, batch.latents, dim=1)
        tokens = tokens[:, : batch.grid.num_tokens]
        output_rank = self.env.is_output_rank
        # Latent output and single-rank decodes need only the output rank from here on.
        latent_only = batch.first.output_type == "latent"
        parallel = self.parallel and runtime.groups.replica.size > 1 and not latent_only
        if not output_rank and not parallel:
            return batch
        latents = unpatchify(tokens, batch.grid, self.env.spec.patch_size)
        if output_rank:
            batch.output_latents = latents
        if latent_only:
            return batch
        assert self.vae is not None, "the output rank loads the VAE"
        with resident(self.vae):
            z = self.vae.unnormalize_latents(latents.to(self.vae.dtype))
            frames = self._decode(z, batch, parallel)
        if output_rank:
            assert frames is not None
            batch.frames = frames
        return batch

    def _decode(self, z: torch.Tensor, batch: ForwardBatch, parallel: bool) -> torch.Tensor | None:
        """The uint8 frames on the output rank (None on the others, which only decode tiles).
        Exact tiles are converted tile by tile (no float video of the whole frame is held)."""
        vae = self.vae
        assert vae is not None
        grid = self._tile_grid(z, parallel)
        if grid is None:
            return to_uint8_frames(vae.decode(z)) if self.env.is_output_rank else None
        group = self.env.runtime.groups.replica if parallel else None
        exact = isinstance(grid, tuple)  # exact tiles: the whole decode's video
        batch.stats["vae_tiles"] = float(grid[0] * grid[1] if exact else len(grid))
        batch.stats["vae_decode_ranks"] = float(group.size if group is not None else 1)
        if exact:
            return vae.decode_exact_tiles(z, *grid, group, levels=True)  # type: ignore[attr-defined]
        blended = run_tiles(z, grid, vae.decode_tile, group)  # type: ignore[union-attr]
        if blended is None:
            return None
        return to_uint8_frames(vae.finish_decode(blended))  # type: ignore[union-attr]

    def _tile_grid(self, z: torch.Tensor, parallel: bool) -> TileGrid | tuple[int, int] | None:
        """The blended tiles to decode in, an exact-tile grid ``(rows, cols)``, or None for
        a whole decode. Every rank of a parallel decode takes the same decision.

        ``vae_tiling='auto'`` with the tile fields at their defaults decodes in exact tiles
        (the whole decode's video): under parallel decode always, a multiple of the ranks
        of them within the least free memory of any rank; on one rank only when the whole
        decode does not fit, as large as the free memory allows."""
        memory = self.env.settings.memory
        vae = self.vae
        if memory.vae_tiling is False or not can_tile(vae):
            return None
        exact = (memory.vae_tiling == "auto" and memory.tile_sizes == TileSizes()
                 and hasattr(vae, "fit_exact_tiles"))  # fmt: skip
        free = free_memory_bytes(z.device)
        if exact and parallel:
            replica = self.env.runtime.groups.replica
            least = torch.tensor([-float(free)], device=self.env.device)
            free = int(-self.env.runtime.all_reduce_max_(replica, least).item())
            grid = vae.fit_exact_tiles(  # type: ignore[union-attr]
                tuple(z.shape), int(free * FIT_MARGIN), multiple_of=replica.size, levels=True
            )
            if grid is not None:
                return grid
        grid = vae.decode_grid(tuple(z.shape), memory.tile_sizes)  # type: ignore[union-attr]
        if grid is None or memory.vae_tiling is True:
            return grid
        need = vae.decode_memory_bytes(tuple(z.shape))  # type: ignore[union-attr]
        short = torch.tensor([float(need > free)])
        if parallel:
            replica = self.env.runtime.groups.replica
            flag = short.to(self.env.device)
            short = self.env.runtime.all_reduce_max_(replica, flag).cpu()
        if not short.item():
            return None
        if exact and not parallel:
            fitted = vae.fit_exact_tiles(tuple(z.shape), int(free * FIT_MARGIN), levels=True)
            if fitted is not None:
                logger.info(
                    "decode of latents %s needs ~%.2f GiB, %.2f GiB free: decoding in %dx%d "
                    "exact tiles", tuple(z.shape), need / GiB, free / GiB, *fitted,
                )  # fmt: skip
                return fitted
        sizes = memory.tile_sizes
        logger.info(
            "decode of latents %s needs ~%.2f GiB, %.2f GiB free: decoding in %d tiles "
            "of %dx%d pixels",
            tuple(z.shape), need / GiB, free / GiB, len(grid), sizes.min_height, sizes.min_width,
        )  # fmt: skip
        return grid
