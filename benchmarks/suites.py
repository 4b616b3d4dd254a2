"""What each benchmark suite runs: its steps (one command each) at full size on the GPUs,
or at toy sizes on the CPU (``--device cpu``: a smoke run of the same code paths).

Every step writes its result as JSON to the path the runner gives (``{out}`` in argv),
rewriting it as it goes, so a step stopped at the time budget still leaves what it did.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.provenance import REPO

PY = sys.executable
CHECKPOINT_ARCH = {"cuda": "1.3B", "cpu": "tiny"}
DEMO = "fastvideo/wan2.1-t2v-tiny-random"


@dataclass(frozen=True)
class Context:
    device: str  # "cuda" or "cpu"
    gpus: int  # GPUs visible (0 on CPU)

    @property
    def smoke(self) -> bool:
        return self.device == "cpu"

    @property
    def checkpoint(self) -> Path:
        """The random Wan2.1 checkpoint (full-size 1.3B, or tiny on CPU) the steps share."""
        return Path(f"/tmp/fastvideo-bench-wan-{CHECKPOINT_ARCH[self.device]}")


@dataclass(frozen=True)
class Step:
    """One command; ``name`` is its entry in the suite's JSON. ``checkpoint``: needs the
    shared random checkpoint written first. ``skip``: why it cannot run here (or None)."""

    name: str
    argv: list[str]
    checkpoint: bool = False
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _module(name: str, *args: str) -> list[str]:
    return [PY, "-m", f"benchmarks.{name}", *args, "--out", "{out}"]


def gpu_tests(ctx: Context) -> list[Step]:
    argv = [PY, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "tests/test_memory_fit_gpu.py",
            "-q", "-rs", "-p", "no:cacheprovider", "--durations=0",
            "--results-json", "{out}"]  # fmt: skip
    return [Step("pytest", argv)]


def kernels(ctx: Context) -> list[Step]:
    smoke = ["--device", "cpu", "--grid", "3x8x8", "--heads", "2", "--head-dim", "32",
             "--sta", "1x8x8/64x64/3x1x1,1x1x1", "--warmup", "1", "--reps", "1"]  # fmt: skip
    return [Step("attention_kernels", _module("attention_kernels", *(smoke if ctx.smoke else [])))]


def latency(ctx: Context) -> list[Step]:
    args = ["--model", str(ctx.checkpoint)]
    if ctx.smoke:
        args += ["--device", "cpu", "--height", "32", "--width", "32", "--frames", "5",
                 "--steps", "3", "--reps", "1", "--vae-reps", "1", "--compile-backend",
                 "aot_eager", "--executor", "inproc"]  # fmt: skip
    return [Step("latency", _module("latency", *args), checkpoint=True)]


def models(ctx: Context) -> list[Step]:
    return [Step("models", _module("models", *(["--device", "cpu", "--smoke", "--reps", "1"]
                                                if ctx.smoke else [])))]  # fmt: skip


def _scaling_configs(gpus: int) -> str:
    if gpus >= 8:
        return "1,2,4,8,8:ulysses"
    if gpus >= 4:
        return "1,2,4,4:ulysses,4:ring"
    if gpus >= 2:
        return "1,2,2:ulysses,2:ring"
    return "1"


def scaling(ctx: Context) -> list[Step]:
    if ctx.smoke:
        ours = ["--model", DEMO, "--device", "cpu", "--configs", "1,2", "--height", "32",
                "--width", "32", "--frames", "5", "--steps", "2"]  # fmt: skip
        ref = ["--device", "cpu", "--height", "32", "--width", "32", "--frames", "5",
               "--steps", "1", "--e2e-steps", "0"]  # fmt: skip
        procs = 1
    else:
        ours = ["--model", str(ctx.checkpoint), "--configs", _scaling_configs(ctx.gpus),
                "--steps", "3"]  # fmt: skip
        ref, procs = ["--e2e-steps", "0"], ctx.gpus
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                "-m", "benchmarks.diffusers_cp", "--model", str(ctx.checkpoint), *ref,
                "--out", "{out}"]  # fmt: skip
    one_gpu = None if ctx.smoke or ctx.gpus >= 2 else "one GPU visible: nothing to scale"
    return [
        Step("parallel_scaling", _module("parallel_scaling", *ours), checkpoint=True,
             skip=one_gpu),
        Step("diffusers_cp", torchrun, checkpoint=True, skip=one_gpu),
    ]  # fmt: skip


def throughput(ctx: Context) -> list[Step]:
    if ctx.smoke:
        size = ["--device", "cpu", "--height", "32", "--width", "32", "--frames", "5",
                "--steps", "2", "--num-requests", "4", "--overhead-requests", "2"]  # fmt: skip
        main, tiny = [*size, "--configs", "1:b1,1:b4"], [*size, "--configs", "1:b1"]
    else:
        configs = "1:b1,1:b4" + (f",{ctx.gpus}:latency,{ctx.gpus}:throughput" if ctx.gpus > 1
                                 else "")  # fmt: skip
        main = ["--configs", configs]
        tiny = ["--configs", "1:b1", "--height", "64", "--width", "64", "--frames", "5",
                "--steps", "4", "--overhead-requests", "50", "--num-requests", "8"]  # fmt: skip
    return [
        Step("throughput", _module("throughput", "--model", str(ctx.checkpoint), *main),
             checkpoint=True),
        Step("engine_overhead_tiny", _module("throughput", "--model", DEMO, *tiny)),
    ]  # fmt: skip


def _external(script: str, smoke: list[str]) -> Callable[[Context], list[Step]]:
    """A suite owned by another script: run it when it exists (``--out``, ``--device``)."""

    def steps(ctx: Context) -> list[Step]:
        path = REPO / "benchmarks" / f"{script}.py"
        skip = None if path.is_file() else f"benchmarks/{script}.py does not exist"
        return [Step(script, _module(script, *(smoke if ctx.smoke else [])), skip=skip)]

    return steps


SUITES = {
    "gpu-tests": gpu_tests,
    "kernels": kernels,
    "latency": latency,
    "models": models,
    "scaling": scaling,
    "throughput": throughput,
    "load": _external("load", ["--device", "cpu", "--te-layers", "2", "--dit-layers", "2",
                               "--reps", "1"]),
    "memory": _external("memory_fit", ["--device", "cpu"]),
}  # fmt: skip
