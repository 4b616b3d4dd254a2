"""``fastvideo`` command line: ``generate`` videos, ``serve`` them over HTTP, a browser
``demo``, or write a ``demo-model``.

Flags are made from the ``SamplingParam`` and ``PipelineConfig`` fields, with the same
names (``--num-inference-steps``, ``--attention-backend``, ...) and a few short aliases
(``--steps``, ``--output``, ``--compile``, ``--teacache``); ``--lora PATH[:SCALE]`` and
``--prompt`` repeat. Every error is one line on stderr: exit code 2 for bad input, 1 for a
failure while running, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fastvideo.config import _SUBCONFIGS as PIPELINE_SUBCONFIGS
from fastvideo.config import PipelineConfig, SamplingParam, field_help

# Short spellings kept next to the field names.
ALIASES = {
    "num_inference_steps": ["--steps"],
    "output_path": ["--output"],
    "enable_torch_compile": ["--compile"],
}
_SKIPPED = {"model_path", "vae_precision"}  # set by the command itself / a sub-config field
_BAD_INPUT = (TypeError, ValueError, FileNotFoundError, FileExistsError, LookupError)


def _parser_for(annotation: str) -> tuple[Any, bool]:
    """(argparse type, is_bool) for a field's annotation string; (None, False) when the
    field has no command-line form (tuples, dicts, calibrations)."""
    kinds = {a.strip() for a in annotation.split("|")} - {"None"}
    if kinds == {"bool"}:
        return None, True
    if kinds == {"bool", "str"}:  # True / False / "auto" (vae_tiling, *_cpu_offload)
        return _bool_or_word, False
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if kinds == {name}:
            return kind, False
    return None, False


def _bool_or_word(text: str) -> bool | str:
    """true/false spellings as a bool, any other word (e.g. 'auto') as it is."""
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        return text


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_fields(group: argparse._ArgumentGroup, fields: list[dataclasses.Field], dest: str) -> None:
    helps = {**field_help(SamplingParam), **field_help(PipelineConfig)}
    for f in fields:
        if f.name in _SKIPPED:
            continue
        kind, is_bool = _parser_for(str(f.type))
        if kind is None and not is_bool:
            continue
        flags = [f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, [])]
        text = helps.get(f.name, "")
        if is_bool and f.default is False:
            group.add_argument(*flags, dest=f"{dest}{f.name}", action="store_const", const=True,
                               help=text)  # fmt: skip
        else:
            group.add_argument(*flags, dest=f"{dest}{f.name}", type=_bool if is_bool else kind,
                               metavar=f.name.upper(), help=text)  # fmt: skip


def _add_model(p: argparse.ArgumentParser) -> None:
    from fastvideo.models.registry import default_demo_id

    p.add_argument(
        "--model",
        required=True,
        help=f"Hugging Face id, local diffusers folder, or {default_demo_id()}",
    )


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    engine = p.add_argument_group("engine (PipelineConfig fields)")
    top = [f for f in dataclasses.fields(PipelineConfig) if f.name not in PIPELINE_SUBCONFIGS]
    subs = [f for cls in PIPELINE_SUBCONFIGS.values() for f in dataclasses.fields(cls)]
    _add_fields(engine, top + subs, "p:")
    engine.add_argument("--vae-precision", help="VAE precision: fp32, bf16 or fp16.")
    engine.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge a LoRA into the DiT (repeatable)")  # fmt: skip


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate videos from text prompts")
    _add_model(p)
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    sampling = p.add_argument_group("sampling (SamplingParam fields)")
    _add_fields(sampling, dataclasses.fields(SamplingParam), "s:")
    sampling.add_argument(
        "--image",
        dest="s:image",
        metavar="PATH",
        help="Conditioning image file for image-to-video models (PNG, JPEG, ...); without "
        "--height/--width the video takes the image's aspect ratio at the model's default "
        "area.",
    )
    sampling.add_argument("--teacache", action="store_true", help="Same as --cache teacache.")
    sampling.add_argument(
        "--teacache-thresh", type=float, help="Same as --cache-thresh; implies --teacache."
    )
    _add_engine_flags(p)
    p.set_defaults(**{"s:output_path": "outputs/"})


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-style video jobs)")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or $FASTVIDEO_API_KEY)")
    p.add_argument("--output-dir", help="keep the videos here (default: a temporary folder)")
    p.add_argument("--max-jobs", type=int, default=256, help="jobs (and files) kept at most")
    p.add_argument("--max-age-s", type=float, default=3600.0, help="finished jobs kept this long")
    p.add_argument("--lora-dir", help="let clients load LoRA files from this folder (/v1/loras)")
    _add_engine_flags(p)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a browser demo (Gradio) over a model")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--output-dir", help="keep the videos here (default: a temporary folder)")
    _add_engine_flags(p)


def _add_demo_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="write the tiny random demo model to a folder")
    p.add_argument("path", help="folder to write (diffusers layout)")


def _collected(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {
        k.removeprefix(prefix): v
        for k, v in vars(args).items()
        if k.startswith(prefix) and v is not None
    }


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8", errors="surrogateescape") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt-file")
    return prompts


def _check_first(model: str, prompts: list[str], sampling: dict, pipeline: dict) -> None:
    """Validate every request and the engine options before any worker starts."""
    from fastvideo.engine.core import build_item
    from fastvideo.engine.model_info import resolve_model
    from fastvideo.engine.output import plan_output_file, release_output_file

    info = resolve_model(model)
    config = PipelineConfig(model_path=model).update(**info.variant.pipeline_defaults)
    config.update(**pipeline).validate()
    param = SamplingParam().update(**info.variant.sampling_defaults).update(**sampling)
    for i, prompt in enumerate(prompts):
        seed = param.seed + i if isinstance(param.seed, int) else param.seed
        item = build_item(info.spec, config, prompt, param.copy().update(seed=seed), f"cli-{i}")
        release_output_file(plan_output_file(param.output_path, item.prompt, item.seed))


def _generate(args: argparse.Namespace) -> int:
    from fastvideo.entrypoints.generator import VideoGenerator

    sampling = _collected(args, "s:")
    if args.teacache or args.teacache_thresh is not None:  # a threshold implies the cache
        sampling["cache"] = "teacache"
    if args.teacache_thresh is not None:
        sampling["cache_thresh"] = args.teacache_thresh
    pipeline = _engine_options(args)
    prompts = _prompts(args)
    _check_first(args.model, prompts, sampling, pipeline)
    with VideoGenerator.from_pretrained(args.model, **pipeline) as gen:
        outputs = gen.generate_video(prompts, **sampling)
    for output in outputs:
        _report(output)
    return 0


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    pipeline = _collected(args, "p:")
    if args.vae_precision:
        pipeline["vae_precision"] = args.vae_precision
    if args.lora:
        pipeline["lora"] = list(args.lora)
    return pipeline


def _serve(args: argparse.Namespace) -> int:
    from fastvideo.entrypoints.http import serve

    serve(args.model, args.host, args.port, args.api_key, output_dir=args.output_dir,
          max_jobs=args.max_jobs, max_age_s=args.max_age_s, lora_dir=args.lora_dir,
          **_engine_options(args))  # fmt: skip
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fastvideo.entrypoints.demo_app import launch

    launch(args.model, args.host, args.port, output_dir=args.output_dir, **_engine_options(args))
    return 0


def _report(output) -> None:
    t = output.timings
    where = output.output_path or "(not saved)"
    if output.frames is not None:
        frames, height, width = output.numpy().shape[:3]
        shape = f"{frames} frames, {width}x{height}"
    else:
        shape = "latents"
    line = f"wrote {where} ({shape}) in {t.get('end_to_end', 0.0):.1f}s; plan: {output.plan}"
    for cache in ("teacache", "magcache"):
        if f"{cache}_skipped_cond" in output.stats:
            skipped = int(output.stats[f"{cache}_skipped_cond"])
            total = skipped + int(output.stats.get(f"{cache}_computed_cond", 0))
            line += f"; {cache} skipped {skipped} of {total} steps"
    print(line)


def _version() -> str:
    from fastvideo import __version__

    return f"fastvideo {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvideo", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_demo(sub)
    _add_demo_model(sub)
    args = parser.parse_args(argv)
    commands = {"generate": _generate, "serve": _serve, "demo": _demo}
    try:
        if args.command in commands:
            return commands[args.command](args)
        from fastvideo.models.registry import default_demo

        variant = default_demo()
        written = variant.build(args.path)  # type: ignore[misc]
        print(f"wrote the demo model {variant.name} (random weights) to {written}")
        return 0
    except KeyboardInterrupt:
        print("fastvideo: interrupted", file=sys.stderr)
        return 130
    except _BAD_INPUT as e:
        print(f"fastvideo: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every other failure is one line, exit 1
        logging.getLogger("fastvideo").debug("command failed", exc_info=True)
        print(f"fastvideo: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
