"""Sliding-tile attention (STA) on torch FlexAttention.

The video's tokens (raster order over the ``F x H x W`` token grid) are reordered into 3-D
tiles of ``tile = (tt, th, tw)`` tokens, the grid padded up to whole tiles. A query tile
attends to the key tiles inside a ``window = (wt, wh, ww)`` (counted in tiles) centred on
it; near the grid's edges the window is shifted inwards so every query sees the same
number of tiles. With a tile volume that is a multiple of the kernel's block size, every
FlexAttention block lies inside one tile, so the block mask skips whole blocks: the kept
fraction of blocks is about ``wt/T * wh/H * ww/W`` for a grid of ``T x H x W`` tiles.

A window covering the whole tile grid is dense attention (padding never attended).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from fastvideo.kernels_bridge.grid import TokenGrid
from fastvideo.logger import init_logger

logger = init_logger(__name__)

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class STAConfig:
    """Tile size in tokens and window size in tiles, per token grid.

    Args:
        tile: (tt, th, tw) tokens per tile.
        windows: token grid (F, H, W) -> window (wt, wh, ww) in tiles.
        default_window: used for grids not in ``windows``; ``None`` keeps the whole grid
            in time and about 60% of the tiles in height and width.
        block: FlexAttention (query, key) block sizes; ``None``: see ``block_sizes``.
    """

    tile: Triple = (3, 8, 8)
    windows: tuple[tuple[Triple, Triple], ...] = ()
    default_window: Triple | None = None
    block: tuple[int, int] | None = None

    def window_for(self, grid: TokenGrid) -> Triple:
        tiles = tile_grid(grid, self.tile)
        for g, w in self.windows:
            if tuple(g) == (grid.frames, grid.height, grid.width):
                return _clamp_window(w, tiles)
        if self.default_window is not None:
            return _clamp_window(self.default_window, tiles)
        return (tiles[0], max(1, math.ceil(0.6 * tiles[1])), max(1, math.ceil(0.6 * tiles[2])))


def tile_grid(grid: TokenGrid, tile: Triple) -> Triple:
    """Tiles per dimension (the grid padded up to whole tiles)."""
    return (
        -(-grid.frames // tile[0]),
        -(-grid.height // tile[1]),
        -(-grid.width // tile[2]),
    )


def _clamp_window(window: Triple, tiles: Triple) -> Triple:
    return tuple(max(1, min(int(w), t)) for w, t in zip(window, tiles, strict=True))  # type: ignore[return-value]


def window_start(q: torch.Tensor, window: int, tiles: int) -> torch.Tensor:
    """First tile of the window of query tile ``q`` (centred, shifted inside the grid)."""
    return (q - (window - 1) // 2).clamp(min=0).clamp(max=tiles - window)


def block_sizes(tile: Triple, override: tuple[int, int] | None = None) -> tuple[int, int]:
    """(query, key) block sizes of the block mask: blocks never straddle two tiles when
    they divide the tile volume (128 when it does, else 64; 128 when neither does)."""
    if override is not None:
        return (int(override[0]), int(override[1]))
    volume = math.prod(tile)
    size = next((b for b in (128, 64) if volume % b == 0), 128)
    return (size, size)


@dataclass
class STALayout:
    """Everything one (grid, tile, window, device) needs, built once and cached."""

    grid: TokenGrid
    tile: Triple
    window: Triple
    order: torch.Tensor  # [Np] raster index of each tile-ordered slot (N for padding)
    inverse: torch.Tensor  # [N] slot of each raster token
    block_mask: object  # flex BlockMask over the Np slots
    block: tuple[int, int]  # (query, key) block sizes

    @property
    def kept_fraction(self) -> float:
        """Fraction of (query block, key block) pairs the kernel computes."""
        dense = self.block_mask.to_dense()  # type: ignore[attr-defined]
        return float(dense.float().mean())


def _tile_order(grid: TokenGrid, tile: Triple, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(order, inverse, valid): tile-major slots; inside a tile its real tokens first (in
    raster order), then its padding, so padding touches as few blocks as possible."""
    tt, th, tw = tile
    nt, nh, nw = tile_grid(grid, tile)
    f = torch.arange(nt * tt, device=device)
    h = torch.arange(nh * th, device=device)
    w = torch.arange(nw * tw, device=device)
    ff, hh, ww = torch.meshgrid(f, h, w, indexing="ij")  # padded grid coordinates
    valid = (ff < grid.frames) & (hh < grid.height) & (ww < grid.width)
    raster = (ff * grid.height + hh) * grid.width + ww

    # [nt, tt, nh, th, nw, tw] -> [nt, nh, nw, tt, th, tw]: tiles first, tokens inside.
    def to_slots(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(nt, tt, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1)

    volume = tt * th * tw
    valid_slots = to_slots(valid).view(-1, volume)
    real_first = torch.sort((~valid_slots).to(torch.int8), dim=1, stable=True).indices
    valid_slots = valid_slots.gather(1, real_first).reshape(-1)
    raster_slots = to_slots(raster).view(-1, volume).gather(1, real_first).reshape(-1)
    n = grid.num_tokens
    order = torch.where(
        valid_slots, raster_slots, torch.full_like(valid_slots, n, dtype=torch.long)
    )
    inverse = torch.empty(n, dtype=torch.long, device=device)
    slots = torch.nonzero(valid_slots).squeeze(1)
    inverse[order[slots]] = slots
    return order, inverse, valid_slots


@functools.lru_cache(maxsize=16)
def sta_layout(
    grid: TokenGrid,
    tile: Triple,
    window: Triple,
    device: torch.device,
    block: tuple[int, int] | None = None,
) -> STALayout:
    from torch.nn.attention.flex_attention import create_block_mask

    order, inverse, valid = _tile_order(grid, tile, device)
    tiles = tile_grid(grid, tile)
    volume = math.prod(tile)
    nt, nh, nw = tiles

    def coords(slot: torch.Tensor) -> Triple:
        t = slot // volume
        return t // (nh * nw), (t // nw) % nh, t % nw  # type: ignore[return-value]

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = coords(q_idx), coords(kv_idx)
        keep = valid[kv_idx]  # padding queries' rows are computed but never read
        for qd, kd, win, n in zip(qc, kc, window, tiles, strict=True):
            start = window_start(qd, win, n)
            keep = keep & (kd >= start) & (kd < start + win)
        return keep

    size = order.numel()
    blocks = block_sizes(tile, block)
    # Uncompiled, create_block_mask evaluates mask_mod on every (query, key) pair at once:
    # int64 intermediates of size^2 (120 GiB at HunyuanVideo's 720p grid). Compiled, the
    # evaluation fuses into the per-block reduction (on CUDA; CPU grids are test-sized).
    mask = create_block_mask(mask_mod, None, None, size, size, device=device, BLOCK_SIZE=blocks,
                             _compile=device.type == "cuda")  # fmt: skip
    layout = STALayout(grid, tile, window, order, inverse, mask, blocks)
    logger.info(
        "STA: grid %s, tile %s, window %s tiles of %s: %d slots (%d tokens)",
        (grid.frames, grid.height, grid.width),
        tile,
        window,
        tiles,
        size,
        grid.num_tokens,
    )
    return layout


def dense_token_mask(layout: STALayout) -> torch.Tensor:
    """The layout's block mask expanded to a raster-order [N, N] token mask (tests and the
    kernel table's fp32 reference)."""
    from torch.nn.attention.flex_attention import create_mask

    size = layout.order.numel()
    slot_mask = create_mask(
        layout.block_mask.mask_mod, None, None, size, size, device=layout.order.device
    )  # type: ignore[attr-defined]
    slot_mask = slot_mask[0, 0]
    inv = layout.inverse
    return slot_mask[inv][:, inv]


_compiled_flex = None


def _flex(q, k, v, block_mask, block: tuple[int, int], return_lse: bool = False):
    """FlexAttention's output, or (output, natural log-sum-exp) with ``return_lse``."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    aux = {"return_aux": AuxRequest(lse=True)} if return_lse else {}
    if q.device.type != "cuda":
        # Eager FlexAttention (materialises the scores): for CPU runs and tests only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without")
            res = flex_attention(q, k, v, block_mask=block_mask, **aux)
        return (res[0], res[1].lse) if return_lse else res
    if _compiled_flex is None:
        # One compiled kernel per (shape, block size): room for many resolutions before
        # dynamo would give up and run FlexAttention eagerly (dense, out of memory).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    # The default Hopper bf16 kernel tiles 128 queries x 64 keys; smaller mask blocks need
    # a matching kernel tile.
    options = None
    if block[0] % 128 or block[1] % 64:
        options = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    res = _compiled_flex(q, k, v, block_mask=block_mask, kernel_options=options, **aux)
    return (res[0], res[1].lse) if return_lse else res


def sta_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, config: STAConfig
) -> torch.Tensor:
    """Sliding-tile self-attention over one video's whole token sequence.

    Args:
        q: [B, H, Lq, D] with Lq >= N = grid.num_tokens (rows past N are sequence-parallel
            padding: their output is zero); k, v: [B, H, N, D].
    Returns:
        [B, H, Lq, D].
    """
    return _sta(q, k, v, grid, config, return_lse=False)[0]


def sta_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, config: STAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sta_attention` and the natural log-sum-exp of each query's kept scores
    [B, H, Lq] (fp32; -inf on padding rows), so that other keys (e.g. the text of joint
    attention) can be merged in exactly."""
    out, lse = _sta(q, k, v, grid, config, return_lse=True)
    assert lse is not None
    return out, lse


def _sta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    config: STAConfig,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = grid.num_tokens
    if k.shape[2] != n:
        raise ValueError(f"STA needs all {n} keys of the grid locally, got {k.shape[2]}")
    window = config.window_for(grid)
    layout = sta_layout(grid, tuple(config.tile), window, q.device, config.block)  # type: ignore[arg-type]

    def to_slots(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :n], x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], dim=2)
        return x.index_select(2, layout.order)

    res = _flex(to_slots(q), to_slots(k), to_slots(v), layout.block_mask, layout.block, return_lse)
    out, lse = res if return_lse else (res, None)
    out = out.index_select(2, layout.inverse)
    if lse is not None:
        lse = lse.float().index_select(2, layout.inverse)
    pad = q.shape[2] - n
    if pad > 0:
        out = torch.cat([out, out.new_zeros(*out.shape[:2], pad, out.shape[3])], dim=2)
        if lse is not None:
            lse = torch.cat([lse, lse.new_full((*lse.shape[:2], pad), float("-inf"))], dim=2)
    return out, lse
