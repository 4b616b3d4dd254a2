"""Life cycle of the multi-process engine: worker death, hostile bytes on the sockets,
several engines in one process, shutdown, start-up failure and driver death.

Every check that waits polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import psutil
import pytest

from fastvideo import EngineDeadError, RequestFailedError, VideoGenerator
from fastvideo.distributed.plan import ParallelPlan
from fastvideo.wire.codec import Encoder
from fastvideo.wire.messages import GenerateBatch, RequestItem
from tests.conftest import send_raw, wire_batch

PROMPT = "a red fox walking through a snowy forest at dawn"
SMALL = dict(
    height=32, width=48, num_frames=5, num_inference_steps=3, seed=5, negative_prompt="blurry"
)
KILL_TO_ERROR_LIMIT_S = 5.0


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a non-reaping parent counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _assert_fully_stopped(gen: VideoGenerator, baseline: set[int]) -> None:
    executor = gen.executor
    worker_pids = [p.pid for p in executor._procs]
    assert all(p.poll() is not None for p in executor._procs), "a worker is still running"
    assert not (_children() - baseline), f"child processes left: {_children() - baseline}"
    assert all(_gone(pid) for pid in worker_pids)
    assert not os.path.exists(executor._dir), f"socket directory {executor._dir} left behind"
    assert not executor.is_alive


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def inproc_frames(tiny_a, tiny_b):
    """In-process frames of SMALL (guidance 5) per model: the correctness reference."""
    frames = {}
    for name, (folder, _) in (("tiny_a", tiny_a), ("tiny_b", tiny_b)):
        with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
            frames[name] = gen.generate_video(PROMPT, guidance_scale=5.0, **SMALL).frames
        assert frames[name].std() > 1.0
    return frames


# --- a worker dies mid-generation --------------------------------------------------------
def test_worker_killed_mid_generation(tiny_a):
    folder = str(tiny_a[0])
    baseline = _children()
    gen = VideoGenerator.from_pretrained(folder, num_gpus=2)
    try:
        before = gen.generate_video(PROMPT, guidance_scale=5.0, **SMALL)
        assert before.plan == "CFG 2"

        denoising = threading.Event()
        submit = gen.executor.submit

        def observed_submit(request, progress=None):
            def on_progress(event):
                if event.stage == "denoising" and event.step >= 2:
                    denoising.set()
                if progress is not None:
                    progress(event)

            return submit(request, on_progress)

        gen.executor.submit = observed_submit
        outcome: dict[str, object] = {}

        def long_request() -> None:
            try:
                gen.generate_video(
                    PROMPT,
                    guidance_scale=5.0,
                    height=128,
                    width=128,
                    num_frames=17,
                    num_inference_steps=1000,
                )
                outcome["error"] = None
            except BaseException as e:  # noqa: BLE001 - recorded for the assertions below
                outcome["error"] = e
            outcome["at"] = time.monotonic()

        thread = threading.Thread(target=long_request, daemon=True)
        thread.start()
        assert denoising.wait(timeout=60), "the long request never reached denoising step 2"
        assert thread.is_alive()
        killed_at = time.monotonic()
        os.kill(gen.executor._procs[1].pid, signal.SIGKILL)
        thread.join(timeout=30)
        assert not thread.is_alive(), "generate_video did not return after a worker died"
        error = outcome["error"]
        latency = outcome["at"] - killed_at
        print(f"\nkill-to-EngineDeadError latency: {latency * 1000:.0f} ms ({error!r:.80})")
        assert isinstance(error, EngineDeadError), f"expected EngineDeadError, got {error!r}"
        assert "rank 1" in str(error)
        assert latency < KILL_TO_ERROR_LIMIT_S

        gen.shutdown()
        _assert_fully_stopped(gen, baseline)

        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            gen.generate_video(PROMPT, **SMALL)
        assert time.monotonic() - start < 1.0, "a dead engine must fail at once"
    finally:
        gen.shutdown()

    with VideoGenerator.from_pretrained(folder, num_gpus=2) as fresh:
        after = fresh.generate_video(PROMPT, guidance_scale=5.0, **SMALL)
    assert after.plan == "CFG 2"
    assert _max_diff(after.frames, before.frames) <= 1


# --- hostile bytes on a worker's request socket -----------------------------------------
@pytest.fixture(scope="module")
def engine2(tiny_a):
    """A 2-rank engine on tiny_a and its frames for SMALL (guidance 5) before any abuse."""
    with VideoGenerator.from_pretrained(str(tiny_a[0]), num_gpus=2) as gen:
        reference = gen.generate_video(PROMPT, guidance_scale=5.0, **SMALL)
        assert reference.plan == "CFG 2"
        yield gen, reference.frames


def _valid_request_header() -> bytes:
    req = GenerateBatch("x", [RequestItem("i", "p", "", 1, 5.0, 32, 48, 5, 3)], ParallelPlan(2))
    frames = Encoder().encode(req)
    assert len(frames) == 1
    return bytes(frames[0])


GARBAGE = {
    "nul-garbage": [b"\x00garbage"],
    "empty-frame": [b""],
    "truncated-msgpack": [_valid_request_header()[:-7]],
    "msgpack-prefix-only": [b"\xdc\xff\xff"],  # array16 announcing 65535 items, then nothing
    "random-bytes-multiframe": [os.urandom(4096), os.urandom(17), b"\xff" * 9],
    "wrong-tag": [msgspec.msgpack.encode(["no-such-message", "x"])],
    "map-not-array": [msgspec.msgpack.encode({"batch_id": "x"})],
    "wrong-field-types": [
        msgspec.msgpack.encode(["generate", "x", [["i", "p", "", "seed"]], [2, 1, 1, 1]])
    ],
    "tensor-reference-in-request": [
        msgspec.msgpack.encode(["generate", "x", ["float32", [2], 1], [2, 1, 1, 1]]),
        b"\x00" * 8,
    ],
    "bad-tensor-reference": [
        msgspec.msgpack.encode(["generate", "x", [["i", ["float32", [2], 9]]], [2, 1, 1, 1]]),
    ],
    "valid-batch-without-the-token": [_valid_request_header()],
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_worker_survives_garbage(engine2, kind):
    gen, reference = engine2
    executor = gen.executor
    for rank in range(executor.world_size):
        send_raw(executor, rank, GARBAGE[kind])
    # Sockets are FIFO: the garbage is handled before this request reaches the workers.
    out = gen.generate_video(PROMPT, guidance_scale=5.0, **SMALL)
    assert all(p.poll() is None for p in executor._procs), "a worker died"
    assert executor.is_alive
    assert _max_diff(out.frames, reference) <= 1


def test_request_that_skips_driver_validation_fails_alone(engine2):
    """A request the driver did not validate (height not a multiple of 16) fails on the
    workers as a RequestFailedError for that request; the engine keeps serving."""
    gen, reference = engine2
    param = gen.default_sampling_param.update(guidance_scale=5.0, **SMALL)
    batch = wire_batch(gen, PROMPT, param)
    batch.items[0].height = 33
    future = gen.executor.submit(batch)
    with pytest.raises(RequestFailedError) as info:
        future.result(timeout=60)
    assert info.value.error_type == "ValueError" and "height" in str(info.value)
    out = gen.generate_video(PROMPT, guidance_scale=5.0, **SMALL)
    assert _max_diff(out.frames, reference) <= 1
    assert all(p.poll() is None for p in gen.executor._procs)


# --- two engines in one process ---------------------------------------------------------
def test_two_generators_at_once(tiny_a, tiny_b, inproc_frames):
    baseline = _children()
    with (
        VideoGenerator.from_pretrained(str(tiny_a[0]), num_gpus=1) as gen_a,
        VideoGenerator.from_pretrained(str(tiny_b[0]), num_gpus=1) as gen_b,
    ):
        assert gen_a.executor._dir != gen_b.executor._dir
        pids_a = {p.pid for p in gen_a.executor._procs}
        pids_b = {p.pid for p in gen_b.executor._procs}
        assert not pids_a & pids_b
        results: dict[str, list] = {"tiny_a": [], "tiny_b": []}
        errors: list[BaseException] = []

        def run(name: str, gen: VideoGenerator) -> None:
            try:
                for _ in range(2):
                    results[name].append(gen.generate_video(PROMPT, guidance_scale=5.0, **SMALL))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [
            threading.Thread(target=run, args=("tiny_a", gen_a)),
            threading.Thread(target=run, args=("tiny_b", gen_b)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        for name, outs in results.items():
            assert len(outs) == 2
            for out in outs:
                assert out.plan == "single rank"
                assert _max_diff(out.frames, inproc_frames[name]) <= 1, name
        # the two models really differ, so a crossed wire would have shown
        assert _max_diff(inproc_frames["tiny_a"], inproc_frames["tiny_b"]) > 10
    _assert_fully_stopped(gen_a, baseline)
    _assert_fully_stopped(gen_b, baseline)


# --- shutdown ------------------------------------------------------------------------------
def test_shutdown_is_complete_and_idempotent(tiny_a):
    baseline = _children()
    gen = VideoGenerator.from_pretrained(str(tiny_a[0]), num_gpus=2)
    with pytest.raises(KeyError), gen:  # the context manager shuts down on errors too
        gen.generate_video(PROMPT, guidance_scale=1.0, **SMALL)
        raise KeyError("user code failed")
    _assert_fully_stopped(gen, baseline)
    start = time.monotonic()
    gen.shutdown()
    gen.shutdown()
    assert time.monotonic() - start < 1.0
    with pytest.raises(EngineDeadError):
        gen.generate_video(PROMPT, **SMALL)
    _assert_fully_stopped(gen, baseline)


@pytest.fixture
def private_tmpdir(monkeypatch):
    """Point ``tempfile`` at a fresh short directory (ipc paths must stay short), so the
    engine's socket directory can be checked for without racing other users of /tmp."""
    path = tempfile.mkdtemp(prefix="fvt-")
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_worker_startup_failure_carries_traceback(tiny_a, tmp_path, private_tmpdir):
    broken = tmp_path / "tiny-a-broken"
    shutil.copytree(tiny_a[0], broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    baseline = _children()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        VideoGenerator.from_pretrained(str(broken), num_gpus=2)
    elapsed = time.monotonic() - start
    message = str(info.value)
    print(f"\nstart-up failure surfaced after {elapsed:.1f}s: {type(info.value).__name__}")
    assert type(info.value).__name__ == "WorkerStartupError"
    assert "Traceback" not in message and "\n" not in message  # one line for the user
    assert "Traceback (most recent call last)" in info.value.worker_traceback
    assert "CheckpointError" in message and "truncated" in message
    assert str(weights) in message
    assert not (_children() - baseline), "a worker outlived the failed start"
    assert not list(private_tmpdir.iterdir()), "the socket directory was left behind"
    assert elapsed < 60


# --- the driver dies -------------------------------------------------------------------
DRIVER = """
import sys, time
import numpy as np
import torch
from fastvideo import VideoGenerator
if len(sys.argv) > 2:  # start torch's OpenMP pool before the workers fork
    torch.set_num_threads(2)
    (torch.randn(256, 256) @ torch.randn(256, 256)).sum()
gen = VideoGenerator.from_pretrained(sys.argv[1], num_gpus=2)
if len(sys.argv) > 2:
    out = gen.generate_video(sys.argv[3], guidance_scale=5.0, **eval(sys.argv[4]))
    np.save(sys.argv[2], out.frames)
procs = gen.executor._procs
print(gen.executor._dir, type(procs[0]).__name__, *[p.pid for p in procs], flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_workers_exit_when_driver_is_killed(tiny_a, tmp_path, inproc_frames, start):
    """Spawned or forked (``FASTVIDEO_WORKER_START``), the workers end within seconds of
    a SIGKILLed driver; forked CPU workers (one torch thread each, in a driver that ran
    torch's OpenMP pool before forking) give the in-process frames."""
    log = tmp_path / "driver.log"
    argv = [sys.executable, "-c", DRIVER, str(tiny_a[0])]
    if start == "fork":
        argv += [str(tmp_path / "frames.npy"), PROMPT, repr(SMALL)]
    env = {**os.environ, "FASTVIDEO_WORKER_START": start}
    with open(log, "w") as err:
        driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    worker_pids: list[int] = []
    socket_dir = None
    try:
        line = _read_line(driver, timeout=120)
        assert line, f"driver printed nothing; its log:\n{log.read_text()[-3000:]}"
        socket_dir, kind, *pids = line.split()
        assert kind == ("ForkedWorker" if start == "fork" else "Popen")
        worker_pids = [int(p) for p in pids]
        assert len(worker_pids) == 2 and not any(_gone(p) for p in worker_pids)
        if start == "fork":
            frames = np.load(tmp_path / "frames.npy")
            assert _max_diff(frames, inproc_frames["tiny_a"]) <= 1
        killed_at = time.monotonic()
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        exited = _wait_until(lambda: all(_gone(p) for p in worker_pids), timeout=10)
        print(f"\nworkers gone {time.monotonic() - killed_at:.2f}s after the driver was killed")
        assert exited, f"workers {[p for p in worker_pids if not _gone(p)]} outlived the driver"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        for pid in worker_pids:  # only on failure: never leave our grandchildren behind
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.stdout is not None:
            driver.stdout.close()
        if socket_dir is not None and os.path.basename(socket_dir).startswith("fastvideo-"):
            shutil.rmtree(socket_dir, ignore_errors=True)  # a SIGKILLed driver cannot clean up


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, or '' after ``timeout`` seconds (or at EOF)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


# --- the driver's I/O thread must survive what users do with futures and callbacks ------------
@pytest.fixture
def engine1(tiny_a):
    with VideoGenerator.from_pretrained(str(tiny_a[0]), num_gpus=1) as gen:
        yield gen


def _settled(gen: VideoGenerator, future, timeout: float = 60) -> bool:
    """Wait for ``future`` while the I/O thread that would complete it is alive."""
    io = gen.executor._io_thread
    _wait_until(lambda: future.done() or not io.is_alive(), timeout)
    return future.done()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_raising_progress_callback_does_not_wedge_the_engine(engine1):
    param = engine1.default_sampling_param.update(guidance_scale=5.0, **SMALL)

    def callback(event):
        raise RuntimeError("a user's progress callback failed")

    first = engine1.executor.submit(wire_batch(engine1, PROMPT, param), callback)
    assert _settled(engine1, first), "the request with the failing callback never finished"
    second = engine1.executor.submit(wire_batch(engine1, PROMPT, param))
    assert _settled(engine1, second), "the engine stopped serving"
    assert second.result().frames is not None
    assert engine1.executor._io_thread.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_cancelled_future_does_not_wedge_the_engine(engine1):
    param = engine1.default_sampling_param.update(guidance_scale=5.0, **SMALL)
    first = engine1.executor.submit(wire_batch(engine1, PROMPT, param))
    first.cancel()  # allowed or refused: either way the engine must keep serving
    second = engine1.executor.submit(wire_batch(engine1, PROMPT, param))
    assert _settled(engine1, second), "the engine stopped serving after a cancelled request"
    assert second.result().frames is not None
    assert engine1.executor._io_thread.is_alive()
