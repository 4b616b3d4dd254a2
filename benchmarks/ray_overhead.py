"""The Ray executor's cost next to the worker processes': engine start-up, the engine's own
overhead per request, and the time per denoising step, one GPU (or one CPU rank) each.

    python -m benchmarks.ray_overhead --device cpu                     # tiny demo model
    python -m benchmarks.ray_overhead --arch 1.3B --out benchmarks/results/x.json
    python -m benchmarks.ray_overhead --device cpu --transport-only    # 64 MB round trip

Overhead per request = the driver's end-to-end time minus the worker's own time for the
batch (``timings["total"]``): validation, scheduling, the trip of the request and of the
result (frames by default, ``--output latent`` for latents only) and the future's return.
Time per step = (end-to-end at ``--steps-hi`` - at ``--steps-lo``) / the step difference,
medians over ``--reps``, so anything the executor adds per step (progress messages)
counts; the worker's own mean step is printed beside it. 1.3B uses seeded random weights
(``benchmarks.common``; speed does not depend on them), written by a child process.

``--transport`` also times a 64 MB fp32 tensor's round trip driver -> actor -> driver on
one Ray node: ZeroMQ (our codec, ipc:// and tcp://) and Ray's object store (a torch tensor;
a numpy array copied into a writable torch tensor, as results must be).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import environment, write_result

EXECUTORS = ("mp", "ray")
SIZES = {"tiny": dict(height=64, width=64, num_frames=5), "1.3B": dict(height=480, width=832,
         num_frames=81)}  # fmt: skip


def _model(arch: str, folder: Path | None) -> str:
    if arch == "tiny":
        from fastvideo.models.registry import default_demo_id

        return default_demo_id()
    folder = folder or Path(tempfile.gettempdir()) / f"fastvideo-random-wan-{arch}"
    if not (folder / "model_index.json").is_file():  # in a child: no CUDA in this driver
        subprocess.run([sys.executable, "-m", "benchmarks.common", str(folder), arch], check=True)
    return str(folder)


def run_executors(args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    """Start every executor's engine, then time their requests interleaved (rep by rep),
    so that a busy machine slows them alike."""
    from fastvideo import VideoGenerator

    size = dict(SIZES[args.arch], guidance_scale=args.guidance, output_type=args.output)
    if args.height:
        size.update(height=args.height, width=args.width, num_frames=args.frames)
    names = args.executors.split(",")
    gens, rows = {}, {}
    try:
        for name in names:
            start = time.perf_counter()
            gens[name] = VideoGenerator.from_pretrained(
                model, num_gpus=1, device=args.device, executor=name
            )
            rows[name] = {"executor": name, "startup_s": time.perf_counter() - start,
                          "overhead": [], "worker_step": [], args.steps_lo: [],
                          args.steps_hi: []}  # fmt: skip
            gens[name].generate_video("warm-up", num_inference_steps=args.steps_lo, **size)
        for rep in range(args.reps):
            for steps in (args.steps_lo, args.steps_hi):
                for name in names:
                    out = gens[name].generate_video(
                        f"a fox, take {rep}", num_inference_steps=steps, **size
                    )
                    row = rows[name]
                    row["overhead"].append(out.timings["end_to_end"] - out.timings["total"])
                    row[steps].append(out.timings["end_to_end"])
                    row["worker_step"].append(out.timings.get("denoising_step_mean", 0.0))
    finally:
        for gen in gens.values():
            gen.shutdown()
    return [_summary(rows[name], args.steps_lo, args.steps_hi) for name in names]


def _summary(row: dict, lo_steps: int, hi_steps: int) -> dict[str, Any]:
    lo, hi = (statistics.median(row[s]) for s in (lo_steps, hi_steps))
    return {
        "executor": row["executor"],
        "startup_s": row["startup_s"],
        "overhead_ms_median": statistics.median(row["overhead"]) * 1e3,
        "overhead_ms_max": max(row["overhead"]) * 1e3,
        "step_ms": (hi - lo) / (hi_steps - lo_steps) * 1e3,
        "worker_step_ms": statistics.median(row["worker_step"]) * 1e3,
        "requests": len(row["overhead"]),
    }


# --- transport: a 64 MB round trip -------------------------------------------------------------
def _echo_class():
    """The echo actor, defined here so Ray ships it by value (no import on the worker)."""
    import ray

    class Echo:
        def zmq_echo(self, inbox: str, outbox: str, count: int) -> int:
            import zmq

            from fastvideo.wire.codec import Decoder, Encoder
            from fastvideo.wire.messages import BatchResult

            ctx = zmq.Context()
            pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            pull.connect(inbox)
            push.connect(outbox)
            encoder, decoder = Encoder(), Decoder(BatchResult)
            for _ in range(count):
                msg = decoder.decode(pull.recv_multipart(copy=False))
                push.send_multipart(encoder.encode(msg), copy=False)
            pull.close()
            push.close(linger=5000)
            ctx.term()
            return count

        def echo(self, value):
            return value

    return ray.remote(num_cpus=1)(Echo)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # the first call warms up
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def measure_transport(megabytes: int, reps: int) -> dict[str, float]:
    import numpy as np
    import ray
    import torch
    import zmq

    from fastvideo.wire.codec import Decoder, Encoder
    from fastvideo.wire.messages import BatchResult

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, num_cpus=2)
    actor = _echo_class().remote()
    tensor = torch.randn(megabytes * 2**20 // 4)
    ip = ray.util.get_node_ip_address()
    folder = tempfile.mkdtemp(prefix="fastvideo-transport-")
    ctx, encoder, decoder = zmq.Context(), Encoder(), Decoder(BatchResult)
    rows: dict[str, float] = {}
    for name, base in (("zeromq ipc://", f"ipc://{folder}/"), ("zeromq tcp://", f"tcp://{ip}:")):
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for sock, suffix in ((push, "in"), (pull, "out")):
            sock.bind(base + (suffix if base.startswith("ipc") else "*"))
        inbox, outbox = (s.getsockopt_string(zmq.LAST_ENDPOINT) for s in (push, pull))
        done = actor.zmq_echo.remote(inbox, outbox, reps + 1)

        def zmq_trip(push=push, pull=pull) -> None:
            push.send_multipart(encoder.encode(BatchResult("b", "p", {}, latents=tensor)),
                                copy=False)  # fmt: skip
            back = decoder.decode(pull.recv_multipart(copy=False)).latents
            assert back.shape == tensor.shape

        rows[name] = _median_ms(zmq_trip, reps)
        ray.get(done)
        push.close(linger=0)
        pull.close(linger=0)
    ctx.term()
    shutil.rmtree(folder, ignore_errors=True)
    as_numpy = tensor.numpy()

    def ray_torch() -> None:
        assert ray.get(actor.echo.remote(tensor)).shape == tensor.shape

    def ray_numpy() -> None:
        back = ray.get(actor.echo.remote(as_numpy))  # read-only, in the object store
        assert torch.from_numpy(np.array(back)).shape == tensor.shape  # writable copy

    rows["ray object store (torch tensor)"] = _median_ms(ray_torch, reps)
    rows["ray object store (numpy + copy)"] = _median_ms(ray_numpy, reps)
    ray.kill(actor)
    if started:
        ray.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--arch", default="tiny", choices=tuple(SIZES))
    p.add_argument("--model", type=Path, help="checkpoint folder for --arch 1.3B")
    p.add_argument("--executors", default=",".join(EXECUTORS))
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--guidance", type=float, default=1.0, help="1.0: no CFG (one forward)")
    p.add_argument("--output", default="np", choices=("np", "latent"))
    p.add_argument("--steps-lo", type=int, default=2)
    p.add_argument("--steps-hi", type=int, default=6)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--transport", action="store_true", help="also the 64 MB round trip")
    p.add_argument("--transport-only", action="store_true")
    p.add_argument("--transport-mb", type=int, default=64)
    p.add_argument("--out", type=Path)
    p.add_argument("--note", default="", help="saved in the JSON (e.g. the machine's load)")
    args = p.parse_args()
    if args.device == "cpu" and args.arch != "tiny":
        p.error("--device cpu runs the tiny model only")
    if args.height and not (args.width and args.frames):
        p.error("--height needs --width and --frames")
    record: dict[str, Any] = {
        "benchmark": "ray_overhead",
        **environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "weights": "tiny demo model" if args.arch == "tiny" else "seeded random bf16",
        "note": args.note,
        "rows": [],
        "transport_ms": None,
    }
    if not args.transport_only:
        rows = record["rows"] = run_executors(args, _model(args.arch, args.model))
        print("\nexecutor  start s  overhead ms (max)  step ms  worker step ms")
        for r in rows:
            print(f"{r['executor']:>8} {r['startup_s']:8.1f} {r['overhead_ms_median']:9.2f} "
                  f"({r['overhead_ms_max']:6.2f}) {r['step_ms']:8.2f} "
                  f"{r['worker_step_ms']:15.2f}")  # fmt: skip
        write_result(args.out, record)  # kept if the transport part is stopped
    if args.transport or args.transport_only:
        transport = record["transport_ms"] = measure_transport(args.transport_mb, args.reps)
        print(f"\n{args.transport_mb} MB fp32 round trip driver -> actor -> driver (median ms)")
        for name, ms in transport.items():
            rate = 2 * args.transport_mb / 1024 / (ms / 1e3)
            print(f"  {name:<34} {ms:8.1f} ms  ({rate:.2f} GB/s)")
        write_result(args.out, record)


if __name__ == "__main__":
    main()
