"""``fastvideo`` command line: ``generate`` a video, or write the ``demo-model``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastvideo.engine.configs import PipelineConfig, SamplingParam, dataclass_help
from fastvideo.models.demo import DEMO_MODEL_ID

# CLI flag -> SamplingParam field (fields not listed keep their name with dashes).
_SAMPLING_FLAGS = {"steps": "num_inference_steps", "output": "output_path"}


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one video from a text prompt")
    p.add_argument(
        "--model",
        required=True,
        help=f"Hugging Face id, local diffusers folder, or {DEMO_MODEL_ID}",
    )
    p.add_argument("--prompt", required=True, help="the text prompt")
    helps = dataclass_help(SamplingParam)
    p.add_argument("--negative-prompt", help=helps["negative_prompt"])
    p.add_argument("--height", type=int, help=helps["height"])
    p.add_argument("--width", type=int, help=helps["width"])
    p.add_argument("--num-frames", type=int, help=helps["num_frames"])
    p.add_argument("--steps", type=int, help=helps["num_inference_steps"])
    p.add_argument("--guidance-scale", type=float, help=helps["guidance_scale"])
    p.add_argument("--seed", type=int, help=helps["seed"])
    p.add_argument("--fps", type=int, help=helps["fps"])
    p.add_argument("--output", default="outputs/", help=helps["output_path"])
    p.add_argument("--teacache", action="store_true", help=helps["enable_teacache"])
    p.add_argument(
        "--teacache-thresh", type=float, help=helps["teacache_thresh"] + " Implies --teacache."
    )
    pipe = dataclass_help(PipelineConfig)
    p.add_argument("--num-gpus", type=int, default=1, help=pipe["num_gpus"])
    p.add_argument("--attention-backend", help=pipe["attention_backend"])
    p.add_argument("--device", choices=["cuda", "cpu"], help=pipe["device"])
    p.add_argument("--compile", action="store_true", help=pipe["enable_torch_compile"])


def _add_demo_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="write the tiny random demo model to a folder")
    p.add_argument("path", help="folder to write (diffusers layout)")


def _generate(args: argparse.Namespace) -> int:
    from fastvideo.engine.core import check_sampling
    from fastvideo.engine.generator import VideoGenerator
    from fastvideo.engine.model_info import resolve_model

    overrides = {}
    for flag in (
        "negative_prompt",
        "height",
        "width",
        "num_frames",
        "steps",
        "guidance_scale",
        "seed",
        "fps",
        "output",
        "teacache_thresh",
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[_SAMPLING_FLAGS.get(flag, flag)] = value
    if args.teacache or args.teacache_thresh is not None:  # a threshold implies the cache
        overrides["enable_teacache"] = True
    # Validate the flags before starting workers and loading weights.
    info = resolve_model(args.model)
    param = SamplingParam().update(**info.variant.sampling_defaults).update(**overrides)
    check_sampling(info, args.prompt, param)
    pipeline = {"attention_backend": args.attention_backend}
    if args.compile:
        pipeline["enable_torch_compile"] = True
    if args.device:
        pipeline["device"] = args.device
    with VideoGenerator.from_pretrained(args.model, num_gpus=args.num_gpus, **pipeline) as gen:
        output = gen.generate_video(args.prompt, **overrides)
    t = output.timings
    line = (
        f"wrote {output.output_path} ({output.frames.shape[0]} frames, "
        f"{output.frames.shape[2]}x{output.frames.shape[1]}) in {t['end_to_end']:.1f}s; "
        f"plan: {output.plan}"
    )
    if "teacache_skipped_cond" in output.stats:
        skipped = int(output.stats["teacache_skipped_cond"])
        line += f"; TeaCache skipped {skipped} of {param.num_inference_steps} steps"
    print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvideo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_demo_model(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        from fastvideo.models.demo import write_demo_model

        print(f"wrote the demo model (random weights) to {write_demo_model(args.path)}")
        return 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastvideo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
