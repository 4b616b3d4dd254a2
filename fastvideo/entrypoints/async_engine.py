"""``AsyncVideoEngine``: the asyncio API over the same ``EngineCore`` as VideoGenerator.

    engine = AsyncVideoEngine.from_pretrained(model, num_gpus=2)
    async for event in engine.generate("a fox", num_inference_steps=30):
        ...  # ProgressEvent(s), then the final VideoOutput

Many coroutines may generate at once; ``await engine.abort(request_id)`` stops a waiting
or running request at its next step boundary. ``fastvideo.run(main())`` runs a coroutine
on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastvideo.config import PipelineConfig, SamplingParam
from fastvideo.engine.core import EngineCore, EventSink, ProgressEvent
from fastvideo.engine.output import VideoOutput, release_output_file, write_video
from fastvideo.engine.startup import start_engine

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (it is a dependency on Linux/macOS)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _sink_for(queue: asyncio.Queue) -> EventSink:
    """Events from engine threads onto ``queue`` of the running loop."""
    loop = asyncio.get_running_loop()

    def put(event: object) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return EventSink(put)


class AsyncVideoEngine:
    """Streams progress and results of concurrent requests to coroutines."""

    def __init__(self, core: EngineCore):
        self.core = core

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        num_gpus: int | None = None,
        pipeline_config: PipelineConfig | None = None,
        **overrides: Any,
    ) -> AsyncVideoEngine:
        """Start the workers and load ``model`` (blocking, like VideoGenerator's)."""
        return cls(start_engine(model, num_gpus, pipeline_config, overrides))

    @property
    def default_sampling_param(self) -> SamplingParam:
        return self.core.default_sampling_param

    async def generate(
        self,
        prompt: str,
        sampling_param: SamplingParam | None = None,
        request_id: str | None = None,
        priority: int = 0,
        **overrides: Any,
    ) -> AsyncIterator[ProgressEvent | VideoOutput]:
        """Yield ProgressEvents, then the VideoOutput; raises the request's error.

        The request is validated and queued when iteration starts (invalid fields or a
        full queue raise at once). Leaving the loop early aborts the request.
        """
        if sampling_param is not None and not isinstance(sampling_param, SamplingParam):
            raise TypeError(
                f"sampling_param must be a SamplingParam, got {type(sampling_param).__name__}"
            )
        param = (sampling_param or self.default_sampling_param).copy().update(**overrides)
        events: asyncio.Queue = asyncio.Queue()
        request = self.core.new_request(prompt, param, _sink_for(events), request_id)
        try:
            self.core.submit(request, priority)
        except BaseException:
            release_output_file(request.output_file)
            raise
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                if isinstance(event, VideoOutput):
                    finished = True
                    await self._save(event, request.output_file)
                    yield event
                    return
                if request.aborted:  # queued before the abort: not reported after it
                    continue
                yield event
        finally:
            if not finished:
                self.core.abort(request.request_id)

    @staticmethod
    async def _save(output: VideoOutput, path) -> None:
        if path is None or output.frames is None:
            release_output_file(path)
            return
        try:
            output.output_path = await asyncio.to_thread(
                write_video, output.numpy(), path, output.fps
            )
        finally:
            release_output_file(path)

    async def load_lora(self, path: str, scale: float = 1.0, name: str | None = None) -> str:
        """Merge a LoRA into the DiT on every worker (see VideoGenerator.load_lora)."""
        from fastvideo.entrypoints.generator import lora_load

        return await asyncio.to_thread(lora_load, self.core, path, scale, name)

    async def set_lora_scale(self, name: str, scale: float) -> None:
        from fastvideo.entrypoints.generator import lora_set_scale

        await asyncio.to_thread(lora_set_scale, self.core, name, scale)

    async def unload_lora(self, name: str) -> None:
        await asyncio.to_thread(self.core.control, "lora_unload", {"name": name})

    async def loras(self) -> dict[str, float]:
        """Loaded LoRAs: name -> scale."""
        return await asyncio.to_thread(self.core.control, "lora_list", {})

    @property
    def is_alive(self) -> bool:
        return self.core.is_alive

    @property
    def model_name(self) -> str:
        return self.core.info.name

    @property
    def image_input(self) -> str:
        """What the model does with an input image: "none", "optional" or "required"."""
        return self.core.info.spec.image_input

    async def abort(self, request_id: str) -> bool:
        """Abort a waiting request now, a running one at its next step boundary. Its stream
        yields no progress from then on (not even events queued before), only its end."""
        return self.core.abort(request_id)

    def shutdown(self) -> None:
        self.core.shutdown()

    async def __aenter__(self) -> AsyncVideoEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)
