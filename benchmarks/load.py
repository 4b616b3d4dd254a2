"""Time to ready: ours (``VideoGenerator.from_pretrained``) vs diffusers
(``WanPipeline.from_pretrained(...).to(device)``), each in a fresh process, warm and cold
page cache, against the disk floor.

The checkpoint: a random full-size Wan2.1-T2V-1.3B DiT (bf16) and VAE (fp32) from
``benchmarks.common`` next to a random UMT5 text encoder of UMT5-XXL's width (bf16;
``--te-layers 24`` is the full 5.7B-parameter encoder), initialised on ``--device`` and
saved with transformers' ``save_pretrained``. ``--dit-layers`` shrinks the DiT for CPU
checks. Speed does not depend on weight values.

Cold page cache: ``echo 3 > /proc/sys/vm/drop_caches`` when root, else
``posix_fadvise(DONTNEED)`` on every file of the checkpoint (which evicts only clean pages
nobody else maps). The disk floor is the checkpoint's bytes over the sequential read speed
of one large cold read of those same files.

    python -m benchmarks.load --out benchmarks/results/load.json          # GPU, full size
    python -m benchmarks.load --device cpu --te-layers 2 --dit-layers 2 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

UMT5_XXL = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "feed_forward_proj": "gated-gelu",
}  # fmt: skip
READ_CHUNK = 64 << 20


# --- the checkpoint (written in its own process) -----------------------------------------
def build(folder: Path, te_layers: int, dit_layers: int | None, device: str,
          arch: str = "1.3B") -> None:  # fmt: skip
    """DiT (``arch`` of benchmarks.common.ARCHS) + VAE from benchmarks.common, then a UMT5
    encoder of ``te_layers`` XXL layers."""
    import shutil

    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    import benchmarks.common as common

    if dit_layers is not None:
        common.ARCHS["custom"] = {**common.ARCHS[arch], "num_layers": dit_layers}
    common.write_random_wan(folder, "custom" if dit_layers else arch, device=device)
    te_dir = folder / "text_encoder"
    shutil.rmtree(te_dir)
    with torch.device(device):
        te = UMT5EncoderModel(UMT5Config(**{**UMT5_XXL, "num_layers": te_layers}))
    te.to(torch.bfloat16).save_pretrained(str(te_dir))
    (folder / "BUILT").write_text(json.dumps({"te_layers": te_layers, "dit_layers": dit_layers}))


# --- one timed load (each in a fresh process) --------------------------------------------
def child_ours(model: Path, device: str) -> dict[str, Any]:
    start = time.perf_counter()
    from fastvideo import VideoGenerator

    imported = time.perf_counter()
    # bf16 on CPU too, so that a CPU check reads what a GPU run reads (no fp32 upcast).
    gen = VideoGenerator.from_pretrained(
        str(model), num_gpus=1, device=device, dit_precision="bf16", text_encoder_precision="bf16"
    )
    ready = time.perf_counter()
    breakdown = dict(getattr(gen.executor, "load_breakdown", {}) or {})
    from fastvideo.executor.forked import ForkedWorker

    procs = getattr(gen.executor, "_procs", [])
    start_by = "fork" if procs and isinstance(procs[0], ForkedWorker) else "spawn"
    gen.shutdown()
    return {
        "worker_start": start_by,
        "import_s": imported - start,
        "ready_s": ready - imported,
        "total_s": ready - start,
        "breakdown": breakdown,
    }


def child_diffusers(model: Path, device: str) -> dict[str, Any]:
    start = time.perf_counter()
    import torch
    from diffusers import WanPipeline

    imported = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(str(model), torch_dtype=dtype).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter()
    del pipe
    return {"import_s": imported - start, "ready_s": ready - imported, "total_s": ready - start}


def child_reads(model: Path, device: str, threads: list[int], chunks: list[int]) -> dict[str, Any]:
    """Read throughput of every weight file onto ``device`` (warm cache) by strategy:
    safetensors per tensor on one thread (the old loader), safetensors on N threads, our
    WeightReader (pinned staging on CUDA, preadv into the tensors on CPU), and the host's
    own ceiling (preadv from the page cache into one reused buffer per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors import safe_open

    from fastvideo.models.weight_reader import WeightReader, read_header

    files = [p for p in checkpoint_files(model) if p.suffix == ".safetensors"]
    total = sum(p.stat().st_size for p in files)
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    res: dict[str, Any] = {"bytes": total}

    def timed(name: str, fn) -> None:
        fn()  # the first call pays one-time costs (context, pinned pools, page faults)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res[name] = total / (time.perf_counter() - start) / 1e9
        print(f"  {name:<34}{res[name]:7.2f} GB/s", file=sys.stderr, flush=True)
        del out

    def st_keys(path: Path, keys: list[str]) -> list:
        with safe_open(str(path), framework="pt", device=str(dev)) as f:
            return [f.get_tensor(k) for k in keys]

    jobs = [(p, list(read_header(p))) for p in files]
    timed("safetensors_1_thread", lambda: [st_keys(p, k) for p, k in jobs])
    for n in threads:
        parts = [(p, k[i::n]) for p, k in jobs for i in range(n)]

        def st_threads(parts=parts, n=n):
            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(lambda a: st_keys(*a), parts))

        timed(f"safetensors_{n}_threads", st_threads)
        for chunk in chunks:
            reader = WeightReader(dev, threads=n, chunk_bytes=chunk << 20, cpu_mode="read")
            timed(
                f"weight_reader_{n}_threads_{chunk}MB",
                lambda r=reader: r.submit(dict.fromkeys(files)).result(),
            )
            reader.close()
        timed(f"host_preadv_{n}_threads", lambda n=n: _host_reads(files, n))
    return res


