"""An HTTP server for one model: OpenAI's video-job API over ``AsyncVideoEngine``.

    from fastvideo.entrypoints.http import serve
    serve("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", port=8000, num_gpus=2)   # blocks

or ``build_app(engine, ...)`` for an ASGI app over an engine you own. Needs the ``serve``
extra (FastAPI, uvicorn, python-multipart).

Endpoints (all but ``/health`` need ``Authorization: Bearer <key>`` when a key is set):

- ``POST /v1/videos``: JSON (``model``, ``prompt``, ``size`` "WxH", ``seconds`` or
  ``num_frames``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``,
  ``seed``, ``fps``, ``image`` base64) or multipart form (the same fields, plus an
  ``input_reference`` image file) -> a video job object.
- ``GET /v1/videos`` (list), ``GET /v1/videos/{id}`` (poll), ``GET /v1/videos/{id}/content``
  (the mp4), ``GET /v1/videos/{id}/events`` (server-sent events: progress, then the final
  status), ``DELETE /v1/videos/{id}`` (cancel a queued/running job; delete a finished one
  and its file), ``GET /v1/models``, ``GET /health`` (503 once the engine is dead).
- ``GET /v1/loras`` (name -> scale); with ``lora_dir`` set also ``POST /v1/loras``
  (``path`` inside ``lora_dir``, ``scale``, ``name``: merged into the DiT between batches,
  so running jobs finish as they started and later jobs use it), ``PATCH
  /v1/loras/{name}`` (``scale``) and ``DELETE /v1/loras/{name}``. Without ``lora_dir``
  these answer 403: a client never names an arbitrary file on the server.

Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for a value the engine
rejects (its own validation, run at submission), 422 for a body that does not parse (a
wrong type, an unknown field), 401 without the key, 404 for an unknown job, 409 for
content that is not ready, 429 when the engine's queue (or the job store) is full, 503
once the engine is dead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastvideo import AsyncVideoEngine, EngineDeadError, QueueFullError
from fastvideo.entrypoints.video_jobs import (
    COMPLETED,
    IN_PROGRESS,
    QUEUED,
    JobStore,
    StoreFullError,
    VideoJob,
    discard_generation,
    new_job_id,
    run_job,
    start_generation,
)
from fastvideo.logger import init_logger

logger = init_logger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024
API_KEY_ENV = "FASTVIDEO_API_KEY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param}
        return JSONResponse({"error": {**body, "code": self.code}}, self.status, self.headers)


class CreateVideoRequest(BaseModel):
    """The body of ``POST /v1/videos`` (JSON or form fields). Values are checked by the
    engine at submission; here only their types."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = None
    seconds: float | None = None
    num_frames: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    fps: int | None = None
    image: str | None = None  # base64, or a data: URL


class LoadLoraRequest(BaseModel):
    """The body of ``POST /v1/loras``."""

    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the server's lora_dir (or absolute inside it)
    scale: float = 1.0
    name: str | None = None


class LoraScaleRequest(BaseModel):
    """The body of ``PATCH /v1/loras/{name}``."""

    model_config = ConfigDict(extra="forbid")

    scale: float


def lora_root(lora_dir: Path | None) -> Path:
    """The server's LoRA folder; without one, changing LoRAs over HTTP is refused (403)."""
    if lora_dir is None:
        raise APIError(
            403,
            "changing LoRAs over HTTP is off: start the server with a LoRA folder "
            "(--lora-dir DIR) to allow the files in it",
            code="lora_loading_disabled",
            type="permission_error",
        )
    return lora_dir.resolve()


def lora_file(lora_dir: Path | None, path: str) -> Path:
    """``path`` resolved inside ``lora_dir`` (links followed), or an APIError."""
    root = lora_root(lora_dir)
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise APIError(400, f"path {path!r} is outside the LoRA folder", param="path")
    if target.suffix != ".safetensors" or not target.is_file():
        raise APIError(
            404, f"no .safetensors file {path!r} in the LoRA folder", param="path", code="not_found"
        )
    return target


