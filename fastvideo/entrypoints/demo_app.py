"""A browser demo (Gradio) over ``AsyncVideoEngine``: a prompt in, a video out.

    from fastvideo.entrypoints.demo_app import launch
    launch("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", port=7860, num_gpus=2)   # blocks

or ``build_demo(engine)`` for the ``gr.Blocks`` over an engine you own. Needs the ``demo``
extra (gradio). Binds 127.0.0.1 unless told otherwise; never opens a share link.
"""

from __future__ import annotations

import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr

from fastvideo import (
    AsyncVideoEngine,
    EngineDeadError,
    ProgressEvent,
    QueueFullError,
    RequestAbortedError,
    VideoOutput,
)
from fastvideo.logger import init_logger

logger = init_logger(__name__)

KEEP_VIDEOS = 32  # newest files kept in the demo's output folder
_STAGES = {
    "input_validation": "Checking the request",
    "text_encoding": "Encoding the prompt",
    "timestep_preparation": "Preparing",
    "latent_preparation": "Preparing",
    "decoding": "Decoding the video",
}


def _takes_images(engine: Any) -> bool:
    return getattr(engine, "image_input", "none") != "none"


def _sizes(width: int, height: int) -> list[str]:
    """The model's default size first, then its portrait/landscape twin and half size."""
    half = (max(16, width // 2 // 16 * 16), max(16, height // 2 // 16 * 16))
    sizes = [f"{width}x{height}", f"{height}x{width}", f"{half[0]}x{half[1]}"]
    return list(dict.fromkeys(sizes))


def _parse_size(size: str) -> tuple[int, int]:
    parts = str(size).lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise gr.Error(f"Size must look like WIDTHxHEIGHT (e.g. 832x480), got {size!r}")
    return int(parts[0]), int(parts[1])


def _prune(folder: Path, keep: int = KEEP_VIDEOS) -> None:
    videos = sorted(folder.glob("*.mp4"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in videos[keep:]:
        old.unlink(missing_ok=True)


def build_demo(
    engine: AsyncVideoEngine,
    *,
    model_name: str | None = None,
    output_dir: str | Path | None = None,
    concurrency_limit: int = 4,
) -> gr.Blocks:
    """The Gradio app for ``engine`` (owned by the caller). Videos are written to
    ``output_dir`` (a fresh temporary folder by default), the newest 32 kept."""
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="fv-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    defaults = engine.default_sampling_param
    takes_images = _takes_images(engine)
    name = model_name or getattr(getattr(getattr(engine, "core", None), "info", None), "name", "")

    async def generate(
        prompt: str,
        image: str | None,
        size: str,
        steps: float,
        seed: float | None,
        negative_prompt: str,
        num_frames: float,
        guidance_scale: float,
        progress: gr.Progress = gr.Progress(),
    ) -> AsyncIterator[tuple[str, Any]]:
        width, height = _parse_size(size)
        seed = int(seed) if seed is not None and seed >= 0 else secrets.randbelow(2**31)
        overrides: dict[str, Any] = {
            "width": width,
            "height": height,
            "num_inference_steps": int(steps),
            "num_frames": int(num_frames),
            "guidance_scale": float(guidance_scale),
            "seed": seed,
        }
        if negative_prompt:
            overrides["negative_prompt"] = negative_prompt
        if image is not None and takes_images:
            overrides["image"] = Path(image).read_bytes()
        yield "Queued…", None
        try:
            async for event in engine.generate(prompt, **overrides):
                if isinstance(event, ProgressEvent):
                    if event.stage == "denoising" and event.total_steps:
                        text = f"Denoising: step {event.step} of {event.total_steps}"
                        progress((event.step, event.total_steps), desc="denoising", unit="steps")
                    else:
                        text = _STAGES.get(event.stage, event.stage) + "…"
                        progress(None, desc=text)
                    yield text, gr.skip()
                elif isinstance(event, VideoOutput):
                    path = out / f"{uuid.uuid4().hex}.mp4"
                    event.save(path)
                    _prune(out)
                    took = event.timings.get("end_to_end", 0.0)
                    yield f"Done in {took:.1f} s (seed {seed}, {width}x{height}).", str(path)
        except (TypeError, ValueError) as e:
            raise gr.Error(str(e)) from None
        except QueueFullError:
            raise gr.Error("The engine is busy (its queue is full); try again shortly.") from None
        except EngineDeadError as e:
            raise gr.Error(f"The engine stopped: {e}") from None
        except RequestAbortedError:
            yield "Stopped.", None

    with gr.Blocks(title="fastvideo", analytics_enabled=False) as demo:
        gr.Markdown(
            "## fastvideo\n"
            + (f"Model: `{name}` " if name else "")
            + ("(text-to-video)" if not takes_images else "(image-to-video)")
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    elem_id="prompt",
                    placeholder="a fox running through a snowy forest",
                )
                image = gr.Image(
                    label="Reference image",
                    type="filepath",
                    visible=takes_images,
                    interactive=takes_images,
                    elem_id="image",
                )
                size = gr.Dropdown(
                    label="Size (width x height)",
                    choices=_sizes(defaults.width, defaults.height),
                    value=f"{defaults.width}x{defaults.height}",
                    allow_custom_value=True,
                    elem_id="size",
                )
                steps = gr.Slider(
                    label="Steps",
                    minimum=1,
                    maximum=max(100, 2 * defaults.num_inference_steps),
                    step=1,
                    value=defaults.num_inference_steps,
                    elem_id="steps",
                )
                seed = gr.Number(
                    label="Seed (-1: random)", value=defaults.seed, precision=0, elem_id="seed"
                )
                with gr.Accordion("More settings", open=False):
                    negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt)
                    frames = gr.Number(label="Frames", value=defaults.num_frames, precision=0)
                    guidance = gr.Number(label="Guidance scale", value=defaults.guidance_scale)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column():
                status = gr.Markdown("Ready.", elem_id="status")
                video = gr.Video(
                    label="Video", elem_id="video", autoplay=True, loop=True, interactive=False
                )
        event = run.click(
            generate,
            inputs=[prompt, image, size, steps, seed, negative, frames, guidance],
            outputs=[status, video],
            concurrency_limit=concurrency_limit,
        )
        stop.click(None, cancels=[event])
    return demo


def launch(
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    output_dir: str | Path | None = None,
    **engine_options: Any,
) -> None:
    """Load ``model`` and serve the demo until interrupted (blocking). ``engine_options``
    go to ``AsyncVideoEngine.from_pretrained`` (``num_gpus``, ``executor``, ...)."""
    out = Path(output_dir or tempfile.mkdtemp(prefix="fv-demo-"))
    engine = AsyncVideoEngine.from_pretrained(model, **engine_options)
    try:
        demo = build_demo(engine, model_name=model, output_dir=out)
        demo.queue().launch(
            server_name=host, server_port=port, share=False, allowed_paths=[str(out)]
        )
    finally:
        engine.shutdown()
