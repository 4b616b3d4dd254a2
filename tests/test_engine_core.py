"""EngineCore against a scripted executor (no workers): whatever comes back for a batch (a
result missing items, frames of the wrong shape, an error) ends that batch's requests and
nothing else; a raising caller sink cannot stop the core; batch keys and priorities reach
the scheduler."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from fastvideo import DEMO_MODEL_ID, PipelineConfig, RequestFailedError, VideoOutput
from fastvideo.engine.core import EngineCore
from fastvideo.engine.model_info import resolve_model
from fastvideo.executor.base import Executor
from fastvideo.wire.messages import BatchResult
from fastvideo.wire.validation import batch_key

TINY = dict(height=16, width=16, num_frames=1, num_inference_steps=2)


class ScriptedExecutor(Executor):
    """Hands every batch to the test, which completes its future."""

    def __init__(self):
        self.batches: list = []
        self.cond = threading.Condition()

    def submit(self, batch, on_progress=None):
        future: Future = Future()
        with self.cond:
            self.batches.append((batch, future))
            self.cond.notify_all()
        return future

    def next_batch(self, timeout: float = 5.0):
        with self.cond:
            assert self.cond.wait_for(lambda: self.batches, timeout), "no batch was launched"
            return self.batches.pop(0)

    def abort(self, batch_id, item_ids):
        pass

    def shutdown(self):
        pass

    @property
    def is_alive(self):
        return True


class Sink:
    def __init__(self, raise_on_finish: bool = False):
        self.result, self.done, self.raise_on_finish = None, threading.Event(), raise_on_finish

    def progress(self, event):
        pass

    def finish(self, output):
        self.result = output
        self.done.set()
        if self.raise_on_finish:
            raise RuntimeError("a caller's sink failed")

    def fail(self, error):
        self.result = error
        self.done.set()


@pytest.fixture
def core():
    info = resolve_model(DEMO_MODEL_ID)
    config = PipelineConfig(max_batch_size=4).update(**info.variant.pipeline_defaults)
    executor = ScriptedExecutor()
    core = EngineCore(info, config, executor, "cpu")
    yield core, executor
    core.shutdown()


def _submit(core, prompt, sink, **overrides):
    param = core.default_sampling_param.update(**{**TINY, **overrides})
    return core.submit(core.new_request(prompt, param, sink))


def _frames(n: int, item) -> torch.Tensor:
    return torch.zeros(n, item.num_frames, item.height, item.width, 3, dtype=torch.uint8)


def test_a_result_missing_an_item_fails_that_item_alone(core):
    core, executor = core
    sinks = [Sink(), Sink()]
    param = core.default_sampling_param.update(**TINY)
    requests = [core.new_request(f"p{i}", param.copy(), s) for i, s in enumerate(sinks)]
    assert core.submit_many(requests, partial=False) == 2  # queued together: one batch
    ids = [r.request_id for r in requests]
    batch, future = executor.next_batch()
    assert [i.request_id for i in batch.items] == ids  # one batch of both
    first = batch.items[0]
    future.set_result(BatchResult(batch.batch_id, "p", {}, frames=_frames(1, first),
                                  item_ids=[ids[0]]))  # fmt: skip
    assert all(s.done.wait(5) for s in sinks)
    assert isinstance(sinks[0].result, VideoOutput)
    assert isinstance(sinks[1].result, RequestFailedError)
    assert "did not include" in str(sinks[1].result)


def test_wrong_shaped_frames_fail_the_request_and_the_core_serves_on(core):
    core, executor = core
    sink = Sink()
    _submit(core, "p", sink)
    batch, future = executor.next_batch()
    wrong = torch.zeros(1, 2, 3, 4, 3, dtype=torch.uint8)
    future.set_result(BatchResult(batch.batch_id, "p", {}, frames=wrong,
                                  item_ids=[batch.items[0].request_id]))  # fmt: skip
    assert sink.done.wait(5)
    assert isinstance(sink.result, RequestFailedError) and "shape" in str(sink.result)
    later = Sink()
    _submit(core, "again", later)
    batch, future = executor.next_batch()
    future.set_result(BatchResult(batch.batch_id, "p", {}, frames=_frames(1, batch.items[0]),
                                  item_ids=[batch.items[0].request_id]))  # fmt: skip
    assert later.done.wait(5) and isinstance(later.result, VideoOutput)


def test_a_raising_sink_does_not_stop_the_core(core):
    core, executor = core
    bad, good = Sink(raise_on_finish=True), Sink()
    _submit(core, "bad", bad, height=32)  # different size: its own batch
    batch, future = executor.next_batch()
    future.set_result(BatchResult(batch.batch_id, "p", {}, frames=_frames(1, batch.items[0]),
                                  item_ids=[batch.items[0].request_id]))  # fmt: skip
    assert bad.done.wait(5)
    _submit(core, "good", good)
    batch, future = executor.next_batch()
    future.set_result(BatchResult(batch.batch_id, "p", {}, frames=_frames(1, batch.items[0]),
                                  item_ids=[batch.items[0].request_id]))  # fmt: skip
    assert good.done.wait(5) and isinstance(good.result, VideoOutput)


def test_a_failed_future_fails_its_batch_only(core):
    core, executor = core
    first, second = Sink(), Sink()
    _submit(core, "a", first, height=32)
    batch, future = executor.next_batch()
    _submit(core, "b", second)
    future.set_exception(RuntimeError("boom"))
    assert first.done.wait(5) and isinstance(first.result, RuntimeError)
    batch, future = executor.next_batch()
    future.set_result(BatchResult(batch.batch_id, "p", {}, frames=_frames(1, batch.items[0]),
                                  item_ids=[batch.items[0].request_id]))  # fmt: skip
    assert second.done.wait(5) and isinstance(second.result, VideoOutput)


@pytest.mark.parametrize(
    "field, a, b",
    [
        ("height", 16, 32),
        ("width", 16, 32),
        ("num_frames", 1, 5),
        ("num_inference_steps", 2, 3),
        ("guidance_scale", 1.0, 5.0),  # CFG off vs on
        ("output_type", "np", "latent"),
        ("cache", None, "teacache"),
        ("cache_thresh", 0.1, 0.2),
        ("max_sequence_length", 64, 128),
    ],
)
def test_batch_key_separates_what_cannot_share_a_forward(core, field, a, b):
    core, _ = core
    base = dict(TINY, cache="teacache") if field == "cache_thresh" else dict(TINY)
    items = [
        core.build_item("p", core.default_sampling_param.update(**{**base, field: v}), f"r{i}")
        for i, v in enumerate((a, b))
    ]
    spec = core.info.spec
    assert batch_key(spec, items[0]) != batch_key(spec, items[1]), field


def test_batch_key_lets_per_item_fields_share_a_forward(core):
    core, _ = core
    spec = core.info.spec
    a = core.build_item("p", core.default_sampling_param.update(**TINY, seed=1), "a")
    b = core.build_item("q", core.default_sampling_param.update(
        **TINY, seed=2, guidance_scale=7.0, negative_prompt="blurry"), "b")  # fmt: skip
    assert batch_key(spec, a) == batch_key(spec, b)


def test_priority_orders_waiting_requests(core):
    core, executor = core
    blocker = Sink()
    _submit(core, "running", blocker, height=48)  # occupies the only replica
    running, running_future = executor.next_batch()
    order = []
    sinks = {}
    for name, prio in (("low", 5), ("high", -1), ("mid", 2)):
        sinks[name] = Sink()
        param = core.default_sampling_param.update(**{**TINY, "height": 32 + 16 * len(sinks)})
        core.submit(core.new_request(name, param, sinks[name]), priority=prio)
    running_future.set_result(BatchResult(running.batch_id, "p", {},
                                          frames=_frames(1, running.items[0]),
                                          item_ids=[running.items[0].request_id]))  # fmt: skip
    for _ in range(3):
        batch, future = executor.next_batch()
        order.append(batch.items[0].prompt)
        future.set_result(BatchResult(batch.batch_id, "p", {}, frames=_frames(1, batch.items[0]),
                                      item_ids=[batch.items[0].request_id]))  # fmt: skip
        time.sleep(0.01)
    assert order == ["high", "mid", "low"]