def parse_size(size: str) -> tuple[int, int]:
    """'832x480' -> (width 832, height 480)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not match:
        raise APIError(
            400,
            f"size must look like 'WIDTHxHEIGHT', e.g. '832x480'; got {size!r}",
            param="size",
            code="invalid_size",
        )
    return int(match.group(1)), int(match.group(2))


def decode_image(data: str) -> bytes:
    """A base64 image (optionally a ``data:image/...;base64,`` URL) -> its bytes."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image must be base64 (or a data: URL)", param="image") from None
    if not raw:
        raise APIError(400, "image is empty", param="image")
    if len(raw) > MAX_IMAGE_BYTES:
        raise APIError(413, f"image is over {MAX_IMAGE_BYTES} bytes", param="image")
    return raw


def _validation_message(error: ValidationError | RequestValidationError) -> tuple[str, str]:
    """(message, param) of the first error of a pydantic validation error."""
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or "body"
    return f"{param}: {first.get('msg', 'invalid')}", param


def _takes_images(engine: Any) -> bool:
    """Whether the served model takes an input image (image-to-video)."""
    return getattr(engine, "image_input", "none") != "none"


def _engine_alive(engine: Any) -> bool:
    alive = getattr(engine, "is_alive", None)
    if alive is None:  # AsyncVideoEngine has no public flag yet: its core has one
        alive = getattr(getattr(engine, "core", None), "is_alive", True)
    return bool(alive() if callable(alive) else alive)


@dataclasses.dataclass
class _State:
    engine: Any
    store: JobStore
    output_dir: Path
    model_name: str
    api_key: str | None
    cancel_wait_s: float
    lora_dir: Path | None = None
    started_at: int = dataclasses.field(default_factory=lambda: int(time.time()))
    dead: str | None = None

    def on_dead(self, error: BaseException) -> None:
        self.dead = self.dead or str(error) or type(error).__name__

    def check_alive(self) -> None:
        if self.dead is None and not _engine_alive(self.engine):
            self.dead = "the engine is not running"
        if self.dead is not None:
            raise APIError(
                503, f"the engine is dead: {self.dead}", code="engine_dead", type="server_error"
            )


async def _read_create_request(request: Request) -> tuple[CreateVideoRequest, bytes | None]:
    """The request body (JSON or multipart/urlencoded form) and the reference image."""
    content_type = request.headers.get("content-type", "application/json").lower()
    image: bytes | None = None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        fields: dict[str, Any] = {}
        async with request.form(max_files=1, max_fields=64) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "input_reference":
                        raise APIError(
                            422,
                            f"{key}: unexpected file field (only input_reference takes a file)",
                            param=key,
                        )
                    image = await value.read(MAX_IMAGE_BYTES + 1)
                    if len(image) > MAX_IMAGE_BYTES:
                        raise APIError(
                            413,
                            f"input_reference is over {MAX_IMAGE_BYTES} bytes",
                            param="input_reference",
                        )
                    if not image:
                        raise APIError(400, "input_reference is empty", param="input_reference")
                elif key == "input_reference":
                    image = decode_image(value)  # a form may carry it as base64 text
                else:
                    fields[key] = value
        try:
            body = CreateVideoRequest.model_validate(fields)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(422, message, param=param, code="invalid_field") from None
    elif content_type.startswith("application/json") or content_type.endswith("+json"):
        raw = await request.body()
        try:
            body = CreateVideoRequest.model_validate_json(raw or b"null")
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(422, message, param=param, code="invalid_field") from None
    else:
        raise APIError(
            415,
            f"unsupported content-type {content_type!r}: send application/json "
            "or multipart/form-data",
        )
    if body.image is not None:
        if image is not None:
            raise APIError(400, "give input_reference or image, not both", param="image")
        image = decode_image(body.image)
    return body, image


