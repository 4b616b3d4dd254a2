"""Attention kernel table at one shape (default: Wan2.1-1.3B at 480x832x81, i.e. 32,760
tokens, 12 heads of 128): every registered backend's time, TFLOP/s and relative error vs
an fp32 reference, plus sliding-tile attention (FlexAttention) at several windows.

TFLOP/s counts the dense FLOPs (4*N^2*D per head) for dense backends and the computed
(kept-block) FLOPs for STA; "kept" is the fraction of (query, key) blocks STA computes.

    python -m benchmarks.attention_kernels --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import environment, rel_err, write_result


def _time(fn, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.no_grad()
def main() -> None:
    from fastvideo.kernels_bridge import attention as bridge
    from fastvideo.kernels_bridge.sta import STAConfig, dense_token_mask, sta_attention, sta_layout
    from fastvideo.layers.sequence import TokenGrid

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--grid", default="21x30x52", help="token grid FxHxW")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--sta",
        default="3x8x8/64x64/7x4x7,7x3x5,5x2x5",
        help="';'-separated STA variants TILE/QBLOCKxKBLOCK/WINDOW,WINDOW,... (windows in tiles)",
    )
    p.add_argument("--ref-heads", type=int, default=1, help="heads checked against fp32")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    grid = TokenGrid(*(int(x) for x in args.grid.split("x")))
    n, h, d = grid.num_tokens, args.heads, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    r = args.ref_heads
    qr, kr, vr = (x[:, :r].float() for x in (q, k, v))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
        ref = F.scaled_dot_product_attention(qr, kr, vr)  # fp32 reference
    dense_flops = 4 * n * n * d * h
    rows = []
    dev = torch.device("cuda")
    for name in bridge.available_backends():
        if name in ("sta", "sdpa_math"):
            continue  # STA below; math would materialise 32k x 32k scores per head
        why = bridge._BACKENDS[name].why_unavailable(dev, torch.bfloat16)
        if why is None:
            why = bridge._probe(name, dev, torch.bfloat16)
        if why is not None:
            rows.append({"backend": name, "error": why})
            continue
        fwd = bridge._BACKENDS[name].forward
        ms = _time(lambda f=fwd: f(q, k, v))
        out = fwd(q, k, v)
        rows.append({"backend": name, "ms": ms, "tflops": dense_flops / ms / 1e9,
                     "rel_err_vs_fp32": rel_err(out[:, :r].float(), ref)})  # fmt: skip
    variants = []
    for spec in args.sta.split(";"):
        tile_s, block_s, windows_s = spec.split("/")
        tile = tuple(int(x) for x in tile_s.split("x"))
        block = tuple(int(x) for x in block_s.split("x"))
        variants += [(tile_s, tile, block, w) for w in windows_s.split(",")]
    from fastvideo.kernels_bridge import sta as sta_module

    for tile_s, tile, block, w in variants:
        # A fresh compile per variant: many block-size variants in one process would hit
        # dynamo's recompile limit and fall back to eager (dense math) FlexAttention.
        torch._dynamo.reset()
        sta_module._compiled_flex = None
        window = tuple(int(x) for x in w.split("x"))
        cfg = STAConfig(tile=tile, default_window=window, block=block)
        layout = sta_layout(grid, tile, cfg.window_for(grid), dev, block)
        kept = layout.kept_fraction
        fn = lambda c=cfg: sta_attention(q, k, v, grid, c)  # noqa: E731
        ms = _time(fn)
        out = fn()
        # fp32 reference with the same token mask (a dense [N, N] boolean, r heads).
        mask = dense_token_mask(layout)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
            ref_sparse = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
        del mask
        padded = layout.order.numel()
        rows.append({
            "backend": f"sta {tile_s} blk {block[0]}x{block[1]} win {w}", "ms": ms,
            "kept_blocks": kept,
            "tflops": 4 * padded * padded * d * h * kept / ms / 1e9,
            "rel_err_vs_fp32_masked": rel_err(out[:, :r].float(), ref_sparse),
            "rel_err_vs_fp32_dense": rel_err(out[:, :r].float(), ref),
            "block": list(layout.block), "padded_tokens": padded,
        })  # fmt: skip
        torch.cuda.empty_cache()
    print(f"attention at {n} tokens, {h} heads x {d}, bf16")
    for row in rows:
        if "error" in row:
            print(f"  {row['backend']:<32} unavailable: {row['error']}")
        else:
            extra = f"  kept {row['kept_blocks']:.3f}" if "kept_blocks" in row else ""
            err = row.get("rel_err_vs_fp32", row.get("rel_err_vs_fp32_masked"))
            print(f"  {row['backend']:<32} {row['ms']:7.2f} ms {row['tflops']:6.0f} TFLOP/s"
                  f"  rel.err {err:.2e}{extra}")  # fmt: skip
    if args.out:
        write_result(args.out, {"benchmark": "attention_kernels", **environment(),
                                "tokens": n, "heads": h, "head_dim": d, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