def _host_reads(files: list[Path], threads: int) -> int:
    """Page cache -> one reused buffer per thread, 64 MB reads: the host-side ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    tasks = [(p, off) for p in files for off in range(0, p.stat().st_size, READ_CHUNK)]

    def run(i: int) -> int:
        buf, done = bytearray(READ_CHUNK), 0
        for path, off in tasks[i::threads]:
            fd = os.open(path, os.O_RDONLY)
            done += os.preadv(fd, [buf], off)
            os.close(fd)
        return done

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(run, range(threads)))


# --- page cache and disk ----------------------------------------------------------------
def checkpoint_files(model: Path) -> list[Path]:
    return sorted(p for p in model.rglob("*") if p.is_file())


def drop_cache(model: Path, system: bool = False) -> str:
    """Evict the checkpoint's pages; returns how. ``system`` (root only) drops every cache
    (``drop_caches``), which also makes the Python imports cold; by default only the
    checkpoint's files are evicted, so "cold" measures the weights, not the libraries."""
    os.sync()
    if system and os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    for path in checkpoint_files(model):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def warm_cache(model: Path) -> None:
    for path in checkpoint_files(model):
        with open(path, "rb") as f:
            while f.readinto(bytearray(READ_CHUNK)):
                pass


def disk_floor(model: Path, system: bool) -> dict[str, Any]:
    """Sequential read speed of the checkpoint's files from a cold cache."""
    how = drop_cache(model, system)
    files = checkpoint_files(model)
    total = sum(p.stat().st_size for p in files)
    buf = bytearray(READ_CHUNK)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    seconds = time.perf_counter() - start
    return {"bytes": total, "cold_read_s": seconds, "gb_per_s": total / seconds / 1e9, "how": how}


