"""The one benchmark runner: run suites one after another under a time budget, and write
each suite's results as soon as they exist.

    python -m benchmarks.run latency models --budget-s 540 --out-dir benchmarks/results
    python -m benchmarks.run gpu-tests kernels latency models --device cpu   # CPU smoke run

Suites: gpu-tests, kernels, latency, models, scaling, throughput, load, memory (see
``benchmarks/suites.py``). Each suite's JSON is ``<out-dir>/<suite>_<gpu-kind>.json``
(e.g. ``latency_h200.json``) and holds the latest result of each of its benchmarks with
its status (complete / partial / failed / skipped), beside the environment of the run
(commit and dirty flag, GPUs, torch, date, command). A step that outlives the budget is
stopped (its process group: SIGTERM, then SIGKILL) and what it had written is kept as
``partial``. Each step's own JSON and full log go to ``--log-dir`` (default
``/tmp/fastvideo-bench-logs``), so the out-dir holds only the suite files (a lent machine
sends back few files); a step that did not complete keeps its last lines of output in
the suite file.

The runner sets the lent machines' NCCL rules (NVLink multicast off) and unbuffered
output in its own environment, so every process it starts, and theirs, inherit them.
Where git is unavailable set ``FASTVIDEO_COMMIT`` / ``FASTVIDEO_DIRTY``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from benchmarks.provenance import REPO, gpu_kind, gpu_names
from benchmarks.suites import CHECKPOINT_ARCH, SUITES, Context, Step

RUN_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "PYTHONUNBUFFERED": "1",
}
RUN_DEFAULTS = {"FASTVIDEO_CACHE_DIR": "/tmp/fastvideo-cache", "HF_HUB_OFFLINE": "1"}
MIN_START_S = {"cuda": 30.0, "cpu": 5.0}  # less budget than this left: skip the step
KILL_GRACE_S = 15.0
NOISE = re.compile(r"it/s\]|s/it\]|Loading|Writing model|[Ww]arning|deprecat|^wrote |^\s*$")


def result_path(out_dir: Path, suite: str, kind: str) -> Path:
    return out_dir / f"{suite.replace('-', '_')}_{kind}.json"


def merge_entry(path: Path, suite: str, kind: str, env: dict, name: str, entry: dict) -> None:
    """Put one benchmark's entry into the suite file (the other entries stay)."""
    from benchmarks.common import write_result

    data: dict[str, Any] = {"suite": suite, "gpu_kind": kind, "benchmarks": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass  # a broken file is replaced
    data.update(suite=suite, gpu_kind=kind, environment=env)
    data.setdefault("benchmarks", {})[name] = entry
    write_result(path, data)


def _pump(stream: TextIO, log: TextIO, tail: list[str]) -> None:
    """Child output -> the full log, the console (without progress-bar noise), a tail."""
    for line in stream:
        log.write(line)
        tail.append(line)
        del tail[:-200]
        if not NOISE.search(line):
            sys.stdout.write(line)
            sys.stdout.flush()


def run_step(argv: list[str], timeout_s: float, log_path: Path) -> tuple[int | None, str]:
    """(exit code or None when stopped at the timeout, last lines of output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: stopped as a whole
        )  # fmt: skip
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, tail), daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            code = None
            _stop(proc)
        reader.join(timeout=10)
    return code, "".join(tail[-60:])


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        names = gpu_names()
        self.device = args.device or ("cuda" if names else "cpu")
        gpus = names if self.device == "cuda" else []
        self.ctx = Context(self.device, len(gpus))
        self.kind = args.gpu_kind or ("cpu" if self.device == "cpu" else gpu_kind(gpus))
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None
        self.failed = False
        self._checkpoint_ready = False

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def run_suite(self, suite: str) -> None:
        from benchmarks.common import environment

        env = environment()
        path = result_path(self.args.out_dir, suite, self.kind)
        for step in SUITES[suite](self.ctx):
            print(f"== {suite}/{step.name} ({self.remaining():.0f} s of budget left)", flush=True)
            entry = self.run_one(suite, step)
            merge_entry(path, suite, self.kind, env, step.name, entry)
            print(f"== {suite}/{step.name}: {entry['status']} in {entry['seconds']:.0f} s",
                  flush=True)  # fmt: skip

    def run_one(self, suite: str, step: Step) -> dict[str, Any]:
        start = time.monotonic()
        entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "command": None}
        if step.skip is not None:
            return {**entry, "reason": step.skip}
        if self.remaining() < MIN_START_S[self.device]:
            return {**entry, "reason": f"time budget spent ({self.args.budget_s} s)"}
        if step.checkpoint and not self._ensure_checkpoint():
            return {**entry, "status": "failed", "reason": "writing the random checkpoint failed"}
        out = self.args.log_dir / f"{suite}_{self.kind}_{step.name}.json"
        out.unlink(missing_ok=True)
        argv = [a.replace("{out}", str(out)) for a in step.argv]
        code, tail = run_step(argv, self.remaining(), out.with_suffix(".log"))
        result = json.loads(out.read_text()) if out.is_file() else None
        status = "failed" if result is None else "complete" if code == 0 else "partial"
        entry = {"status": status, "seconds": time.monotonic() - start,
                 "command": " ".join(argv[1:]), "result": result}  # fmt: skip
        if status != "complete":
            self.failed = True
            entry["reason"] = (
                "stopped at the time budget" if code is None
                else f"exit code {code}" if code else "it wrote no result"
            )  # fmt: skip
            entry["log_tail"] = tail
        return entry

    def _ensure_checkpoint(self) -> bool:
        if self._checkpoint_ready:
            return True
        argv = [sys.executable, "-m", "benchmarks.common", str(self.ctx.checkpoint),
                CHECKPOINT_ARCH[self.device], self.device]  # fmt: skip
        log = self.args.log_dir / f"checkpoint_{self.kind}.log"
        code, tail = run_step(argv, self.remaining(), log)
        if code != 0:
            print(tail, flush=True)
        self._checkpoint_ready = code == 0
        return self._checkpoint_ready


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("suites", nargs="+", choices=sorted(SUITES), metavar="SUITE",
                   help=f"one or more of: {', '.join(SUITES)}")  # fmt: skip
    p.add_argument("--budget-s", type=float, help="wall-clock budget for all suites together")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/fastvideo-bench-logs"),
                   help="each step's own JSON and full log")  # fmt: skip
    p.add_argument("--device", choices=["cuda", "cpu"], help="cpu: smoke run at toy sizes")
    p.add_argument("--gpu-kind", help="machine name in the file names (default: from the GPUs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir, args.log_dir = args.out_dir.resolve(), args.log_dir.resolve()
    os.environ.update(RUN_ENV)
    for key, value in RUN_DEFAULTS.items():
        os.environ.setdefault(key, value)
    runner = Runner(args)
    print(f"benchmarks on {runner.kind} ({runner.device}): {' '.join(args.suites)}; budget "
          f"{args.budget_s or 'none'} s; results in {args.out_dir}", flush=True)  # fmt: skip
    for suite in args.suites:
        runner.run_suite(suite)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
