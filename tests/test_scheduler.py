"""The request scheduler: ordering, batching, replicas, modes, aborts, failures, limits.

Pure Python and fast: no model, no torch in the code under test.
"""

from __future__ import annotations

import ast
import logging
import random
import time
from collections.abc import Hashable, Iterator
from pathlib import Path

import pytest

from fastvideo.scheduler import (
    Batch,
    Mode,
    QueueFullError,
    RequestState,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)

_clock = iter(range(1, 10**9))


def req(request_id: str, key: Hashable = "k", priority: int = 0) -> ScheduledRequest:
    # A strictly increasing fake clock: two requests made back to back could otherwise
    # share a time.monotonic() reading, and these tests must not depend on the tie-break.
    return ScheduledRequest(request_id, key, priority=priority, arrival=float(next(_clock)))


def make(**config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]


def drain_ids(sched: Scheduler) -> list[list[str]]:
    """Schedule and finish one batch at a time; the request ids of each batch in order."""
    order = []
    while sched.has_unfinished:
        batches = sched.schedule()
        assert batches, "work is waiting but nothing was scheduled"
        for batch in batches:
            order.append(batch.request_ids)
            sched.finish(batch.batch_id)
    return order


@pytest.fixture
def scheduler_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    # The fastvideo logger tree does not propagate to the root logger, where caplog listens;
    # pytest >= 9 attaches caplog to such loggers itself, older versions need a hand.
    tree = logging.getLogger("fastvideo")
    attach = not tree.propagate and caplog.handler not in tree.handlers
    if attach:
        tree.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="fastvideo.scheduler.scheduler")
    yield caplog
    if attach:
        tree.removeHandler(caplog.handler)


# --- ordering ---------------------------------------------------------------------------
def test_fifo_order() -> None:
    sched = make()
    for i in range(5):
        sched.add(req(f"r{i}"))
    assert drain_ids(sched) == [["r0"], ["r1"], ["r2"], ["r3"], ["r4"]]


