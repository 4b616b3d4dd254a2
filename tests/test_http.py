"""The HTTP server (fastvideo.entrypoints.http) as a client sees it: a real uvicorn server
on 127.0.0.1 (a free port, in a thread), a real HTTP client (httpx), the demo model.

Most tests use the in-process executor for speed; ``test_restart_with_worker_process``
runs the default multi-process one. Long jobs (1000 steps, ~15 s on a CPU) hold the engine
busy where a test needs a job to stay running; they are cancelled, never waited for.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import pytest
import uvicorn

from fastvideo import DEMO_MODEL_ID, AsyncVideoEngine
from fastvideo.entrypoints.http import build_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_inference_steps": 2}
LONG = {"num_inference_steps": 1000}  # runs for many seconds unless cancelled


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))  # bound before start: no port race
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def engine():
    eng = AsyncVideoEngine.from_pretrained(DEMO_MODEL_ID, executor="inproc")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-videos")


@pytest.fixture(scope="module")
def server(engine, output_dir):
    app = build_app(engine, api_key=KEY, output_dir=output_dir, model_name=DEMO_MODEL_ID)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def create(client, **body) -> dict:
    r = client.post("/v1/videos", json={"prompt": "a fox in the snow", **body})
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(client, video_id: str, statuses, timeout: float = 60) -> dict:
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{video_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"{video_id} still {job['status']}"
        time.sleep(0.05)


def read_mp4(data: bytes, path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4, decoded with PyAV."""
    path.write_bytes(data)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height


def error_of(response) -> dict:
    return response.json()["error"]


