"""The LLM-style engine API on the tiny demo model with worker processes: offline batches,
the async engine, aborts, failure isolation and backpressure.

Frames are compared with a tolerance of 1 uint8 level (batched and unbatched forwards may
round differently in fp32); in practice most match exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fastvideo import (
    DEMO_MODEL_ID,
    AsyncVideoEngine,
    EngineDeadError,
    ProgressEvent,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    VideoGenerator,
    VideoOutput,
)
from tests.conftest import submit

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3)
PROMPTS = [f"a fox, take {i}" for i in range(6)]


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class _CountingSubmit:
    """Wraps executor.submit to record the batch size of every wire request."""

    def __init__(self, executor):
        self.sizes: list[int] = []
        self._submit = executor.submit
        executor.submit = self

    def __call__(self, batch, on_progress=None):
        self.sizes.append(len(batch.items))
        return self._submit(batch, on_progress)


@pytest.fixture(scope="module")
def batched():
    """One worker process, latency mode, batches of up to 3."""
    with VideoGenerator.from_pretrained(
        DEMO_MODEL_ID, num_gpus=1, max_batch_size=3, parallel_mode="latency"
    ) as gen:
        yield gen


def test_offline_batch_equals_single_calls(batched):
    spy = _CountingSubmit(batched.executor)
    outputs = batched.generate_video(PROMPTS, seed=100, **SMALL)
    assert spy.sizes == [3, 3], "6 compatible prompts should run as two batches of 3"
    assert [o.prompt for o in outputs] == PROMPTS  # input order
    assert [o.seed for o in outputs] == [100 + i for i in range(6)]  # derived seeds
    spy.sizes.clear()
    singles = [batched.generate_video(p, seed=100 + i, **SMALL) for i, p in enumerate(PROMPTS)]
    assert spy.sizes == [1] * 6
    diffs = [_max_diff(o.frames, s.frames) for o, s in zip(outputs, singles, strict=True)]
    print(f"\nbatched vs single max |diff| per video: {diffs}")
    assert max(diffs) <= 1
    assert len({o.frames.tobytes() for o in outputs}) == 6  # six different videos


def test_batch_with_a_list_of_params_keeps_each_seed_and_guidance(batched):
    base = batched.default_sampling_param.update(output_type="latent", **SMALL)
    params = [base.copy().update(seed=7, guidance_scale=g) for g in (2.0, 6.0)]
    spy = _CountingSubmit(batched.executor)
    outputs = batched.generate_video(["a cat", "a cat"], sampling_param=params)
    assert spy.sizes == [2]  # one batch, with a guidance scale per item
    singles = [batched.generate_video("a cat", sampling_param=p) for p in params]
    assert [o.seed for o in outputs] == [7, 7]
    for o, s in zip(outputs, singles, strict=True):
        rel = float((o.latents - s.latents).norm() / s.latents.norm())
        assert rel < 1e-5
    diff = float((outputs[0].latents - outputs[1].latents).norm() / outputs[1].latents.norm())
    assert diff > 1e-3  # the guidance scales really differ inside the batch


def test_nan_latents_fail_alone_and_the_engine_keeps_serving(monkeypatch):
    monkeypatch.setenv("FASTVIDEO_WORKER_PLUGINS", "tests.plugins.nan_fault")
    gen = VideoGenerator.from_pretrained(
        DEMO_MODEL_ID, num_gpus=2, max_batch_size=2, parallel_mode="latency"
    )
    with gen:
        good = gen.generate_video("a calm lake", seed=3, **SMALL)
        with pytest.raises(RequestFailedError, match="non-finite"):
            gen.generate_video(["a calm lake", "POISON river"], seed=3, **SMALL)
        # The healthy request of that batch finished; its output is the same as alone.
        events: list = []
        core = gen.core
        sinks = [_ListSink(events) for _ in range(2)]
        submit(core, "a calm lake", gen.default_sampling_param.update(seed=3, **SMALL), sinks[0])
        submit(core, "POISON lake", gen.default_sampling_param.update(seed=4, **SMALL), sinks[1])
        assert _wait(lambda: sinks[0].done and sinks[1].done, 60)
        assert isinstance(sinks[0].result, VideoOutput)
        assert _max_diff(sinks[0].result.frames, good.frames) <= 1
        assert isinstance(sinks[1].result, RequestFailedError)
        again = gen.generate_video("a calm lake", seed=3, **SMALL)
        assert _max_diff(again.frames, good.frames) == 0


class _ListSink:
    def __init__(self, events: list):
        self.events, self.result, self.done = events, None, False
        self.steps: list[int] = []

    def progress(self, event: ProgressEvent) -> None:
        if event.stage == "denoising":
            self.steps.append(event.step)

    def finish(self, output) -> None:
        self.result, self.done = output, True

    def fail(self, error) -> None:
        self.result, self.done = error, True


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="module")
def engine():
    """Async engine on 2 CPU workers, automatic latency/throughput mode."""
    eng = AsyncVideoEngine.from_pretrained(DEMO_MODEL_ID, num_gpus=2, max_waiting_requests=8)
    yield eng
    eng.shutdown()


def test_async_concurrent_requests_each_get_their_own_result(engine):
    async def one(i: int):
        steps, output = [], None
        events = engine.generate(f"a bird {i}", seed=50 + i, request_id=f"req-{i}", **SMALL)
        async for event in events:
            if isinstance(event, ProgressEvent):
                assert event.request_id == f"req-{i}"  # each request's events are its own
                if event.stage == "denoising":
                    steps.append(event.step)
            else:
                output = event
        return steps, output

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    results = asyncio.run(main())
    for i, (steps, output) in enumerate(results):
        assert output.prompt == f"a bird {i}" and output.seed == 50 + i
        assert steps == sorted(steps) and steps[-1] == SMALL["num_inference_steps"]
    frames = [r[1].frames.tobytes() for r in results]
    assert len(set(frames)) == 4
    # Same as a request made alone (whatever mode or replica served each one).
    alone = asyncio.run(_final(engine, "a bird 2", seed=52))
    assert _max_diff(alone.frames, results[2][1].frames) <= 1


async def _final(engine, prompt, **kw):
    async for event in engine.generate(prompt, **{**SMALL, **kw}):
        if isinstance(event, VideoOutput):
            return event
    raise AssertionError("no output")


def test_abort_running_request_within_one_step(engine, monkeypatch):
    """abort() of a running request whose consumer lags behind the workers (the loop
    blocked while steps pile up in its queue): no progress is reported after abort()
    returns, and the workers stop at the next step boundary or so (within 3 steps and
    0.5 s of the abort)."""
    computed: list[tuple[int, float]] = []  # (step, when) the workers reported, in order
    real_submit = engine.core.executor.submit

    def observed_submit(batch, on_progress=None):
        def seen(event):
            if event.stage == "denoising":
                computed.append((event.step, time.monotonic()))
            if on_progress is not None:
                on_progress(event)

        return real_submit(batch, seen)

    monkeypatch.setattr(engine.core.executor, "submit", observed_submit)

    async def main():
        steps_after: list[int] = []
        at_abort: list[tuple[int, float]] = []

        async def long_one():
            async for event in engine.generate(
                "a long video",
                request_id="long-1",
                height=256,  # steps of ~35 ms: the abort reaches the workers within one
                width=256,
                num_frames=17,
                num_inference_steps=1000,
            ):
                if isinstance(event, ProgressEvent) and event.stage == "denoising":
                    if at_abort:
                        steps_after.append(event.step)
                    if event.step == 3:
                        # A slow consumer: the loop blocked until the workers are at step
                        # 17, so 13 steps wait in its queue when it aborts.
                        deadline = time.monotonic() + 60
                        while computed[-1][0] < 17 and time.monotonic() < deadline:
                            time.sleep(0.002)
                        assert await engine.abort("long-1")
                        at_abort.append((computed[-1][0], time.monotonic()))

        with pytest.raises(RequestAbortedError):
            await long_one()
        (step, when), (last, last_at) = at_abort[0], computed[-1]
        print(f"\nworkers at step {step} when aborted, stopped at {last} "
              f"{last_at - when:.3f}s later; steps reported after: {steps_after}")  # fmt: skip
        assert step >= 17, step
        assert steps_after == [], steps_after
        assert last_at - when < 0.5, (step, last, last_at - when)
        assert last - step <= 3, (step, last)  # at the next step boundary, give or take one
        return await _final(engine, "after the abort", seed=1)

    after = asyncio.run(main())
    assert after.frames is not None


def test_timed_out_request_reports_no_progress_after_its_timeout():
    """request_timeout_s on a request whose consumer stalls past the timeout while steps
    pile up in its queue: the stream yields none of them after the timeout, only
    RequestTimeoutError."""
    from fastvideo import RequestTimeoutError

    async def main(engine):
        after: list[int] = []
        stalled = False
        with pytest.raises(RequestTimeoutError):
            async for event in engine.generate(
                "a long video", height=128, width=128, num_frames=9, num_inference_steps=1000
            ):
                if isinstance(event, ProgressEvent) and event.stage == "denoising":
                    if stalled:
                        after.append(event.step)
                    elif event.step == 3:
                        time.sleep(2.0)  # past the 1 s timeout: steps queue up meanwhile
                        stalled = True
        return after

    engine = AsyncVideoEngine.from_pretrained(DEMO_MODEL_ID, request_timeout_s=1.0)
    try:
        after = asyncio.run(main(engine))
    finally:
        engine.shutdown()
    assert after == [], after


def test_leaving_async_for_early_aborts_the_request(engine, monkeypatch):
    aborted: list[str] = []
    real_abort = engine.core.abort

    def spy(request_id):
        aborted.append(request_id)
        return real_abort(request_id)

    monkeypatch.setattr(engine.core, "abort", spy)

    async def main():
        async for event in engine.generate(
            "a walk",
            request_id="early-1",
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=200,
        ):
            if isinstance(event, ProgressEvent) and event.stage == "denoising":
                break  # the caller walks away
        for _ in range(100):  # the generator is finalised by the loop shortly after
            if aborted:
                break
            await asyncio.sleep(0.02)
        return await _final(engine, "the next one", seed=2)

    after = asyncio.run(main())
    assert aborted == ["early-1"]
    assert after.frames is not None


def test_abort_waiting_request_and_queue_bound():
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=1, max_waiting_requests=2) as gen:
        core = gen.core
        param = gen.default_sampling_param.update(
            height=64, width=64, num_frames=5, num_inference_steps=200
        )
        running = _ListSink([])
        submit(core, "busy", param, running, request_id="busy")
        assert _wait(lambda: running.steps, 60)  # the worker is busy now
        waiting = [_ListSink([]) for _ in range(2)]
        for i, sink in enumerate(waiting):
            submit(core, f"queued {i}", param, sink, request_id=f"queued-{i}")
        start = time.monotonic()
        with pytest.raises(QueueFullError, match="max_waiting_requests"):
            submit(core, "one too many", param, _ListSink([]))
        assert time.monotonic() - start < 0.1  # refused at once
        assert core.abort("queued-0")
        assert _wait(lambda: waiting[0].done, 5)
        assert isinstance(waiting[0].result, RequestAbortedError)
        assert not waiting[0].steps  # never ran
        for rid in ("busy", "queued-1"):
            core.abort(rid)
        assert _wait(lambda: running.done and waiting[1].done, 60)
        assert not core.abort("queued-0")  # already over


def test_engine_death_fails_running_and_waiting_requests():
    gen = VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=2, parallel_mode="latency")
    try:
        core = gen.core
        param = gen.default_sampling_param.update(
            height=64, width=64, num_frames=5, num_inference_steps=300
        )
        sinks = [_ListSink([]) for _ in range(3)]
        for i, sink in enumerate(sinks):
            submit(core, f"doomed {i}", param, sink)
        assert _wait(lambda: sinks[0].steps, 60)
        threading.Thread(target=gen.executor._procs[1].kill).start()
        assert _wait(lambda: all(s.done for s in sinks), 10)
        assert all(isinstance(s.result, EngineDeadError) for s in sinks)
        with pytest.raises(EngineDeadError):
            gen.generate_video("too late", **SMALL)
    finally:
        gen.shutdown()


def test_throughput_mode_replicas_match_latency_mode():
    with VideoGenerator.from_pretrained(
        DEMO_MODEL_ID, num_gpus=2, parallel_mode="throughput"
    ) as gen:
        outs = gen.generate_video(PROMPTS[:4], seed=9, **SMALL)
        assert {o.plan for o in outs} == {"2 replicas of single rank"}
    with VideoGenerator.from_pretrained(DEMO_MODEL_ID, num_gpus=2, parallel_mode="latency") as gen:
        ref = gen.generate_video(PROMPTS[:4], seed=9, **SMALL)
        assert {o.plan for o in ref} == {"CFG 2"}
    for o, r in zip(outs, ref, strict=True):
        assert _max_diff(o.frames, r.frames) <= 1


def test_offline_list_longer_than_the_queue_bound():
    """An offline list is fed into the bounded queue as requests finish, not refused."""
    with VideoGenerator.from_pretrained(
        DEMO_MODEL_ID, executor="inproc", max_waiting_requests=2, max_batch_size=2
    ) as gen:
        prompts = [f"a kite {i}" for i in range(7)]
        outputs = gen.generate_video(
            prompts, height=32, width=32, num_frames=1, num_inference_steps=2
        )
    assert [o.prompt for o in outputs] == prompts
    assert all(o.frames.shape == (1, 32, 32, 3) for o in outputs)
