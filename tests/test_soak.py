"""A bounded soak: a few hundred tiny requests through the blocking and the async API of
one engine (a worker process, batching on), with random aborts, poisoned inputs (NaN
latents on the workers) and invalid ones (refused at submission) mixed in. Every accepted
request must end finished, failed or aborted; none may be lost; memory must not grow
without bound."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time

import psutil
import pytest

from fastvideo import (
    DEMO_MODEL_ID,
    AsyncVideoEngine,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    VideoGenerator,
    VideoOutput,
)
from fastvideo.entrypoints.async_engine import AsyncVideoEngine as _Async

TINY = dict(height=16, width=16, num_frames=1, num_inference_steps=2, output_type="latent")
RSS_GROWTH_LIMIT = 256 * 2**20

pytestmark = pytest.mark.slow


class _Sink:
    def __init__(self, outcomes: dict, rid: str, lock: threading.Lock):
        self.outcomes, self.rid, self.lock = outcomes, rid, lock

    def progress(self, event):
        pass

    def _end(self, value):
        with self.lock:
            assert self.rid not in self.outcomes, f"{self.rid} ended twice"
            self.outcomes[self.rid] = value

    def finish(self, output):
        self._end(output)

    def fail(self, error):
        self._end(error)


def _rss(pids: list[int]) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in pids)


def _blocking_wave(gen, rng: random.Random, n: int) -> dict[str, int]:
    core = gen.core
    outcomes: dict = {}
    lock = threading.Lock()
    accepted, refused = [], 0
    for i in range(n):
        rid = f"b{i}"
        kind = rng.random()
        prompt = "POISON pond" if kind < 0.05 else f"a pond {i}"
        overrides = dict(TINY, seed=i)
        if 0.05 <= kind < 0.10:
            overrides["height"] = 17  # invalid: refused at submission
        param = gen.default_sampling_param.update(**overrides)
        try:
            request = core.new_request(prompt, param, _Sink(outcomes, rid, lock), rid)
        except ValueError:
            refused += 1
            continue
        while True:
            if core.submit_many([request]) == 1:
                break
            time.sleep(0.01)  # the queue is bounded: wait for room
        accepted.append(rid)
        if rng.random() < 0.2:
            core.abort(rng.choice(accepted))
    deadline = time.monotonic() + 120
    while len(outcomes) < len(accepted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(outcomes) == set(accepted), f"lost: {set(accepted) - set(outcomes)}"
    kinds = {"finished": 0, "failed": 0, "aborted": 0}
    for value in outcomes.values():
        if isinstance(value, VideoOutput):
            kinds["finished"] += 1
        elif isinstance(value, RequestAbortedError):
            kinds["aborted"] += 1
        else:
            assert isinstance(value, RequestFailedError), value
            assert "non-finite" in str(value)
            kinds["failed"] += 1
    return {**kinds, "refused": refused}


async def _async_wave(engine: AsyncVideoEngine, rng: random.Random, n: int) -> dict[str, int]:
    counts = {"finished": 0, "aborted": 0, "left_early": 0, "queue_full": 0}

    async def one(i: int) -> None:
        rid = f"a{i}"
        fate = rng.random()
        while True:
            try:
                async for event in engine.generate(f"a lake {i}", request_id=rid, seed=i, **TINY):
                    if isinstance(event, VideoOutput):
                        counts["finished"] += 1
                    elif fate < 0.15:
                        counts["left_early"] += 1  # leaving the loop aborts the request
                        return
                    elif fate < 0.3:
                        await engine.abort(rid)
                return
            except QueueFullError:
                counts["queue_full"] += 1  # back off, as a client should
                await asyncio.sleep(0.02)
            except RequestAbortedError:
                counts["aborted"] += 1
                return

    await asyncio.gather(*(one(i) for i in range(n)))
    return counts


def test_soak_every_request_ends_and_memory_stays_bounded(monkeypatch):
    monkeypatch.setenv("FASTVIDEO_WORKER_PLUGINS", "tests.plugins.nan_fault")
    rng = random.Random(0)
    with VideoGenerator.from_pretrained(
        DEMO_MODEL_ID, max_batch_size=4, max_waiting_requests=32
    ) as gen:
        engine = _Async(gen.core)
        pids = [psutil.Process().pid] + [p.pid for p in gen.executor._procs]
        _blocking_wave(gen, rng, 20)  # warm-up: allocator pools, first-call caches
        gc.collect()
        before = {pid: _rss([pid]) for pid in pids}
        start = time.monotonic()
        blocking = _blocking_wave(gen, rng, 96)
        async_counts = asyncio.run(_async_wave(engine, rng, 48))
        elapsed = time.monotonic() - start
        gc.collect()
        growth = {pid: _rss([pid]) - before[pid] for pid in pids}
        assert gen.core.scheduler.num_waiting == 0 and gen.core.scheduler.num_running == 0
        assert not gen.core.scheduler._history, "finished requests must not be kept"
        out = gen.generate_video("after the soak", **TINY)
        assert out.latents is not None
    mib = {pid: round(g / 2**20, 1) for pid, g in growth.items()}
    print(f"\nsoak: {blocking} blocking, {async_counts} async in {elapsed:.1f}s; RSS growth "
          f"driver {mib[pids[0]]} MiB, worker {mib[pids[1]]} MiB")  # fmt: skip
    assert blocking["finished"] > 48 and blocking["failed"] > 0 and blocking["aborted"] > 0
    assert blocking["refused"] > 0
    assert async_counts["finished"] > 24 and async_counts["left_early"] > 0
    assert all(g < RSS_GROWTH_LIMIT for g in growth.values()), growth