# --- the happy path -----------------------------------------------------------------------
def test_create_poll_download(client, output_dir, tmp_path):
    job = create(client, size="48x32", num_frames=9, seed=7, **FAST)
    assert job["object"] == "video" and job["id"].startswith("video_")
    assert job["status"] in ("queued", "in_progress")
    assert job["model"] == DEMO_MODEL_ID and job["size"] == "48x32"
    assert job["num_frames"] == 9 and job["seed"] == 7 and job["error"] is None
    done = wait_status(client, job["id"], "completed")
    assert done["progress"] == 100 and done["completed_at"] >= done["created_at"]
    r = client.get(f"/v1/videos/{job['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert read_mp4(r.content, tmp_path / "out.mp4") == (9, 48, 32)
    assert (output_dir / f"{job['id']}.mp4").read_bytes() == r.content  # named by the id


def test_seconds_give_frames_and_form_bodies_work(client, tmp_path):
    job = create(client, size="32x32", seconds=0.5, fps=8, **FAST)  # 0.5 s x 8 fps + 1
    assert job["num_frames"] == 5 and job["fps"] == 8
    r = client.post(
        "/v1/videos", data={"prompt": "a cat", "size": "32x48", "num_inference_steps": "2"}
    )
    assert r.status_code == 200, r.text
    form_job = r.json()
    for j in (job, form_job):
        wait_status(client, j["id"], "completed")
    content = client.get(f"/v1/videos/{form_job['id']}/content").content
    assert read_mp4(content, tmp_path / "form.mp4") == (5, 32, 48)


def test_concurrent_jobs(client, tmp_path):
    sizes = ["32x32", "48x32", "32x48", "64x64"]

    def one(size: str) -> tuple[str, dict]:
        return size, create(client, size=size, **FAST)

    with ThreadPoolExecutor(len(sizes)) as pool:
        jobs = list(pool.map(one, sizes))
    assert len({j["id"] for _, j in jobs}) == len(sizes)
    listed = {j["id"] for j in client.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert {j["id"] for _, j in jobs} <= listed
    for size, job in jobs:
        wait_status(client, job["id"], "completed")
        content = client.get(f"/v1/videos/{job['id']}/content").content
        w, h = (int(v) for v in size.split("x"))
        assert read_mp4(content, tmp_path / f"{job['id']}.mp4") == (5, w, h)


def test_list_pages(client):
    ids = [create(client, size="32x32", **FAST)["id"] for _ in range(3)]
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and len(page["data"]) == 2 and page["has_more"]
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]  # newest first
    rest = client.get("/v1/videos", params={"limit": 1, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 422
    for video_id in ids:
        wait_status(client, video_id, "completed")


def test_events_stream_progress_then_final_status(client):
    job = create(client, size="32x32", num_inference_steps=40)
    events = []
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    kinds = [k for k, _ in events]
    progress = [e["progress"] for _, e in events]
    print(f"\n{len(events)} events, progress {progress}")
    assert kinds[-1] == "completed" and events[-1][1]["progress"] == 100
    assert set(kinds[:-1]) == {"progress"} and len(kinds) >= 3
    assert progress == sorted(progress)


def test_models_and_health(client, server):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [DEMO_MODEL_ID]
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


# --- cancelling and deleting --------------------------------------------------------------
def test_cancel_queued_and_running_jobs(client, output_dir):
    running = create(client, size="32x32", **LONG)
    wait_status(client, running["id"], "in_progress")
    queued = create(client, size="32x32", **FAST)
    assert client.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"
    r = client.get(f"/v1/videos/{queued['id']}/content")
    assert r.status_code == 409 and "queued" in error_of(r)["message"]
    cancelled = client.delete(f"/v1/videos/{queued['id']}").json()
    assert cancelled["status"] == "cancelled"
    stopped = client.delete(f"/v1/videos/{running['id']}").json()  # aborted at a step
    assert stopped["status"] == "cancelled" and stopped["progress"] < 90
    assert client.get(f"/v1/videos/{queued['id']}/content").status_code == 409
    assert not (output_dir / f"{queued['id']}.mp4").exists()
    # A finished job is deleted with its file; then it is gone.
    done = create(client, size="32x32", **FAST)
    wait_status(client, done["id"], "completed")
    assert (output_dir / f"{done['id']}.mp4").is_file()
    for video_id in (done["id"], queued["id"]):
        r = client.delete(f"/v1/videos/{video_id}")
        assert r.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
        assert client.get(f"/v1/videos/{video_id}").status_code == 404
    assert not (output_dir / f"{done['id']}.mp4").exists()
    assert client.delete("/v1/videos/video_nope").status_code == 404


# --- bad requests -------------------------------------------------------------------------
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image").decode()


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"size": "65x64"}, 400, "size", "width=65 must be a multiple of 16"),
        ({"size": "big"}, 400, "size", "WIDTHxHEIGHT"),
        ({"num_inference_steps": 0}, 400, "num_inference_steps", ">= 1"),
        ({"num_frames": 6}, 400, "num_frames", "4k+1"),
        ({"seconds": 0.3}, 400, "seconds", "4k+1"),
        ({"seconds": 1, "num_frames": 5}, 400, "seconds", "not both"),
        ({"guidance_scale": -1}, 400, "guidance_scale", ">= 0"),
        ({"prompt": "   "}, 400, "prompt", "non-empty"),
        ({"model": "other/model"}, 400, "model", "not served"),
        ({"image": PNG}, 400, "image", "text-to-video"),
        ({"image": "not base64!"}, 400, "image", "base64"),
        ({"foo": 1}, 422, "foo", "Extra inputs"),
        ({"num_inference_steps": "many"}, 422, "num_inference_steps", "integer"),
        ({"prompt": None}, 422, "prompt", "string"),
    ],
)
def test_bad_fields_are_rejected(client, body, status, param, words):
    before = len(client.get("/v1/videos", params={"limit": 100}).json()["data"])
    r = client.post("/v1/videos", json={"prompt": "a fox", **body})
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["param"] == param and words in error["message"], error
    after = len(client.get("/v1/videos", params={"limit": 100}).json()["data"])
    assert after == before  # no job was made