# --- driver ---------------------------------------------------------------------------------
def run_child(
    kind: str, model: Path, device: str, extra: list[str] = (), pythonpath: str | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.load", "--child", kind, "--model", str(model)]
    cmd += ["--device", device, *extra]
    env = os.environ.copy()
    if pythonpath is not None:  # another fastvideo tree first (the baseline)
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed (exit code {out.returncode}; its log is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Disk floor, then each loader in fresh processes, warm page cache then cold."""
    res: dict[str, Any] = {"runs": {}}
    res["disk"] = disk_floor(args.model, args.drop_caches)
    kinds = [("ours", "ours", None, args.reps)]
    if args.baseline:
        kinds.append(("baseline", "ours", args.baseline, args.baseline_reps))
    if not args.skip_diffusers:
        kinds.append(("diffusers", "diffusers", None, args.diffusers_reps))
    for cache in ("warm", "cold"):
        for label, kind, pythonpath, reps in kinds:
            runs = []
            for _ in range(reps):
                if cache == "cold":
                    drop_cache(args.model, args.drop_caches)
                else:
                    warm_cache(args.model)
                runs.append(run_child(kind, args.model, args.device, pythonpath=pythonpath))
            res["runs"][f"{label}_{cache}"] = runs
    return res


def summarise(res: dict[str, Any]) -> None:
    floor = res["disk"]["cold_read_s"]
    print(f"checkpoint {res['disk']['bytes'] / 1e9:.2f} GB, cold sequential read "
          f"{res['disk']['gb_per_s']:.2f} GB/s -> disk floor {floor:.2f} s")  # fmt: skip
    print(f"{'run':<16}{'import s':>10}{'ready s':>10}{'total s':>10}{'vs floor':>10}")
    for name, runs in res["runs"].items():
        best = min(runs, key=lambda r: r["ready_s"])
        res.setdefault("best", {})[name] = best
        print(f"{name:<16}{best['import_s']:>10.2f}{best['ready_s']:>10.2f}"
              f"{best['total_s']:>10.2f}{best['ready_s'] / floor:>9.2f}x")  # fmt: skip
    best = res.get("best", {})
    for cache in ("warm", "cold"):
        ours = best.get(f"ours_{cache}")
        for other in ("diffusers", "baseline"):
            ref = best.get(f"{other}_{cache}")
            if ours and ref:
                ratio = res[f"{other}_over_ours_{cache}"] = ref["ready_s"] / ours["ready_s"]
                print(f"{cache}: {other} / ours (ready) = {ratio:.2f}x")
    if "ours_warm" in best:
        parts = best["ours_warm"]["breakdown"]
        print(
            "ours warm, worker breakdown: " + ", ".join(f"{k} {v:.2f}s" for k, v in parts.items())
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", type=Path, help="checkpoint folder (default: written to /tmp)")
    p.add_argument("--te-layers", type=int, default=24, help="UMT5-XXL layers (24: full)")
    p.add_argument("--dit-layers", type=int, help="DiT layers (default: 1.3B's 30)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--diffusers-reps", type=int, default=3)
    p.add_argument("--baseline", help="PYTHONPATH entry of another fastvideo tree to time too")
    p.add_argument("--baseline-reps", type=int, default=1)
    p.add_argument(
        "--drop-caches", action="store_true", help="cold = drop every cache (root), imports too"
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--reads", action="store_true", help="also read throughput by strategy")
    p.add_argument("--threads", default="4,8,16", help="--reads: thread counts")
    p.add_argument("--chunks", default="16,64", help="--reads: WeightReader chunk sizes, MB")
    p.add_argument(
        "--child", choices=["ours", "diffusers", "build", "reads"], help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.child == "build":
        return build(args.model, args.te_layers, args.dit_layers, args.device)
    if args.child == "reads":
        ints = [[int(x) for x in v.split(",")] for v in (args.threads, args.chunks)]
        print(json.dumps(child_reads(args.model, args.device, *ints)))
        return
    if args.child is not None:
        fn = child_ours if args.child == "ours" else child_diffusers
        print(json.dumps(fn(args.model, args.device)))
        return
    if args.model is None:
        tag = f"te{args.te_layers}-dit{args.dit_layers or 30}"
        args.model = Path(f"/tmp/fastvideo-load-{tag}")
    if not (args.model / "model_index.json").is_file():
        cmd = [sys.executable, "-m", "benchmarks.load", "--child", "build"]
        cmd += ["--device", args.device, "--model", str(args.model)]
        cmd += ["--te-layers", str(args.te_layers)]
        cmd += ["--dit-layers", str(args.dit_layers)] if args.dit_layers else []
        subprocess.run(cmd, check=True)
    from benchmarks.common import environment

    res = {"benchmark": "load", **environment(), "model": str(args.model),
           "device": args.device}  # fmt: skip
    res.update(measure(args))
    summarise(res)
    if args.reads:
        warm_cache(args.model)
        cmd = ["--threads", args.threads, "--chunks", args.chunks]
        res["read_gb_per_s"] = run_child("reads", args.model, args.device, cmd)
    if args.out:
        from benchmarks.common import write_result

        write_result(args.out, res)


if __name__ == "__main__":
    main()
