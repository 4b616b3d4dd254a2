"""Attention kernel table at one shape (default: Wan2.1-1.3B at 480x832x81, i.e. 32,760
tokens, 12 heads of 128, bf16): every backend of ``fastvideo.kernels_bridge.attention``
that can run here (the others listed with the reason), its time, TFLOP/s and relative
error vs an fp32 reference; then sliding-tile attention (FlexAttention, compiled on CUDA)
per tile / block size / window, with the fraction of blocks it computes and its error vs
the fp32 reference under the same token mask.

TFLOP/s counts 4*N^2*D per head for dense backends and the computed (kept-block) FLOPs
for STA. The JSON is rewritten after every row, so a run cut short keeps what it measured.

    python -m benchmarks.attention_kernels --out /tmp/kernels.json
    python -m benchmarks.attention_kernels --device cpu --grid 3x8x8 --heads 2 --head-dim 32 \
        --sta "1x8x8/64x64/3x1x1,1x1x1" --reps 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import args_record, default_device, environment, rel_err, write_result

# sdpa_math materialises the N x N scores per head: beyond this many tokens it is skipped.
MATH_MAX_TOKENS = 8192


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3 / reps


def fp32_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 attention of [B, H, L, D] inputs (memory-efficient kernel on CUDA: no N x N
    score matrix; the default kernel on CPU)."""
    q, k, v = q.float(), k.float(), v.float()
    if q.is_cuda:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def runnable_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """Every registered dense backend -> None if it runs on (device, dtype), else why not."""
    from fastvideo.kernels_bridge import attention as bridge

    out: dict[str, str | None] = {}
    for name in bridge.available_backends():
        backend = bridge._BACKENDS[name]
        if backend.video_only:
            continue  # STA: its own rows
        why = backend.why_unavailable(device, dtype)
        out[name] = why if why is not None else bridge._probe(name, device, dtype)
    return out


def dense_rows(args: argparse.Namespace, qkv: tuple[torch.Tensor, ...], ref: torch.Tensor):
    """One row per dense backend (yields as each is measured)."""
    from fastvideo.kernels_bridge import attention as bridge

    q, k, v = qkv
    _, h, n, d = q.shape
    r = args.ref_heads
    flops = 4 * n * n * d * h
    for name, why in runnable_backends(q.device, q.dtype).items():
        if why is None and name == "sdpa_math" and n > MATH_MAX_TOKENS:
            why = f"skipped: materialises {n}x{n} scores per head (> {MATH_MAX_TOKENS} tokens)"
        if why is not None:
            yield {"backend": name, "error": why}
            continue
        fwd = bridge._BACKENDS[name].forward
        ms = _time(lambda f=fwd: f(q, k, v), q.device, args.warmup, args.reps)
        out = fwd(q, k, v)
        yield {"backend": name, "kind": "dense", "ms": ms, "tflops": flops / ms / 1e9,
               "rel_err_vs_fp32": rel_err(out[:, :r].float(), ref)}  # fmt: skip


def sta_variants(spec: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...], str]]:
    """'TILE/QBLOCKxKBLOCK/WINDOW,WINDOW;...' -> (tile text, tile, block, window text)."""
    variants = []
    for part in filter(None, spec.split(";")):
        tile_s, block_s, windows_s = part.split("/")
        tile = tuple(int(x) for x in tile_s.split("x"))
        block = tuple(int(x) for x in block_s.split("x"))
        variants += [(tile_s, tile, block, w) for w in windows_s.split(",")]
    return variants