def _new_job(state: _State, body: CreateVideoRequest, image: bytes | None) -> VideoJob:
    """The job for a parsed request: its engine overrides and effective sizes."""
    if body.model is not None and body.model != state.model_name:
        raise APIError(
            400,
            f"model {body.model!r} is not served here; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )
    if image is not None and not _takes_images(state.engine):
        raise APIError(
            400,
            f"model {state.model_name!r} is text-to-video: it takes no input_reference/image",
            param="image" if body.image is not None else "input_reference",
            code="image_not_supported",
        )
    defaults = state.engine.default_sampling_param
    overrides: dict[str, Any] = {}
    for name in ("negative_prompt", "num_inference_steps", "guidance_scale", "fps"):
        value = getattr(body, name)
        if value is not None:
            overrides[name] = value
    if body.size is not None:
        overrides["width"], overrides["height"] = parse_size(body.size)
    fps = overrides.get("fps", defaults.fps)
    if body.seconds is not None and body.num_frames is not None:
        raise APIError(400, "give seconds or num_frames, not both", param="seconds")
    if body.num_frames is not None:
        overrides["num_frames"] = body.num_frames
    elif body.seconds is not None:
        if not (math.isfinite(body.seconds) and body.seconds > 0):
            raise APIError(400, f"seconds must be > 0, got {body.seconds}", param="seconds")
        if isinstance(fps, int) and fps > 0:
            overrides["num_frames"] = round(body.seconds * fps) + 1
    # Without a seed every request would get the model's one default: draw one, report it.
    overrides["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**31)
    return VideoJob(
        id=new_job_id(),
        model=state.model_name,
        prompt=body.prompt,
        width=overrides.get("width", defaults.width),
        height=overrides.get("height", defaults.height),
        num_frames=overrides.get("num_frames", defaults.num_frames),
        fps=fps if isinstance(fps, int) and fps > 0 else defaults.fps,
        seed=overrides["seed"],
        overrides=overrides,
        image=image,
    )


def _engine_field_error(error: Exception, body: CreateVideoRequest, job: VideoJob) -> APIError:
    """The engine's TypeError/ValueError (which names the field first) as a 400."""
    message = str(error)
    match = re.match(r"[A-Za-z_]+", message)
    field = match.group(0) if match else None
    if field in ("height", "width") and body.size is not None:
        field, message = "size", f"size={body.size!r}: {message}"
    elif field == "num_frames" and body.seconds is not None:
        field, message = "seconds", f"seconds={body.seconds:g} at fps={job.fps}: {message}"
    elif field == "image" and body.image is None:  # the image came as a multipart file
        field = "input_reference"
    known = set(CreateVideoRequest.model_fields) | {"width", "height", "input_reference"}
    return APIError(400, message, param=field if field in known else None, code="invalid_value")


def build_app(
    engine: AsyncVideoEngine,
    *,
    api_key: str | None = None,
    output_dir: str | Path,
    max_jobs: int = 256,
    max_age_s: float = 3600.0,
    model_name: str | None = None,
    cancel_wait_s: float = 5.0,
    lora_dir: str | Path | None = None,
) -> FastAPI:
    """The ASGI app serving ``engine`` (owned by the caller: shut it down after the app).

    Args:
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        output_dir: where the mp4s go, as ``<job id>.mp4`` (created if missing).
        max_jobs: jobs kept at once; the oldest finished ones are evicted (with their
            files) to make room; when all are unfinished a new job gets 429.
        max_age_s: finished jobs (and their files) are dropped this long after finishing.
        model_name: the model id clients see (``GET /v1/models``, the ``model`` field).
        cancel_wait_s: how long ``DELETE`` of a running job waits for it to stop.
        lora_dir: the folder ``POST /v1/loras`` may load ``.safetensors`` files from;
            without it LoRAs can be listed over HTTP but not changed.
    """
    info = getattr(getattr(engine, "core", None), "info", None)  # no public name yet
    name = model_name or getattr(info, "name", None) or "fastvideo"
    state = _State(
        engine=engine,
        store=JobStore(max_jobs, max_age_s),
        output_dir=Path(output_dir).expanduser(),
        model_name=str(name),
        api_key=api_key or None,
        cancel_wait_s=cancel_wait_s,
        lora_dir=Path(lora_dir).expanduser() if lora_dir is not None else None,
    )
    state.output_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(min(30.0, max(0.5, state.store.max_age_s / 4)))
                state.store.sweep()

        sweeper = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            tasks = [j.task for j in state.store.active() if j.task is not None]
            for task in tasks:
                task.cancel()  # each aborts its engine request on the way out
            await asyncio.gather(sweeper, *tasks, return_exceptions=True)

    app = FastAPI(title="fastvideo", lifespan=lifespan)
    app.state.fastvideo = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(422, message, param=param, code="invalid_field").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
        return error.response()

    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if state.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), state.api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def find_job(video_id: str) -> VideoJob:
        state.store.sweep()
        job = state.store.get(video_id)
        if job is None:
            raise APIError(404, f"no video job {video_id!r}", param="video_id", code="not_found")
        return job

    def public(job: VideoJob) -> dict[str, Any]:
        return job.to_dict(state.store.max_age_s)

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.post("/videos")
    async def create_video(request: Request) -> JSONResponse:
        state.check_alive()
        body, image = await _read_create_request(request)
        job = _new_job(state, body, image)
        try:
            state.store.make_room()
        except StoreFullError as e:
            raise APIError(429, str(e), code="too_many_jobs", type="rate_limit_error") from None
        try:
            stream, first = await start_generation(state.engine, job)
        except QueueFullError as e:
            raise APIError(
                429,
                f"the engine's queue is full: {e}",
                code="queue_full",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None
        except EngineDeadError as e:
            state.on_dead(e)
            raise APIError(
                503, f"the engine is dead: {state.dead}", code="engine_dead", type="server_error"
            ) from None
        except (TypeError, ValueError) as e:
            raise _engine_field_error(e, body, job) from None
        try:
            state.store.add(job)  # another request may have taken the room meanwhile
        except StoreFullError as e:
            await discard_generation(stream, first)
            raise APIError(429, str(e), code="too_many_jobs", type="rate_limit_error") from None
        job.image = None  # the engine holds its own reference now
        job.task = asyncio.create_task(
            run_job(job, stream, first, state.output_dir, state.on_dead), name=job.id
        )
        logger.info("job %s queued: %s", job.id, job.overrides)
        return JSONResponse(public(job))

    @api.get("/videos")
    async def list_videos(
        limit: int = Query(20, ge=1, le=100),
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        state.store.sweep()
        jobs = state.store.jobs()
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise APIError(400, f"after={after!r} is not a known video job", param="after")
            jobs = jobs[ids.index(after) + 1 :]
        page = jobs[:limit]
        return {
            "object": "list",
            "data": [public(j) for j in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(jobs) > limit,
        }

    @api.get("/videos/{video_id}")
    async def get_video(job: VideoJob = Depends(find_job)) -> dict[str, Any]:
        return public(job)

    @api.get("/videos/{video_id}/content")
    async def get_content(
        job: VideoJob = Depends(find_job), variant: str = "video"
    ) -> FileResponse:
        if variant != "video":
            raise APIError(400, f"variant={variant!r}: only 'video' is available", param="variant")
        if job.status != COMPLETED or job.path is None:
            raise APIError(
                409,
                f"video job {job.id} is {job.status}: no content"
                + (" yet" if job.status in (QUEUED, IN_PROGRESS) else ""),
                code="not_ready",
            )
        if not job.path.is_file():
            raise APIError(404, f"the file of video job {job.id} is gone", code="not_found")
        return FileResponse(job.path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @api.get("/videos/{video_id}/events", response_class=EventSourceResponse)
    async def video_events(job: VideoJob = Depends(find_job)) -> AsyncIterator[ServerSentEvent]:
        seq = 0
        async for current in job.changes():
            kind = current.status if current.finished else "progress"
            yield ServerSentEvent(event=kind, data=public(current), id=str(seq))
            seq += 1

    @api.delete("/videos/{video_id}")
    async def delete_video(job: VideoJob = Depends(find_job)) -> dict[str, Any]:
        if not job.finished:
            job.cancel_requested = True
            await state.engine.abort(job.id)
            await job.wait_finished(state.cancel_wait_s)
            return public(job)  # 'cancelled' (or what it ended as, if it finished first)
        state.store.remove(job.id)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        model = {
            "id": state.model_name,
            "object": "model",
            "created": state.started_at,
            "owned_by": "fastvideo",
        }
        return {"object": "list", "data": [model]}

    async def lora_call(call, *args: Any) -> Any:
        state.check_alive()
        try:
            return await call(*args)
        except EngineDeadError as e:
            state.on_dead(e)
            raise APIError(
                503, f"the engine is dead: {state.dead}", code="engine_dead", type="server_error"
            ) from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise APIError(400, str(e), code="lora_error") from None

    async def find_lora(name: str) -> str:
        if name not in await lora_call(state.engine.loras):
            raise APIError(404, f"no LoRA named {name!r} is loaded", param="name", code="not_found")
        return name

    def loras_page(loras: dict[str, float]) -> dict[str, Any]:
        data = [{"object": "lora", "name": n, "scale": s} for n, s in loras.items()]
        return {"object": "list", "data": data}

    @api.get("/loras")
    async def list_loras() -> dict[str, Any]:
        return loras_page(await lora_call(state.engine.loras))

    @api.post("/loras")
    async def load_lora(body: LoadLoraRequest) -> dict[str, Any]:
        path = lora_file(state.lora_dir, body.path)
        name = body.name or path.stem
        if name in await lora_call(state.engine.loras):
            raise APIError(409, f"a LoRA named {name!r} is loaded already", param="name")
        name = await lora_call(state.engine.load_lora, str(path), body.scale, name)
        logger.info("LoRA %s loaded from %s at scale %s", name, path, body.scale)
        return {"object": "lora", "name": name, "scale": body.scale}

    @api.patch("/loras/{name}")
    async def set_lora_scale(name: str, body: LoraScaleRequest) -> dict[str, Any]:
        lora_root(state.lora_dir)
        await find_lora(name)
        await lora_call(state.engine.set_lora_scale, name, body.scale)
        return {"object": "lora", "name": name, "scale": body.scale}

    @api.delete("/loras/{name}")
    async def unload_lora(name: str) -> dict[str, Any]:
        lora_root(state.lora_dir)
        await find_lora(name)
        await lora_call(state.engine.unload_lora, name)
        return {"object": "lora.deleted", "name": name, "deleted": True}

    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            state.check_alive()
        except APIError as e:
            return JSONResponse({"status": "dead", "error": e.message}, status_code=503)
        active = state.store.active()
        return JSONResponse(
            {
                "status": "ok",
                "model": state.model_name,
                "queued": sum(j.status == QUEUED for j in active),
                "in_progress": sum(j.status == IN_PROGRESS for j in active),
            }
        )

    return app


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    output_dir: str | Path | None = None,
    max_jobs: int = 256,
    max_age_s: float = 3600.0,
    log_level: str = "info",
    lora_dir: str | Path | None = None,
    **engine_options: Any,
) -> None:
    """Load ``model`` and serve it over HTTP until interrupted (blocking).

    ``engine_options`` go to ``AsyncVideoEngine.from_pretrained`` (``num_gpus``,
    ``executor``, ``max_waiting_requests``, ...). ``api_key`` defaults to
    ``$FASTVIDEO_API_KEY``. Without ``output_dir`` videos go to a temporary folder that is
    removed on exit; a given folder is kept.
    """
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and host not in _LOOPBACK:
        logger.warning(
            "serving on %s without an API key: anyone who can reach it can use it "
            "(set api_key= or $%s)",
            host,
            API_KEY_ENV,
        )
    engine = AsyncVideoEngine.from_pretrained(model, **engine_options)
    temporary = None
    try:
        if output_dir is None:
            output_dir = temporary = tempfile.mkdtemp(prefix="fastvideo-serve-")
        app = build_app(
            engine,
            api_key=api_key,
            output_dir=output_dir,
            max_jobs=max_jobs,
            max_age_s=max_age_s,
            model_name=model,
            lora_dir=lora_dir,
        )
        # Open event streams must not hold the shutdown until their jobs end.
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