def test_lower_priority_value_first_with_fifo_ties() -> None:
    sched = make()
    for rid, prio in [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", 2), ("f", -1)]:
        sched.add(req(rid, priority=prio))
    assert [ids[0] for ids in drain_ids(sched)] == ["f", "b", "d", "c", "a", "e"]


def test_equal_arrival_falls_back_to_insertion_order() -> None:
    sched = make()
    for rid in ["x", "y", "z"]:
        sched.add(ScheduledRequest(rid, "k", arrival=5.0))
    assert drain_ids(sched) == [["x"], ["y"], ["z"]]


# --- batching ---------------------------------------------------------------------------
def test_batches_group_equal_keys_up_to_max_batch_size_best_first() -> None:
    sched = make(max_batch_size=3)
    sched.add(req("a1", "A"))
    sched.add(req("b1", "B"))
    sched.add(req("a2", "A"))
    sched.add(req("a3", "A", priority=-1))  # best of all: heads the first batch
    sched.add(req("a4", "A"))
    sched.add(req("b2", "B"))
    (first,) = sched.schedule()
    assert first.request_ids == ["a3", "a1", "a2"]
    assert sched.num_running == 3
    assert sched.num_waiting == 3  # b1, a4, b2 left for later
    sched.finish(first.batch_id)
    (second,) = sched.schedule()
    assert second.request_ids == ["b1", "b2"]  # b1 is now the head; a4 cannot join
    sched.finish(second.batch_id)
    assert drain_ids(sched) == [["a4"]]


def test_head_with_other_key_is_not_starved_by_later_compatible_group() -> None:
    sched = make(max_batch_size=4)
    sched.add(req("lonely", "B"))
    for i in range(6):
        sched.add(req(f"a{i}", "A"))
    assert drain_ids(sched) == [["lonely"], ["a0", "a1", "a2", "a3"], ["a4", "a5"]]


def test_scheduled_requests_are_running_with_batch_id() -> None:
    sched = make(max_batch_size=2)
    r1, r2 = req("r1"), req("r2")
    sched.add(r1)
    sched.add(r2)
    (batch,) = sched.schedule()
    assert isinstance(batch, Batch)
    assert batch.requests == (r1, r2)
    assert batch.mode is Mode.LATENCY and batch.replica == 0
    assert r1.state is RequestState.RUNNING and r1.batch_id == batch.batch_id
    assert sched.running_batches == [batch]


# --- replicas ---------------------------------------------------------------------------
def test_busy_replica_gets_no_new_batch_and_freed_replica_gets_the_next() -> None:
    sched = make(mode="throughput", throughput_replicas=2)
    for i in range(4):
        sched.add(req(f"r{i}"))
    first = sched.schedule()
    assert [(b.replica, b.request_ids) for b in first] == [(0, ["r0"]), (1, ["r1"])]
    assert sched.free_replicas == []
    assert sched.schedule() == []  # every replica busy
    sched.finish(first[1].batch_id)
    assert sched.free_replicas == [1]
    (nxt,) = sched.schedule()
    assert (nxt.replica, nxt.request_ids, nxt.mode) == (1, ["r2"], Mode.THROUGHPUT)
    assert len({b.batch_id for b in [*first, nxt]}) == 3  # batch ids are unique


def test_latency_mode_runs_one_batch_at_a_time() -> None:
    sched = make(mode="latency", throughput_replicas=4)
    for i in range(3):
        sched.add(req(f"r{i}", key=i))
    (batch,) = sched.schedule()
    assert batch.replica == 0 and sched.free_replicas == []
    assert sched.schedule() == []


# --- modes ------------------------------------------------------------------------------
def test_auto_goes_to_throughput_only_with_a_deep_queue_and_nothing_running() -> None:
    sched = make(throughput_replicas=2, throughput_queue_depth=3)
    assert sched.mode is Mode.LATENCY
    sched.add(req("r0", key=0))
    (running,) = sched.schedule()
    assert sched.mode is Mode.LATENCY
    for i in range(1, 5):
        sched.add(req(f"r{i}", key=i))
    assert sched.schedule() == []  # deep queue, but a latency batch still runs
    assert sched.mode is Mode.LATENCY
    sched.finish(running.batch_id)
    batches = sched.schedule()  # idle with 4 waiting >= 3
    assert sched.mode is Mode.THROUGHPUT
    assert [(b.replica, b.mode) for b in batches] == [(0, Mode.THROUGHPUT), (1, Mode.THROUGHPUT)]
    # The queue is now short (2 < 3), but throughput batches run: the mode holds.
    sched.finish(batches[0].batch_id)
    (nxt,) = sched.schedule()
    assert sched.mode is Mode.THROUGHPUT and nxt.replica == 0
    sched.finish(batches[1].batch_id)
    sched.finish(nxt.batch_id)
    (last,) = sched.schedule()  # idle, 1 waiting: back to latency
    assert sched.mode is Mode.LATENCY and last.mode is Mode.LATENCY and last.replica == 0


def test_auto_with_one_replica_stays_in_latency() -> None:
    sched = make(throughput_replicas=1, throughput_queue_depth=1)
    for i in range(10):
        sched.add(req(f"r{i}"))
    sched.schedule()
    assert sched.mode is Mode.LATENCY


def test_default_queue_depth_is_replica_count_but_at_least_two() -> None:
    assert SchedulerConfig(throughput_replicas=1).queue_depth == 2
    assert SchedulerConfig(throughput_replicas=4).queue_depth == 4
    assert SchedulerConfig(throughput_replicas=4, throughput_queue_depth=9).queue_depth == 9


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_fixed_modes_never_switch(mode: str) -> None:
    sched = make(mode=mode, throughput_replicas=2, throughput_queue_depth=2)
    expected = Mode(mode)
    assert sched.mode is expected
    for n_waiting in [0, 1, 10]:
        for i in range(n_waiting):
            sched.add(req(f"{n_waiting}-{i}", key=i))
        for batch in sched.schedule():
            assert batch.mode is expected
        assert sched.mode is expected
        for batch in sched.running_batches:
            sched.finish(batch.batch_id)
        drain_ids(sched)


def test_mode_change_is_logged_once(scheduler_log: pytest.LogCaptureFixture) -> None:
    sched = make(throughput_replicas=2, throughput_queue_depth=2)
    for i in range(6):
        sched.add(req(f"r{i}", key=i))
    drain_ids(sched)  # several idle schedule() calls while the queue stays deep
    changes = [r for r in scheduler_log.records if "mode" in r.getMessage()]
    assert len(changes) == 1
    assert changes[0].levelno == logging.INFO
    assert "throughput" in changes[0].getMessage() and "2 replica" in changes[0].getMessage()
    sched.schedule()  # empty and idle: back to latency, one more line
    changes = [r for r in scheduler_log.records if "mode" in r.getMessage()]
    assert len(changes) == 2 and "latency" in changes[1].getMessage()


# --- abort ------------------------------------------------------------------------------
def test_abort_waiting_removes_it_and_it_is_never_scheduled() -> None:
    sched = make(max_batch_size=4)
    for rid in ["a", "b", "c"]:
        sched.add(req(rid))
    aborted = sched.abort("b")
    assert aborted is not None and aborted.state is RequestState.ABORTED
    assert sched.num_waiting == 2
    assert drain_ids(sched) == [["a", "c"]]
    assert sched.get("b") is aborted
    assert sched.abort("b") is None  # already final


def test_abort_running_requests_stop_and_finish_reports_it() -> None:
    sched = make(max_batch_size=2)
    sched.add(req("a"))
    sched.add(req("b"))
    (batch,) = sched.schedule()
    running = sched.abort("a")
    assert running is not None
    assert running.abort_requested and running.state is RequestState.RUNNING
    done = sched.finish(batch.batch_id, aborted=["a"])
    assert {r.request_id: r.state for r in done} == {
        "a": RequestState.ABORTED,
        "b": RequestState.FINISHED,
    }
    assert not sched.has_unfinished and sched.free_replicas == [0]


def test_abort_unknown_returns_none() -> None:
    assert make().abort("nope") is None


# --- finish / fail ----------------------------------------------------------------------
def test_finish_sets_failed_aborted_and_finished_states() -> None:
    sched = make(max_batch_size=3)
    for rid in ["ok", "bad", "gone"]:
        sched.add(req(rid))
    (batch,) = sched.schedule()
    boom = RuntimeError("out of memory")
    done = sched.finish(batch.batch_id, failed={"bad": boom, "other-batch": boom}, aborted=["gone"])
    states = {r.request_id: (r.state, r.error) for r in done}
    assert states == {
        "ok": (RequestState.FINISHED, None),
        "bad": (RequestState.FAILED, boom),
        "gone": (RequestState.ABORTED, None),
    }
    assert all(r.state.is_final for r in done)
    with pytest.raises(KeyError):
        sched.finish(batch.batch_id)  # already finished


def test_fail_all_empties_everything() -> None:
    sched = make(mode="throughput", throughput_replicas=2)
    for i in range(5):
        sched.add(req(f"r{i}"))
    sched.schedule()
    dead = RuntimeError("engine died")
    failed = sched.fail_all(dead)
    assert sorted(r.request_id for r in failed) == [f"r{i}" for i in range(5)]
    assert all(r.state is RequestState.FAILED and r.error is dead for r in failed)
    assert (sched.num_waiting, sched.num_running, sched.running_batches) == (0, 0, [])
    assert not sched.has_unfinished and sched.free_replicas == [0, 1]
    assert sched.schedule() == []
    sched.add(req("after"))  # the scheduler is usable again
    assert [b.request_ids for b in sched.schedule()] == [["after"]]


# --- limits and ids ---------------------------------------------------------------------
def test_queue_full_then_room_again_after_scheduling() -> None:
    sched = make(max_waiting_requests=3)
    for i in range(3):
        sched.add(req(f"r{i}"))
    with pytest.raises(QueueFullError, match="max_waiting_requests") as info:
        sched.add(req("r3"))
    assert "3" in str(info.value)
    sched.schedule()  # one request leaves the queue
    sched.add(req("r3"))
    assert sched.num_waiting == 3


def test_duplicate_id_rejected_until_final() -> None:
    sched = make()
    sched.add(req("same"))
    with pytest.raises(ValueError, match="same"):
        sched.add(req("same"))
    (batch,) = sched.schedule()
    with pytest.raises(ValueError, match="same"):
        sched.add(req("same"))  # running counts too
    old = sched.finish(batch.batch_id)[0]
    new = req("same")
    sched.add(new)  # a final request's id may be reused
    assert sched.get("same") is new and old.state is RequestState.FINISHED


def test_history_is_bounded() -> None:
    sched = make(max_batch_size=10, max_finished_history=3)
    for i in range(5):
        sched.add(req(f"r{i}"))
    drain_ids(sched)
    assert [sched.get(f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_waiting_requests", -1),
        ("throughput_replicas", 0),
        ("throughput_queue_depth", 0),
        ("max_batch_size", True),
        ("max_batch_size", 2.0),
        ("mode", "fast"),
        ("max_finished_history", -1),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})  # type: ignore[arg-type]


def test_request_state_is_final() -> None:
    assert [s.value for s in RequestState if s.is_final] == ["finished", "aborted", "failed"]


# --- purity and speed -------------------------------------------------------------------
def test_scheduler_imports_no_torch() -> None:
    package = Path(__file__).resolve().parents[1] / "fastvideo" / "scheduler"
    files = sorted(package.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "request.py", "scheduler.py"}
    banned = {"torch", "numpy"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
                if name.startswith("fastvideo") and not name.startswith("fastvideo.scheduler"):
                    assert name == "fastvideo.logger", f"{path.name} imports {name}"


def test_stale_heap_entries_stay_bounded() -> None:
    # Aborts and same-key filling leave stale heap entries; rebuilds must keep them bounded.
    sched = make(max_batch_size=4, max_waiting_requests=10_000)
    for i in range(3000):
        sched.add(req(f"r{i}", key=i % 3, priority=-(i % 7)))
    for i in range(0, 3000, 2):
        sched.abort(f"r{i}")
    seen = [rid for ids in drain_ids(sched) for rid in ids]
    assert sorted(seen) == sorted(f"r{i}" for i in range(1, 3000, 2))
    assert len(sched._heap) <= 64 and sched._key_entries <= 64


def test_matches_a_naive_reference_under_random_load() -> None:
    # A sort-everything reference of the documented rule, against random adds, aborts,
    # schedules and finishes; catches heap bookkeeping bugs (stale entries, rebuilds, reuse).
    rng = random.Random(1)
    sched = make(max_batch_size=3, mode="throughput", throughput_replicas=2)
    shadow: list[tuple[int, int, ScheduledRequest]] = []  # (priority, insertion, request)
    for step in range(3000):
        op = rng.random()
        if op < 0.5 and sched.num_waiting < 200:
            request = ScheduledRequest(f"r{rng.randrange(400)}", rng.randrange(3), arrival=0.0)
            request.priority = rng.randrange(3)
            live = sched.get(request.request_id)
            if live is not None and not live.state.is_final:
                continue  # ids are reused only once final
            sched.add(request)
            shadow.append((request.priority, step, request))
        elif op < 0.6 and shadow:
            victim = rng.choice(shadow)
            sched.abort(victim[2].request_id)
            shadow.remove(victim)
        elif op < 0.8:
            for batch in sched.schedule():
                shadow.sort(key=lambda t: (t[0], t[1]))
                head = shadow[0][2]
                same = [t[2] for t in shadow if t[2].batch_key == head.batch_key][:3]
                assert list(batch.requests) == same
                shadow = [t for t in shadow if t[2] not in same]
        elif sched.running_batches:
            sched.finish(rng.choice(sched.running_batches).batch_id)
        assert sched.num_waiting == len(shadow)


def test_add_schedule_finish_overhead() -> None:
    rng = random.Random(0)
    sched = make(max_batch_size=4, mode="throughput", throughput_replicas=2)
    n = 2000
    requests = [req(f"r{i}", key=rng.randrange(4), priority=rng.randrange(3)) for i in range(n)]
    start = time.perf_counter()
    for i, request in enumerate(requests):
        sched.add(request)
        if i % 3 == 2:  # let a few requests pile up so batches actually fill
            for batch in sched.schedule():
                sched.finish(batch.batch_id)
    drain_ids(sched)
    elapsed = time.perf_counter() - start
    assert all(r.state is RequestState.FINISHED for r in requests)
    print(f"scheduler overhead: {elapsed / n * 1e6:.1f} us per request ({n} requests)")
    assert elapsed < 1.0
