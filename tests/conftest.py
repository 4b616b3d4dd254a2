"""Shared fixtures: tiny diffusers-built checkpoints, the demo model in a private cache."""

from __future__ import annotations

import compileall
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_models import TINY_A, TINY_B, build_diffusers_pipeline

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--results-json",
        metavar="PATH",
        help="write each test's outcome and duration, and the commit, as JSON to PATH",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Keep the demo model out of the user's real cache, and never reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A suite started in the background (nohup, ``&`` without job control) has SIGINT
    # ignored, and every process it starts would inherit that (Python then installs no
    # KeyboardInterrupt handler): the Ctrl-C tests need a handled SIGINT here.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.dont_write_bytecode:
        # With PYTHONDONTWRITEBYTECODE (set on the CI machines) every worker process the
        # tests start would compile the package's sources again, ~0.6 s each: compile them
        # once. A stale file is never used (Python checks the source's mtime).
        for package in ("fastvideo", "tests"):
            compileall.compile_dir(REPO / package, quiet=1)
    path = config.getoption("--results-json", default=None)
    if path:
        config.pluginmanager.register(ResultsJson(Path(path)), "results-json")


class ResultsJson:
    """``--results-json PATH``: one record per test (outcome, seconds, skip reason or
    failure summary) and the commit it ran on, written when the session ends."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = self.tests.setdefault(
            report.nodeid, {"test": report.nodeid, "outcome": "passed", "duration_s": 0.0}
        )
        record["duration_s"] += report.duration
        if report.skipped:
            record["outcome"] = "skipped"
            if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
                record["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            record["outcome"] = "failed" if report.when == "call" else "error"
            record["reason"] = str(report.longrepr).strip().splitlines()[-1][:500]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        from benchmarks.provenance import git_state, gpu_names

        tests = list(self.tests.values())
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        payload = {
            "benchmark": "gpu_tests", **git_state(), "gpus": gpu_names(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start)),
            "torch": torch.__version__, "exit_status": int(exitstatus),
            "duration_s": time.time() - self.start, "counts": counts, "tests": tests,
        }  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(payload, indent=2) + "\n")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fastvideo-cache")
    os.environ["FASTVIDEO_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_a(tmp_path_factory: pytest.TempPathFactory):
    """(folder, diffusers WanPipeline) of tiny config A (UniPC, 6 heads)."""
    folder = tmp_path_factory.mktemp("tiny-a")
    return folder, build_diffusers_pipeline(TINY_A, folder)


@pytest.fixture(scope="session")
def tiny_b(tmp_path_factory: pytest.TempPathFactory):
    """(folder, diffusers WanPipeline) of tiny config B (Euler, 4 heads, no cross norm)."""
    folder = tmp_path_factory.mktemp("tiny-b")
    return folder, build_diffusers_pipeline(TINY_B, folder)


def wire_batch(gen, prompt, param, batch_id=None):
    """The GenerateBatch the engine would send for one prompt (validated, latency-mode
    plan), for tests that drive the executor directly."""
    import uuid

    from fastvideo.scheduler import Mode
    from fastvideo.wire.messages import GenerateBatch

    item = gen.core.build_item(prompt, param, uuid.uuid4().hex)
    plan = gen.core.plan_for(item.guidance_scale > 1.0, Mode.LATENCY)
    return GenerateBatch(batch_id or f"test-{uuid.uuid4().hex[:8]}", [item], plan)


def send_raw(executor, rank: int, frames: list) -> None:
    """Put raw frames on one worker's request socket (hostile-input tests)."""
    with executor._lock:
        executor._inputs[rank].send_multipart(frames)


def submit(core, prompt, param, sink, request_id=None, priority=0) -> str:
    """Build, validate and queue one request on an EngineCore (what the APIs do)."""
    return core.submit(core.new_request(prompt, param, sink, request_id), priority)


@pytest.fixture(scope="module")
def tiny_gen(tiny_a):
    """One in-process generator on the tiny_a checkpoint, shared by the test module."""
    from fastvideo import VideoGenerator

    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        yield gen
