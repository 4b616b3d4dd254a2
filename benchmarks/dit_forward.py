"""One DiT forward, ours vs diffusers' WanTransformer3DModel, same weights, same inputs,
same process and GPU (bf16, eager). Prints ms per forward, peak memory and the outputs'
relative difference; optionally an attention-kernel table at the same shape.

    python -m benchmarks.dit_forward --model /tmp/wan13b --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import environment, measure_cuda, rel_err, write_result


def load_ours(folder: Path):
    from fastvideo.distributed.runtime import ParallelRuntime
    from fastvideo.models.wan.components import load_transformer
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.pipelines.base import PipelineRuntime

    dev = torch.device("cuda")
    env = PipelineRuntime(
        ParallelRuntime(0, 1, dev), dev, read_wan_spec(folder), {"transformer": torch.bfloat16}
    )
    return load_transformer(folder / "transformer", env)


def attention_table(tokens: int, heads: int, dim: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    ref = F.scaled_dot_product_attention(q[:, :2].float(), k[:, :2].float(), v[:, :2].float())
    flops = 4 * tokens * tokens * dim * heads
    rows = []
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                ms, _ = measure_cuda(lambda: F.scaled_dot_product_attention(q, k, v), 2, 10)
                out = F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as e:
            rows.append({"backend": name, "error": str(e).splitlines()[0]})
            continue
        rows.append(
            {
                "backend": name,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "rel_err_vs_fp32": rel_err(out[:, :2].float(), ref),
            }
        )
    return rows


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--attention-table", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    lat = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    x = torch.randn(1, *lat, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([999], device="cuda")
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    result: dict = {"latent_shape": list(lat), "tokens": lat[1] * lat[2] * lat[3] // 4}

    ours = load_ours(args.model)
    out_ours = ours(x, t, text)
    fwd_ours = lambda m=ours: m(x, t, text)  # noqa: E731
    result["ours_ms"], result["ours_peak_gib"] = measure_cuda(fwd_ours, 2, args.reps)
    print(f"ours      {result['ours_ms']:8.1f} ms  peak +{result['ours_peak_gib']:.2f} GiB")
    del ours
    torch.cuda.empty_cache()
    if not args.no_diffusers:
        from diffusers import WanTransformer3DModel

        ref = (
            WanTransformer3DModel.from_pretrained(
                str(args.model / "transformer"), torch_dtype=torch.bfloat16
            )
            .to("cuda")
            .eval()
        )
        fwd = lambda: ref(x, t, text, return_dict=False)[0]  # noqa: E731
        out_ref = fwd()
        result["diffusers_ms"], result["diffusers_peak_gib"] = measure_cuda(fwd, 2, args.reps)
        result["output_rel_err"] = rel_err(out_ours.float(), out_ref.float())
        result["ratio_ours_over_diffusers"] = result["ours_ms"] / result["diffusers_ms"]
        print(
            f"diffusers {result['diffusers_ms']:8.1f} ms  peak +{result['diffusers_peak_gib']:.2f}"
            f" GiB  ratio {result['ratio_ours_over_diffusers']:.3f}  "
            f"rel.err {result['output_rel_err']:.2e}"
        )
        del ref
    if args.attention_table:
        result["attention"] = attention_table(result["tokens"], 12, 128)
        for row in result["attention"]:
            print("attention", row)
    if args.out:
        write_result(
            args.out,
            {
                "benchmark": "dit_forward",
                **environment(),
                "args": {k: str(v) for k, v in vars(args).items()},
                **result,
            },
        )


if __name__ == "__main__":
    main()
