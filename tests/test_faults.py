"""Faults nothing may survive silently: a stopped or stuck worker, an overdue request,
forged or partial messages, signals to the driver's process group, and listening sockets.

Each waits with a deadline; the engine's time-outs are set to a few seconds here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest
import zmq

from fastvideo import (
    DEMO_MODEL_ID,
    EngineDeadError,
    RequestFailedError,
    RequestTimeoutError,
    VideoGenerator,
)
from fastvideo.executor.multiproc import _Pending
from fastvideo.wire.codec import Encoder
from fastvideo.wire.messages import BatchResult
from tests.conftest import submit, wire_batch

REPO = Path(__file__).resolve().parents[1]
TINY = dict(height=16, width=16, num_frames=1, output_type="latent")
LONG = dict(height=32, width=32, num_frames=5, num_inference_steps=1000)

pytestmark = pytest.mark.slow


class _Sink:
    def __init__(self):
        self.result, self.done, self.steps = None, threading.Event(), []

    def progress(self, event):
        if event.stage == "denoising":
            self.steps.append(event.step)

    def finish(self, output):
        self.result = output
        self.done.set()

    def fail(self, error):
        self.result = error
        self.done.set()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _all_gone(pids: list[int]) -> bool:
    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(gone(p) for p in pids)


def _start_long(gen, prompt: str = "a long one") -> _Sink:
    sink = _Sink()
    submit(gen.core, prompt, gen.default_sampling_param.update(**LONG), sink)
    assert _wait(lambda: len(sink.steps) >= 1, 60), "the request never started denoising"
    return sink


# --- hung workers ----------------------------------------------------------------------------
def test_stopped_worker_becomes_engine_dead_within_the_timeout():
    gen = VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=2, worker_timeout_s=2.0)
    pids = [p.pid for p in gen.executor._procs]
    try:
        sink = _start_long(gen)
        stopped_at = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        assert sink.done.wait(15), "no error after a worker was stopped"
        latency = time.monotonic() - stopped_at
        print(f"\nSIGSTOP -> EngineDeadError in {latency:.2f}s: {sink.result}")
        assert isinstance(sink.result, EngineDeadError)
        assert "rank 1" in str(sink.result) and "heartbeat" in str(sink.result)
        assert latency < 2.0 + 3.0
        assert _wait(lambda: _all_gone(pids), 10), "a stopped worker was left behind"
        with pytest.raises(EngineDeadError):
            gen.generate_video("too late", **TINY, num_inference_steps=1)
    finally:
        gen.shutdown()
    assert not os.path.exists(gen.executor._dir)


def test_stuck_worker_becomes_engine_dead(monkeypatch):
    monkeypatch.setenv("FASTVIDEO_WORKER_PLUGINS", "tests.plugins.stall")
    gen = VideoGenerator.from_pretrained(DEMO_MODEL_ID, stall_timeout_s=2.0)
    pids = [p.pid for p in gen.executor._procs]
    try:
        sink = _Sink()
        param = gen.default_sampling_param.update(**TINY, num_inference_steps=8)
        submit(gen.core, "a STALL in the kernel", param, sink)
        assert sink.done.wait(20)
        assert isinstance(sink.result, EngineDeadError), sink.result
        assert "no progress" in str(sink.result) and "rank 0" in str(sink.result)
        assert _wait(lambda: _all_gone(pids), 10)
    finally:
        gen.shutdown()


def test_request_timeout_aborts_that_request_alone():
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, request_timeout_s=1.0) as gen:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="request_timeout_s=1"):
            gen.generate_video("a long one", **LONG)
        assert time.monotonic() - start < 6.0
        assert gen.generate_video("a short one", **TINY, num_inference_steps=1).latents is not None


# --- forged and partial messages -------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks():
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=2, worker_timeout_s=2.0) as gen:
        yield gen


def test_forged_results_on_the_driver_socket_are_dropped(two_ranks):
    gen = two_ranks
    executor = gen.executor
    before = executor.dropped_messages
    # A real request in flight: forged results name its batch id.
    box: dict = {}
    worker = threading.Thread(
        target=lambda: box.update(out=gen.generate_video("real", **TINY, num_inference_steps=300))
    )
    worker.start()
    assert _wait(lambda: bool(executor._pending), 10)
    (batch_id,) = list(executor._pending)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(f"ipc://{os.path.join(executor._dir, 'out')}")
        encoder = Encoder()
        forged = [
            BatchResult(batch_id, "forged", {}),  # no token
            BatchResult(batch_id, "forged", {}, token="0" * 32),  # the wrong token
            BatchResult("no-such-batch", "forged", {}, token=executor._token),  # unknown id
        ]
        for msg in forged:
            push.send_multipart(encoder.encode(msg))
        push.send_multipart([b"\x00garbage"])
        assert _wait(lambda: executor.dropped_messages >= before + 4, 5)
        push.close(linger=0)
    finally:
        ctx.term()
    worker.join(60)
    # The request got its own result, not a forged one (which carries no latents).
    assert box["out"].latents is not None
    out = gen.generate_video("still serving", **TINY, num_inference_steps=1)
    assert out.latents is not None and executor.is_alive


def test_batch_that_reaches_one_rank_only_fails_alone(two_ranks):
    gen = two_ranks
    executor = gen.executor
    param = gen.default_sampling_param.update(**TINY, num_inference_steps=2)
    # To the leader only: it waits for rank 1 (worker_timeout_s), then drops the batch.
    batch = wire_batch(gen, "half sent", param, batch_id="partial-leader")
    batch.token = executor._token
    future: Future = Future()
    with executor._lock:
        executor._pending[batch.batch_id] = _Pending(future, None, [0, 1])
        executor._inputs[0].send_multipart(executor._encoder.encode(batch))
    with pytest.raises(RequestFailedError, match=r"did not reach ranks \[1\]"):
        future.result(timeout=15)
    # To the non-leader only: it drops the batch once its leader moves past it.
    batch = wire_batch(gen, "half sent", param, batch_id="partial-follower")
    batch.token = executor._token
    with executor._lock:
        executor._inputs[1].send_multipart(executor._encoder.encode(batch))
    for _ in range(2):
        out = gen.generate_video("whole", **TINY, num_inference_steps=1)
        assert out.latents is not None
    assert executor.is_alive and all(p.poll() is None for p in executor._procs)


def test_nothing_listens_beyond_loopback(two_ranks):
    driver = psutil.Process()
    assert not [c for c in driver.net_connections(kind="inet") if c.status == "LISTEN"]
    listening = []
    for proc in two_ranks.executor._procs:
        for conn in psutil.Process(proc.pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append(conn.laddr.ip)
    assert listening, "expected gloo's pair sockets"
    assert set(listening) <= {"127.0.0.1", "::1"}, listening


# --- signals to the driver ------------------------------------------------------------------
SCRIPT = """
import os, sys, time
from fastvideo import DEMO_MODEL_ID, VideoGenerator
gen = VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=2)
print("PIDS", *[p.pid for p in gen.executor._procs], flush=True)
print("DIR", gen.executor._dir, flush=True)
try:
    gen.generate_video("a long one", height=256, width=256, num_frames=17,
                       num_inference_steps=1000, output_type="latent")
