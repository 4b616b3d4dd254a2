"""The benchmark runner (CPU, with stand-in steps): statuses, the time budget, one entry per
benchmark kept across runs, the environment it gives its children; and the pytest
``--results-json`` option the gpu-tests suite stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run
from benchmarks.provenance import REPO, gpu_kind
from benchmarks.suites import Step


def _runner(tmp_path: Path, budget: float | None = None) -> run.Runner:
    args = run.parse_args(["kernels", "--device", "cpu", "--out-dir", str(tmp_path),
                           "--log-dir", str(tmp_path / "logs")])  # fmt: skip
    args.budget_s = budget
    runner = run.Runner(args)
    runner.deadline = None if budget is None else time.monotonic() + budget
    return runner


def _step(code: str) -> Step:
    """A step running ``code`` with ``OUT`` bound to the JSON path the runner gives."""
    return Step("fake", [sys.executable, "-c", f"import json, os, sys; OUT = sys.argv[1]; {code}",
                         "{out}"])  # fmt: skip


def test_a_step_that_writes_and_exits_cleanly_is_complete(tmp_path):
    entry = _runner(tmp_path).run_one("kernels", _step("json.dump({'x': 1}, open(OUT, 'w'))"))
    assert entry["status"] == "complete" and entry["result"] == {"x": 1}
    silent = _runner(tmp_path).run_one("kernels", _step("pass"))
    assert silent["status"] == "failed" and silent["reason"] == "it wrote no result"


def test_a_step_that_fails_keeps_what_it_wrote_and_its_output(tmp_path):
    code = "json.dump({'x': 2}, open(OUT, 'w')); print('boom'); sys.exit(3)"
    runner = _runner(tmp_path)
    entry = runner.run_one("kernels", _step(code))
    assert entry["status"] == "partial" and entry["result"] == {"x": 2}
    assert entry["reason"] == "exit code 3" and "boom" in entry["log_tail"]
    assert runner.failed
    assert _runner(tmp_path).run_one("kernels", _step("sys.exit(1)"))["status"] == "failed"


def test_the_budget_stops_a_step_and_keeps_its_partial_result(tmp_path):
    code = "json.dump({'x': 3}, open(OUT, 'w')); import time; time.sleep(60)"
    start = time.monotonic()
    entry = _runner(tmp_path, budget=8.0).run_one("kernels", _step(code))
    assert time.monotonic() - start < 30
    assert entry["status"] == "partial" and entry["reason"] == "stopped at the time budget"
    assert entry["result"] == {"x": 3}


def test_no_step_starts_once_the_budget_is_spent(tmp_path):
    entry = _runner(tmp_path, budget=1.0).run_one("kernels", _step("open(OUT, 'w').write('{}')"))
    assert entry["status"] == "skipped" and "budget" in entry["reason"]


def test_children_inherit_the_nccl_rules(tmp_path, monkeypatch):
    for key in run.RUN_ENV:
        monkeypatch.setenv(key, "stale")  # restored after the test
    monkeypatch.setattr(run, "run_step", _capture_env(tmp_path))
    monkeypatch.setattr(sys, "argv", ["run"])
    monkeypatch.setattr(run, "SUITES", {"kernels": lambda ctx: [_step("pass")]})
    run.main(["kernels", "--device", "cpu", "--out-dir", str(tmp_path), "--log-dir",
              str(tmp_path / "logs")])  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["env.json", "kernels_cpu.json"]
    seen = json.loads((tmp_path / "env.json").read_text())
    assert {k: seen[k] for k in run.RUN_ENV} == run.RUN_ENV


def _capture_env(tmp_path: Path):
    def fake(argv, timeout_s, log_path):
        target = str(tmp_path / "env.json")
        code = f"import json, os; json.dump(dict(os.environ), open({target!r}, 'w'))"
        subprocess.run([sys.executable, "-c", code], check=True)
        return 0, ""

    return fake


def test_the_suite_file_keeps_the_latest_entry_of_each_benchmark(tmp_path):
    path = run.result_path(tmp_path, "gpu-tests", "h200x2")
    assert path.name == "gpu_tests_h200x2.json"
    run.merge_entry(path, "gpu-tests", "h200x2", {"date": "1"}, "a", {"status": "complete"})
    run.merge_entry(path, "gpu-tests", "h200x2", {"date": "2"}, "b", {"status": "failed"})
    run.merge_entry(path, "gpu-tests", "h200x2", {"date": "3"}, "a", {"status": "partial"})
    data = json.loads(path.read_text())
    assert data["benchmarks"] == {"a": {"status": "partial"}, "b": {"status": "failed"}}
    assert data["environment"] == {"date": "3"} and data["suite"] == "gpu-tests"


@pytest.mark.parametrize(
    "names, kind",
    [([], "cpu"), (["NVIDIA H200"], "h200"), (["NVIDIA H200"] * 4, "h200x4"),
     (["NVIDIA A100-SXM4-80GB"], "a100")],
)  # fmt: skip
def test_gpu_kind_names_the_machine(names, kind):
    assert gpu_kind(names) == kind


def test_pytest_results_json_records_each_test(tmp_path):
    out = tmp_path / "results.json"
    module = "tests/test_benchmark_report.py"
    tests = [f"{module}::test_no_results_says_how_to_make_them",
             f"{module}::test_missing_or_misplaced_markers_are_refused"]  # fmt: skip
    env = {**os.environ, "FASTVIDEO_COMMIT": "cafe", "FASTVIDEO_DIRTY": "1"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                    "--results-json", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip
    data = json.loads(out.read_text())
    assert data["commit"] == "cafe" and data["dirty"] is True
    assert data["counts"] == {"passed": 4}
    assert {t["test"].split("[")[0] for t in data["tests"]} == set(tests)
    assert all(t["outcome"] == "passed" and t["duration_s"] >= 0 for t in data["tests"])


def test_gpu_idle_counts_the_gaps_between_kernels_and_names_the_launch_waited_for():
    from benchmarks.latency import gpu_idle

    # Microseconds: an overlap (no gap), a 30 us gap before "flash_fwd", 10 before "gemm".
    spans = [(0, 100, "gemm"), (50, 120, "norm"), (150, 400, "flash_fwd"), (410, 500, "gemm")]
    got = gpu_idle(spans)
    assert got["gpu_span_ms"] == pytest.approx(0.5)
    assert got["gpu_idle_ms"] == pytest.approx(0.04)
    assert [(g["name"], g["gaps"]) for g in got["idle_before"]] == [("flash_fwd", 1), ("gemm", 1)]
    assert got["idle_before"][0]["ms"] == pytest.approx(0.03)
    assert gpu_idle([])["gpu_idle_ms"] == 0.0
