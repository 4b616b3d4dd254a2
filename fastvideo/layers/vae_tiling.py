"""Spatial tiling of a VAE's encode or decode, generic over a per-tile callable.

The video (or its latents) is cut into overlapping spatial tiles; each tile goes through the
model on its own (the model's temporal chunking and causal caches run inside the tile), and
the outputs are joined by blending every tile linearly into the one above and the one to its
left over their overlap, then keeping each tile's first ``stride`` rows and columns. Tile
positions, overlaps and the blend are those of diffusers' ``AutoencoderKLWan`` with
``enable_tiling()`` (``tiled_encode`` / ``tiled_decode`` / ``blend_v`` / ``blend_h``), sizes
named as there: ``tile_sample_min_*`` (a tile's extent in pixels) and
``tile_sample_stride_*`` (the distance between two tiles' starts, in pixels).

Blending is sequential and in place, as in the reference: a tile blends with its upper and
left neighbours *after* they were blended with theirs. :class:`TileAssembler` takes tiles in
row-major order and keeps only the previous row, so the output is built without holding
every tile at once.

:func:`run_tiles` runs the tiles on one rank, or splits them across the ranks of a group
(rank q computes tiles q, q + n, ...) and gathers them on the group's first rank, which
assembles exactly what one rank alone would have (same tiles, same blend, same order).

Shapes: B batch, C channels, T frames; tiles cut the last two dims (H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastvideo.distributed.runtime import GroupView

TileFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TileSizes:
    """Tile extent and stride in pixels (diffusers' defaults: 256 and 192)."""

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def check(self, multiple: int = 1) -> None:
        """Raise ValueError unless every size is a positive multiple of ``multiple`` and no
        stride exceeds its tile (which would leave gaps)."""
        names = {
            "tile_sample_min_height": self.min_height,
            "tile_sample_min_width": self.min_width,
            "tile_sample_stride_height": self.stride_height,
            "tile_sample_stride_width": self.stride_width,
        }
        for name, value in names.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value % multiple:
                raise ValueError(
                    f"{name}={value} must be a multiple of {multiple} (the VAE's pixels per "
                    f"latent, so tiles start on latent positions)"
                )
        for axis in ("height", "width"):
            stride, size = names[f"tile_sample_stride_{axis}"], names[f"tile_sample_min_{axis}"]
            if stride > size:
                raise ValueError(
                    f"tile_sample_stride_{axis}={stride} exceeds tile_sample_min_{axis}={size}: "
                    f"tiles would leave gaps"
                )


@dataclass(frozen=True)
class AxisTiles:
    """The tiles along one axis: where they are cut from the input and how their outputs
    join (output units may differ from input units: latents vs. pixels)."""

    starts: tuple[int, ...]  # input offset of each tile
    size: int  # input extent of a full tile (edge tiles are cut shorter by the input)
    keep: int  # output extent each tile contributes (the stride in output units)
    blend: int  # output extent over which a tile fades in from its predecessor
    total: int  # output extent after the final crop


@dataclass(frozen=True)
class TileGrid:
    rows: AxisTiles
    cols: AxisTiles

    def tiles(self) -> list[tuple[int, int]]:
        """(row, col) of every tile in row-major order (the order they are blended in)."""
        return [(i, j) for i in range(len(self.rows.starts)) for j in range(len(self.cols.starts))]

    def __len__(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def crop(self, x: torch.Tensor, index: tuple[int, int]) -> torch.Tensor:
        """The input of tile ``index``: x [..., H, W] -> [..., <= size, <= size] (a view)."""
        r0, c0 = self.rows.starts[index[0]], self.cols.starts[index[1]]
        return x[..., r0 : r0 + self.rows.size, c0 : c0 + self.cols.size]


def _axis(extent: int, size: int, stride: int, keep: int, blend: int, total: int) -> AxisTiles:
    return AxisTiles(tuple(range(0, extent, stride)), size, keep, blend, total)


def decode_grid(latent_hw: tuple[int, int], sizes: TileSizes, spatial: int, patch: int = 1):
    """Tiles of a decode: latents [..., h, w] -> pixels [..., h*s/p, w*s/p], ``s`` the VAE's
    pixels per latent, ``p`` a spatial patch its decoder output is still folded by (2 for
    Wan 2.2: tiles are blended before unpatchify, as diffusers does). None when the latents
    fit in one tile (diffusers then decodes without tiling)."""
    sizes.check(spatial)
    h, w = latent_hw
    lat_h, lat_w = sizes.min_height // spatial, sizes.min_width // spatial
    if h <= lat_h and w <= lat_w:
        return None
    sh, sw = sizes.stride_height, sizes.stride_width
    return TileGrid(
        _axis(h, lat_h, sh // spatial, sh // patch, (sizes.min_height - sh) // patch,
              h * spatial // patch),
        _axis(w, lat_w, sw // spatial, sw // patch, (sizes.min_width - sw) // patch,
              w * spatial // patch),
    )  # fmt: skip


def encode_grid(sample_hw: tuple[int, int], sizes: TileSizes, spatial: int, patch: int = 1):
    """Tiles of an encode: pixels folded by ``patch`` [..., H/p, W/p] -> latents
    [..., H/s, W/s]. As in diffusers, tiles are cut from the *folded* input with the pixel
    sizes unchanged (a Wan 2.2 tile covers twice the pixels), and whether to tile is decided
    on the unfolded size ``sample_hw``. None when it fits in one tile."""
    sizes.check(spatial)
    height, width = sample_hw
    if height <= sizes.min_height and width <= sizes.min_width:
        return None
    enc = spatial // patch  # folded input units per latent
    h, w = height // patch, width // patch
    sh, sw = sizes.stride_height, sizes.stride_width
    return TileGrid(
        _axis(h, sizes.min_height, sh, sh // enc, (sizes.min_height - sh) // enc, h // enc),
        _axis(w, sizes.min_width, sw, sw // enc, (sizes.min_width - sw) // enc, w // enc),
    )


def _ramp(extent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's weights ``1 - y/extent`` and ``y/extent`` (computed in double, then
    rounded to fp32 as a Python scalar would be inside the kernel)."""
    fade_in = torch.tensor([y / extent for y in range(extent)], dtype=torch.float64)
    return (1 - fade_in).float(), fade_in.float()


def blend_(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade ``tile``'s first rows (dim -2) or columns (dim -1) in from ``prev``'s last ones,
    in place: ``tile[y] = prev[-e + y] * (1 - y/e) + tile[y] * (y/e)``. Each product is
    rounded to the tile's dtype before the sum, so low precisions round as the reference's
    scalar multiplies do."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return tile
    fade_out, fade_in = _ramp(extent)
    shape = [1] * tile.ndim
    shape[dim] = extent
    fade_out = fade_out.to(tile.device).view(shape)
    fade_in = fade_in.to(tile.device).view(shape)
    head = tile.narrow(dim, 0, extent)
    tail = prev.narrow(dim, prev.shape[dim] - extent, extent)
    head.copy_((tail * fade_out).to(tile.dtype) + (head * fade_in).to(tile.dtype))
    return tile


class TileAssembler:
    """Blends tiles given in row-major order into the output, holding two rows of tiles."""

    def __init__(self, grid: TileGrid):
        self.grid = grid
        self.out: torch.Tensor | None = None
        self._above: list[torch.Tensor] = []
        self._row: list[torch.Tensor] = []
        self._count = 0

    def add(self, tile: torch.Tensor) -> None:
        """The next tile's output [B, C, T, h_i, w_j] (blended in place)."""
        cols = len(self.grid.cols.starts)
        i, j = divmod(self._count, cols)
        rows, cols_ax = self.grid.rows, self.grid.cols
        if i > 0:
            blend_(self._above[j], tile, rows.blend, dim=-2)
        if j > 0:
            blend_(self._row[j - 1], tile, cols_ax.blend, dim=-1)
        if self.out is None:
            self.out = tile.new_empty(*tile.shape[:-2], rows.total, cols_ax.total)
        r0, c0 = i * rows.keep, j * cols_ax.keep
        h = max(0, min(rows.keep, tile.shape[-2], rows.total - r0))
        w = max(0, min(cols_ax.keep, tile.shape[-1], cols_ax.total - c0))
        self.out[..., r0 : r0 + h, c0 : c0 + w] = tile[..., :h, :w]
        self._row.append(tile)
        self._count += 1
        if j == len(cols_ax.starts) - 1:
            self._above, self._row = self._row, []

    def result(self) -> torch.Tensor:
        if self.out is None or self._count != len(self.grid):
            raise RuntimeError(f"assembled {self._count} of {len(self.grid)} tiles")
        return self.out


def run_tiles(
    x: torch.Tensor, grid: TileGrid, fn: TileFn, group: GroupView | None = None
) -> torch.Tensor | None:
    """Apply ``fn`` to every tile of ``x`` and blend the outputs.

    With a ``group`` of several ranks (all calling this with the same ``x`` and grid), rank
    q computes tiles q, q + n, ... and the group's first rank assembles them; it returns the
    result there and None elsewhere. The result is bitwise the single-rank one.
    """
    order = grid.tiles()
    if group is None or group.size == 1:
        assembler = TileAssembler(grid)
        for index in order:
            assembler.add(fn(grid.crop(x, index)))
        return assembler.result()
    mine = [fn(grid.crop(x, index)) for index in order[group.rank :: group.size]]
    assembler = TileAssembler(grid) if group.rank == 0 else None
    for tile in gather_tiles(group, mine, len(order), x):
        assert assembler is not None
        assembler.add(tile)
    return assembler.result() if assembler is not None else None


def gather_tiles(
    group: GroupView, mine: list[torch.Tensor], count: int, like: torch.Tensor
) -> Iterator[torch.Tensor]:
    """The ``count`` tiles that rank q of ``group`` computed as ``mine`` (its tiles q,
    q + n, ...), yielded in order on the group's first rank (nothing elsewhere); one round
    of n tiles in flight at a time, each padded to the round's largest shape. ``mine`` is
    emptied as its tiles are sent. ``like``: device (and dtype when a rank has no tile)."""
    n, me = group.size, group.rank
    rounds = math.ceil(count / n)
    shapes = _exchange_shapes(group, mine, rounds, like.ndim, like.device)  # [n, rounds, ndim]
    dtype = mine[0].dtype if mine else like.dtype
    for r in range(rounds):
        present = [q for q in range(n) if r * n + q < count]
        biggest = shapes[present, r].amax(dim=0).tolist()
        padded = like.new_zeros(biggest, dtype=dtype)
        if r < len(mine):
            tile = mine[r]
            padded[tuple(slice(0, s) for s in tile.shape)] = tile
        parts = [torch.empty_like(padded) for _ in range(n)] if me == 0 else None
        dist.gather(padded, parts, dst=group.ranks[0], group=group.group)
        del padded
        if parts is not None:
            for q in present:
                yield parts[q][tuple(slice(0, s) for s in shapes[q, r].tolist())]
    mine.clear()


def _exchange_shapes(
    group: GroupView, tiles: list[torch.Tensor], rounds: int, ndim: int, device: torch.device
) -> torch.Tensor:
    """Every rank's tile shapes, round by round: int64 [n, rounds, ndim] (zeros: no tile)."""
    mine = torch.zeros(rounds, ndim, dtype=torch.int64, device=device)
    for r, tile in enumerate(tiles):
        mine[r] = torch.tensor(tile.shape, dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(group.size)]
    dist.all_gather(parts, mine, group=group.group)
    return torch.stack(parts).cpu()