def test_bad_bodies(client):
    r = client.post("/v1/videos", json={"size": "32x32"})  # no prompt
    assert r.status_code == 422 and error_of(r)["param"] == "prompt"
    json_type = {"content-type": "application/json"}
    r = client.post("/v1/videos", content=b"{not json", headers=json_type)
    assert r.status_code == 422
    r = client.post("/v1/videos", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    files = {"input_reference": ("ref.png", b"\x89PNG fake", "image/png")}
    r = client.post("/v1/videos", data={"prompt": "a fox"}, files=files)
    assert r.status_code == 400 and error_of(r)["param"] == "input_reference"
    assert "text-to-video" in error_of(r)["message"]


def test_api_key(server):
    url = f"{server.url}/v1/videos"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert error_of(r)["code"] == "invalid_api_key"
    assert httpx.post(url, json={"prompt": "a fox"}).status_code == 401
    assert httpx.get(url, headers=AUTH).status_code == 200


# --- limits -------------------------------------------------------------------------------
def test_queue_full_is_429(tmp_path):
    """max_waiting_requests=1: one job running (held by 1000 steps), one waiting, the next
    is refused at once. Deterministic: the running job is seen running before the others
    are submitted, and it cannot finish in the milliseconds they take."""
    eng = AsyncVideoEngine.from_pretrained(DEMO_MODEL_ID, executor="inproc", max_waiting_requests=1)
    try:
        with ServerThread(build_app(eng, output_dir=tmp_path)) as srv:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                running = create(c, size="32x32", **LONG)
                wait_status(c, running["id"], "in_progress")
                waiting = create(c, size="32x32", **FAST)
                r = c.post("/v1/videos", json={"prompt": "one too many", **FAST})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert error_of(r)["code"] == "queue_full"
                assert c.get(f"/v1/videos/{waiting['id']}").json()["status"] == "queued"
                for job in (waiting, running):
                    assert c.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
                create(c, size="32x32", **FAST)  # room again
    finally:
        eng.shutdown()


def test_oldest_finished_jobs_are_evicted_with_their_files(engine, tmp_path):
    app = build_app(engine, output_dir=tmp_path, max_jobs=2, max_age_s=600)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        ids = []
        for _ in range(3):
            ids.append(create(c, size="32x32", **FAST)["id"])
            wait_status(c, ids[-1], "completed")
        assert c.get(f"/v1/videos/{ids[0]}").status_code == 404
        assert not (tmp_path / f"{ids[0]}.mp4").exists()
        assert all((tmp_path / f"{i}.mp4").is_file() for i in ids[1:])
        # Two unfinished jobs fill the store: a third gets 429 (nothing to evict).
        running = [create(c, size="32x32", **LONG) for _ in range(2)]
        r = c.post("/v1/videos", json={"prompt": "no room", **FAST})
        assert r.status_code == 429 and error_of(r)["code"] == "too_many_jobs"
        for job in running:
            c.delete(f"/v1/videos/{job['id']}")


def test_finished_jobs_expire(engine, tmp_path):
    app = build_app(engine, output_dir=tmp_path, max_age_s=0.5)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        job = create(c, size="32x32", **FAST)
        done = wait_status(c, job["id"], "completed")
        assert done["expires_at"] is not None
        time.sleep(1.2)
        assert c.get(f"/v1/videos/{job['id']}").status_code == 404
        assert not (tmp_path / f"{job['id']}.mp4").exists()


# --- the multi-process executor, engine death and restart -----------------------------------
def _serve_one(eng, output_dir: Path, tmp: Path) -> None:
    with ServerThread(build_app(eng, output_dir=output_dir)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            job = create(c, size="32x32", num_frames=5, **FAST)
            wait_status(c, job["id"], "completed", timeout=120)
            content = c.get(f"/v1/videos/{job['id']}/content").content
            assert read_mp4(content, tmp / f"{job['id']}.mp4") == (5, 32, 32)
            eng.shutdown()  # the engine goes away under a running server
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "dead"
            r = c.post("/v1/videos", json={"prompt": "after death", **FAST})
            assert r.status_code == 503 and error_of(r)["code"] == "engine_dead"


@pytest.mark.slow
def test_restart_with_worker_process(tmp_path):
    """Default (multi-process) executor: serve, stop engine and server, start both again
    over the same output folder, and it serves."""
    out = tmp_path / "videos"
    for _ in range(2):
        eng = AsyncVideoEngine.from_pretrained(DEMO_MODEL_ID)
        try:
            _serve_one(eng, out, tmp_path)
        finally:
            eng.shutdown()
    assert len(list(out.glob("video_*.mp4"))) == 2


def test_serve_entry_point_in_a_subprocess(tmp_path):
    """``serve()`` as a program: the key from $FASTVIDEO_API_KEY, 127.0.0.1, and a clean
    exit on Ctrl-C (SIGINT) with the engine shut down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from fastvideo import DEMO_MODEL_ID\n"
        "from fastvideo.entrypoints.http import serve\n"
        f"serve(DEMO_MODEL_ID, port={port}, output_dir={str(tmp_path)!r}, executor='inproc',"
        " log_level='warning')\n"
    )
    env = {**os.environ, "FASTVIDEO_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"serve() exited with {proc.returncode}"
            assert time.monotonic() < deadline, "serve() did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            assert httpx.get(f"{url}/v1/models").status_code == 401
            job = create(c, size="32x32", **FAST)
            wait_status(c, job["id"], "completed")
            assert c.get(f"/v1/videos/{job['id']}/content").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert (tmp_path / f"{job['id']}.mp4").is_file()  # a given output_dir is kept
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
