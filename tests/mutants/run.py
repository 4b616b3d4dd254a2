"""Mutation check: each mutant (a deliberate bug in a behaviour the suite claims to test)
is applied to a copy of the project, the tests that cover it are run, and they must fail.

    python tests/mutants/run.py [--only NAME ...] [--out tests/results/mutants.json]

Prints a table (mutant, tests, killed?) and writes it as JSON with the commit hash.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("teacache-ignores-its-polynomial", "fastvideo/cache/teacache.py",
           "polyval(self.calibration.coefficients, rel)", "rel",
           ("tests/test_step_caches.py",)),
    Mutant("magcache-ignores-its-ratios", "fastvideo/cache/magcache.py",
           "self.ratio[branch] * self.ratios[self.step][BRANCHES.index(branch)]",
           "self.ratio[branch]", ("tests/test_step_caches.py",)),
    Mutant("compile-blocks-is-a-no-op", "fastvideo/models/wan/transformer.py",
           "block.compile(backend=backend, mode=mode)", "pass",
           ("tests/test_kernels.py::test_compiled_blocks_equal_eager_and_really_compile",)),
    Mutant("mp4-at-a-fixed-16-fps", "fastvideo/engine/output.py",
           'add_stream("libx264", rate=int(fps))', 'add_stream("libx264", rate=16)',
           ("tests/test_api.py::test_saved_mp4_has_the_requested_frame_rate",)),
    Mutant("batch-key-without-output-type", "fastvideo/wire/validation.py",
           "        item.output_type,\n        item.cache,\n", "        item.cache,\n",
           ("tests/test_engine_core.py",)),
    Mutant("sta-window-height-width-swapped", "fastvideo/worker/worker.py",
           "height // spec.vae_scale_spatial // ph,\n"
           "            width // spec.vae_scale_spatial // pw,",
           "width // spec.vae_scale_spatial // pw,\n"
           "            height // spec.vae_scale_spatial // ph,",
           ("tests/test_kernels.py::test_sta_window_table_maps_resolutions_to_their_own_token_grids",)),
    Mutant("teacache-thresh-does-not-imply-teacache", "fastvideo/entrypoints/cli.py",
           "if args.teacache or args.teacache_thresh is not None:", "if args.teacache:",
           ("tests/test_cli.py::test_generate_with_speed_flags_reports_cache_skips",)),
    Mutant("leaving-async-for-does-not-abort", "fastvideo/entrypoints/async_engine.py",
           "            if not finished:\n                self.core.abort",
           "            if False:\n                self.core.abort",
           ("tests/test_engine_api.py::test_leaving_async_for_early_aborts_the_request",)),
    Mutant("priority-dropped", "fastvideo/engine/core.py",
           "self._enqueue([self._scheduled(request, priority)], partial=False)",
           "self._enqueue([self._scheduled(request, 0)], partial=False)",
           ("tests/test_engine_core.py::test_priority_orders_waiting_requests",)),
    Mutant("aborts-read-every-16th-step", "fastvideo/pipelines/stages/denoising.py",
           "requested = control.abort_requested()",
           "requested = control.abort_requested() if step % 16 == 0 else set()",
           ("tests/test_engine_api.py::test_abort_running_request_within_one_step",)),
    Mutant("cfg-with-g-minus-1", "fastvideo/pipelines/stages/denoising.py",
           "return negative + scale * (positive - negative)",
           "return negative + (scale - 1) * (positive - negative)",
           ("tests/test_pipeline_vs_diffusers.py",)),
    Mutant("padding-keys-attended", "fastvideo/layers/attention.py",
           "            if shard is not None and shard.valid < q.shape[1]:\n"
           "                k, v = k[:, : shard.valid], v[:, : shard.valid]\n"
           "            return attention(",
           "            return attention(",
           ("tests/test_wan_transformer.py::test_padded_shard_equals_the_full_forward",)),
    Mutant("noise-not-from-the-seed", "fastvideo/pipelines/stages/latents.py",
           "torch.Generator(\"cpu\").manual_seed(s)", "torch.Generator(\"cpu\").manual_seed(0)",
           ("tests/test_pipeline_vs_diffusers.py",)),
    Mutant("prompt-utf8-unchecked", "fastvideo/wire/validation.py",
           '        value.encode("utf-8")\n', '        pass\n',
           ("tests/test_hostile.py",)),
    Mutant("no-work-budget", "fastvideo/wire/validation.py",
           "    tokens = spec.num_tokens(item.height, item.width, item.num_frames)\n",
           "    return\n    tokens = spec.num_tokens(item.height, item.width, item.num_frames)\n",
           ("tests/test_hostile.py",)),
    Mutant("results-without-the-token-accepted", "fastvideo/executor/multiproc.py",
           "if not secrets.compare_digest(msg.token, self._token):", "if False:",
           ("tests/test_faults.py::test_forged_results_on_the_driver_socket_are_dropped",)),
    Mutant("unnormalize-without-the-mean", "fastvideo/models/wan/vae.py",
           "return latents / (1.0 / std) + mean", "return latents / (1.0 / std)",
           ("tests/test_wan_vae.py::test_latent_unnormalization_matches_what_diffusers_decodes",)),
    Mutant("shutdown-waits-for-the-running-batch", "fastvideo/worker/main.py",
           "                    self.aborts.update(self.running_items)\n",
           "                    pass\n",
           ("tests/test_faults.py::test_sigterm_exits_cleanly",)),
    Mutant("lora-files-outside-the-folder-allowed", "fastvideo/entrypoints/http.py",
           "    if not target.is_relative_to(root):", "    if False:",
           ("tests/test_lora.py::test_loras_over_http_match_diffusers",)),
    Mutant("exact-tiles-one-row-short-at-the-head", "fastvideo/models/wan/vae.py",
           "        halo = _spatial_pad(self.conv_out)\n",
           "        halo = _spatial_pad(self.conv_out) - 1\n",
           ("tests/test_memory_fit.py::test_exact_tile_halos_are_needed",)),
    Mutant("parallel-exact-tiles-all-ranks-decode-the-same", "fastvideo/models/wan/vae.py",
           "for r, c in tiles[me::ranks])", "for r, c in tiles[::ranks])",
           ("tests/test_memory_fit.py::test_parallel_decode_in_exact_tiles_gives_the_whole_decode",)),
    Mutant("t5-tokenizer-splits-punctuation", "fastvideo/models/t5_tokenizer.py",
           "pre_tokenizers.WhitespaceSplit(),", "pre_tokenizers.Whitespace(),",
           ("tests/test_umt5.py::test_t5_tokenizer_gives_transformers_ids_without_importing_it",)),
    Mutant("vae-frame-attention-without-the-math-fallback", "fastvideo/models/wan/vae_layers.py",
           'if "not correctly aligned" not in str(e):', "if True:",
           ("tests/test_wan_vae.py::test_frame_attention_falls_back_to_math_when_the_fused_kernel_refuses",)),
    Mutant("lazy-package-submodule-shadows-init-binding", "fastvideo/kernels_bridge/lazy_import.py",
           "if attr not in own and importlib.util.find_spec", "if importlib.util.find_spec",
           ("tests/test_kernels.py::test_lazy_package_init_defers_the_packages_own_init",)),
    Mutant("fa4-preload-for-any-backend", "fastvideo/kernels_bridge/attention.py",
           'if device.type != "cuda" or not _asks_for_fa4(name):', 'if device.type != "cuda":',
           ("tests/test_kernels.py::test_fa4_preload_imports_on_a_thread_only_where_fa4_would_run",)),
    Mutant("early-fa4-import-for-another-backend", "fastvideo/kernels_bridge/attention.py",
           "if not _asks_for_fa4(requested or envs.attention_backend()):", "if False:",
           ("tests/test_kernels.py::test_fa4_preload_before_args_guesses_from_the_environment_only",)),
    Mutant("early-workers-all-told-device-0", "fastvideo/executor/multiproc.py",
           "DEVICE_HINT: rank_device(device, i),", "DEVICE_HINT: rank_device(device, 0),",
           ("tests/test_worker_start.py::test_workers_started_early_are_told_their_device_type",)),
    Mutant("residual-sum-before-norm3-dropped", "fastvideo/kernels_bridge/fused.py",
           "        total = x + y\n", "        total = x\n",
           ("tests/test_fused_kernels.py::test_torch_path_is_the_blocks_arithmetic",)),
    Mutant("exact-levels-planned-with-the-float-video", "fastvideo/models/wan/vae.py",
           "video_itemsize = 1 if levels else None", "video_itemsize = None",
           ("tests/test_memory_fit.py::test_exact_tiles_as_levels_fit_fewer_tiles",)),
    Mutant("exact-levels-tiles-truncated-not-rounded", "fastvideo/models/wan/vae.py",
           "convert = to_levels if levels else None", "convert = None",
           ("tests/test_memory_fit.py::test_exact_tiles_as_levels_are_the_tiled_video_converted",)),
    Mutant("exact-levels-gathered-in-the-mid-blocks-dtype", "fastvideo/models/wan/vae.py",
           "like = mid.new_empty((0,) * mid.ndim, dtype=torch.uint8) if levels else mid",
           "like = mid",
           ("tests/test_memory_fit.py::test_exact_tiles_as_levels_over_ranks_equal_one_rank",)),
    Mutant("progress-queued-before-an-abort-still-yielded", "fastvideo/entrypoints/async_engine.py",
           "                if request.aborted:", "                if False:",
           ("tests/test_engine_api.py::test_abort_running_request_within_one_step",)),
    Mutant("timed-out-request-keeps-reporting-progress", "fastvideo/engine/core.py",
           "r.payload.aborted = True  # no more progress", "pass  # no more progress",
           ("tests/test_engine_api.py::test_timed_out_request_reports_no_progress_after_its_timeout",)),
    Mutant("exact-levels-assembled-in-a-float-video", "fastvideo/models/wan/vae.py",
           "dtype=torch.uint8 if levels else mid.dtype", "dtype=mid.dtype",
           ("tests/test_memory_fit.py::test_exact_tile_plans_fit_their_budget_when_traced",)),
]  # fmt: skip


def _copy_project(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.mp4")
    shutil.copytree(REPO, dest, ignore=ignore, dirs_exist_ok=True)


def run_mutant(mutant: Mutant, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastvideo-mutant-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_project(copy)
        path = copy / mutant.file
        source = path.read_text()
        count = source.count(mutant.old)
        if count != 1:
            return {"name": mutant.name, "killed": None, "note": f"pattern found {count}x"}
        path.write_text(source.replace(mutant.old, mutant.new))
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               *mutant.tests]  # fmt: skip
        env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": tmp}
        try:
            proc = subprocess.run(cmd, cwd=copy, env={**_env(), **env}, capture_output=True,
                                  text=True, timeout=timeout)  # fmt: skip
            killed, tail = proc.returncode != 0, proc.stdout.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            killed, tail = True, ["timed out (a hang counts as caught)"]
        return {"name": mutant.name, "tests": list(mutant.tests), "killed": killed,
                "seconds": round(time.monotonic() - start, 1), "note": " ".join(tail)}  # fmt: skip


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="mutant names to run")
    parser.add_argument("--out", type=Path, help="write the table as JSON")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    rows = []
    for mutant in chosen:
        row = run_mutant(mutant, args.timeout)
        rows.append(row)
        verdict = {True: "caught", False: "SURVIVED", None: "not applied"}[row["killed"]]
        print(f"{mutant.name:<42} {verdict:<12} {row.get('seconds', '')}s  {row['note']}",
              flush=True)  # fmt: skip
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())  # fmt: skip
        record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "commit": commit, "dirty": dirty, "mutants": rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["killed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