def sta_rows(args: argparse.Namespace, qkv: tuple[torch.Tensor, ...], grid, ref: torch.Tensor):
    """One row per STA variant (yields as each is measured)."""
    from fastvideo.kernels_bridge import sta as sta_module
    from fastvideo.kernels_bridge.sta import STAConfig, dense_token_mask, sta_attention, sta_layout

    q, k, v = qkv
    _, h, _, d = q.shape
    r = args.ref_heads
    for tile_s, tile, block, w in sta_variants(args.sta):
        # A fresh compile per variant: many block-size variants in one process would hit
        # dynamo's recompile limit and fall back to eager (dense math) FlexAttention.
        torch._dynamo.reset()
        sta_module._compiled_flex = None
        window = tuple(int(x) for x in w.split("x"))
        cfg = STAConfig(tile=tile, default_window=window, block=block)  # type: ignore[arg-type]
        layout = sta_layout(grid, tile, cfg.window_for(grid), q.device, block)  # type: ignore[arg-type]
        fn = lambda c=cfg: sta_attention(q, k, v, grid, c)  # noqa: E731
        start = time.perf_counter()
        out = fn()  # compiles on CUDA
        first_s = time.perf_counter() - start
        ms = _time(fn, q.device, args.warmup, args.reps)
        mask = dense_token_mask(layout)  # [N, N] bool, raster order
        ref_masked = fp32_reference(q[:, :r], k[:, :r], v[:, :r], mask)
        del mask
        padded, kept = layout.order.numel(), layout.kept_fraction
        yield {
            "backend": f"sta {tile_s} blk {block[0]}x{block[1]} win {w}", "kind": "sta",
            "ms": ms, "first_call_s": first_s, "kept_blocks": kept,
            "tflops": 4 * padded * padded * d * h * kept / ms / 1e9,
            "rel_err_vs_fp32_masked": rel_err(out[:, :r].float(), ref_masked),
            "rel_err_vs_fp32_dense": rel_err(out[:, :r].float(), ref),
            "window": list(layout.window), "block": list(layout.block), "padded_tokens": padded,
        }  # fmt: skip


def best_dense(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    dense = [r for r in rows if r.get("kind") == "dense"]
    return max(dense, key=lambda r: r["tflops"]) if dense else None


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"  {row['backend']:<34} unavailable: {row['error']}", flush=True)
        return
    extra = f"  kept {row['kept_blocks']:.3f}" if "kept_blocks" in row else ""
    err = row.get("rel_err_vs_fp32", row.get("rel_err_vs_fp32_masked"))
    print(f"  {row['backend']:<34} {row['ms']:8.2f} ms {row['tflops']:7.1f} TFLOP/s"
          f"  rel.err {err:.2e}{extra}", flush=True)  # fmt: skip


@torch.no_grad()
def main() -> None:
    from fastvideo.layers.sequence import TokenGrid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--grid", default="21x30x52", help="token grid FxHxW")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--sta",
        default="3x8x8/64x64/7x4x7,7x3x5,5x2x5",
        help="';'-separated STA variants TILE/QBLOCKxKBLOCK/WINDOW,WINDOW,... (windows in "
        "tiles); '' for none",
    )
    p.add_argument("--ref-heads", type=int, default=1, help="heads checked against fp32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = default_device(args.device)
    grid = TokenGrid(*(int(x) for x in args.grid.split("x")))
    n, h, d = grid.num_tokens, args.heads, args.head_dim
    torch.manual_seed(0)
    qkv = tuple(torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    r = args.ref_heads
    ref = fp32_reference(*(x[:, :r] for x in qkv))
    res: dict[str, Any] = {"benchmark": "attention_kernels", **environment(),
                           "args": args_record(args), "tokens": n, "heads": h, "head_dim": d,
                           "dtype": "bf16", "grid": list(grid), "rows": []}  # fmt: skip
    print(f"attention at {n} tokens ({args.grid}), {h} heads x {d}, bf16, on {device}")
    for row in dense_rows(args, qkv, ref):
        _print_row(row)
        res["rows"].append(row)
        res["best_dense"] = best_dense(res["rows"])
        write_result(args.out, res)
    for row in sta_rows(args, qkv, grid, ref):
        _print_row(row)
        res["rows"].append(row)
        write_result(args.out, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = res.get("best_dense")
    if best:
        print(f"fastest dense: {best['backend']} at {best['tflops']:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