except KeyboardInterrupt:
    if os.environ.get("CATCH") != "1":
        raise
    start = time.monotonic()
    gen.generate_video("next", height=16, width=16, num_frames=1, num_inference_steps=1,
                       output_type="latent")
    print("NEXT", time.monotonic() - start, flush=True)
"""


def _run_script(tmp_path, send, catch: bool = False):
    """Start SCRIPT in its own session, wait until it denoises, ``send(proc)``."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "CATCH": "1" if catch else "0",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("DIR"):
            break
    time.sleep(2.0)  # inside the ~35 s request by now (it needs ~1 s to start)
    sent = time.monotonic()
    send(proc)
    out, err = proc.communicate(timeout=60)
    lines += out.splitlines()
    pids = [int(p) for p in lines[0].split()[1:]]
    return proc.returncode, lines, pids, err, time.monotonic() - sent


def _assert_clean(tmp_path, pids):
    assert _wait(lambda: _all_gone(pids), 10), "workers outlived the driver"
    left = list(tmp_path.iterdir())
    assert not left, f"left behind: {left}"


def test_terminal_ctrl_c_to_the_process_group_exits_cleanly(tmp_path):
    code, lines, pids, err, _ = _run_script(tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code != 0 and "KeyboardInterrupt" in err
    _assert_clean(tmp_path, pids)


def test_sigterm_exits_cleanly(tmp_path):
    """SIGTERM during a 1000-step request: the workers abort it at their next step on the
    shutdown message, so the exit does not wait out the 5 s shutdown grace."""
    code, lines, pids, err, took = _run_script(tmp_path, lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == -signal.SIGTERM, (code, err[-2000:])
    print(f"\nSIGTERM -> exit in {took:.2f}s")
    # 0.1 s measured; waiting for the request (the mutant that ignores Shutdown) took 3.4 s
    assert took < 2.0, f"the shutdown waited {took:.1f}s for the running request"
    _assert_clean(tmp_path, pids)


def test_keyboard_interrupt_aborts_the_running_request(tmp_path):
    code, lines, pids, err, _ = _run_script(
        tmp_path, lambda p: os.kill(p.pid, signal.SIGINT), catch=True
    )
    assert code == 0, err[-2000:]
    (next_line,) = [line for line in lines if line.startswith("NEXT")]
    elapsed = float(next_line.split()[1])
    print(f"\nthe next 1-step call after Ctrl-C took {elapsed:.2f}s")
    assert elapsed < 5.0, "the interrupted request kept the workers busy"
    _assert_clean(tmp_path, pids)
