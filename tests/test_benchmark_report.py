"""The results tables (benchmarks/results/README.md) are exactly what ``benchmarks.report``
renders from the committed results (so they cannot drift from them), and the report itself:
tables from suite files, the latest run per suite, statuses, and the marker handling of
--update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.provenance import REPO

ENV = {"date": "2026-12-02T10:00:00+00:00", "commit": "0123456789abcdef", "dirty": False,
       "gpus": ["NVIDIA H200"], "torch": "2.13.0"}  # fmt: skip


def test_readme_section_equals_the_rendered_committed_results():
    readme = (REPO / "benchmarks" / "results" / "README.md").read_text()
    assert report.readme_section(readme) == report.render(REPO / "benchmarks" / "results"), (
        "benchmarks/results/README.md is stale: run "
        "`python -m benchmarks.report --update benchmarks/results/README.md`"
    )


def _latency(dit_ms: float) -> dict:
    return {
        "benchmark": "latency", **ENV, "size": {"height": 480, "width": 832, "frames": 81},
        "tokens": 32760, "steps": 50, "attention_backend": "sdpa",
        "ours_dit_eager_ms": dit_ms, "ours_dit_eager_peak_gib": 1.66,
        "diffusers_dit_eager_ms": 625.2, "diffusers_dit_eager_peak_gib": 1.5,
        "dit_eager_ratio_ours_over_diffusers": dit_ms / 625.2,
        "e2e_exact": {"seconds": 63.9}, "e2e_diffusers": {"seconds": 87.2},
        "e2e_teacache": {"seconds": 20.0, "thresh": 0.08, "psnr_vs_exact_db": 31.5,
                         "skipped": {"teacache_skipped_cond": 30.0,
                                     "teacache_skipped_uncond": 29.0}},
    }  # fmt: skip


def _write_suite(folder: Path, suite: str, kind: str, date: str, entries: dict) -> None:
    data = {"suite": suite, "gpu_kind": kind, "environment": {**ENV, "date": date},
            "benchmarks": entries}  # fmt: skip
    (folder / f"{suite.replace('-', '_')}_{kind}.json").write_text(json.dumps(data))


def _complete(result: dict) -> dict:
    return {"status": "complete", "seconds": 1.0, "result": result}


def test_latency_table_shows_the_measured_figures(tmp_path):
    _write_suite(tmp_path, "latency", "h200", ENV["date"], {"latency": _complete(_latency(612.5))})
    text = report.render(tmp_path)
    assert "### Latency, ours vs diffusers (`results/latency_h200.json`)" in text
    assert "| DiT forward, eager | 612.5 ms (+1.66 GiB) | 625.2 ms (+1.50 GiB) | 0.980 |" in text
    assert "| 50-step video, exact | 63.9 s | 87.2 s | 0.733 |" in text
    assert "threshold 0.08, skipped 30/29, PSNR vs exact 31.5 dB" in text
    assert "NVIDIA H200, torch 2.13.0, commit 0123456789, 2026-12-02" in text
    _write_suite(tmp_path, "latency", "h200", ENV["date"], {"latency": _complete(_latency(600.0))})
    assert report.render(tmp_path) != text, "another measurement must render differently"


def test_the_latest_run_of_each_suite_is_shown_and_cpu_smoke_runs_never(tmp_path):
    old, new = "2026-12-01T10:00:00+00:00", "2026-12-03T10:00:00+00:00"
    _write_suite(tmp_path, "latency", "h200x2", old, {"latency": _complete(_latency(700.0))})
    _write_suite(tmp_path, "latency", "h200", new, {"latency": _complete(_latency(612.5))})
    _write_suite(tmp_path, "latency", "cpu", "2027-01-01T00:00:00+00:00",
                 {"latency": _complete(_latency(1.0))})  # fmt: skip
    text = report.render(tmp_path)
    assert "latency_h200.json" in text and "612.5 ms" in text
    assert "h200x2" not in text and "700.0 ms" not in text and "latency_cpu" not in text


def test_statuses_are_stated(tmp_path):
    partial = {"status": "partial", "seconds": 9.0, "reason": "stopped at the time budget",
               "result": _latency(612.5)}  # fmt: skip
    skipped = {"status": "skipped", "seconds": 0.0, "reason": "one GPU visible"}
    _write_suite(tmp_path, "latency", "h200", ENV["date"], {"latency": partial})
    _write_suite(tmp_path, "scaling", "h200", ENV["date"], {"parallel_scaling": skipped})
    text = report.render(tmp_path)
    assert "_partial: stopped at the time budget; the figures below" in text
    assert "_skipped: one GPU visible_" in text


def test_no_results_says_how_to_make_them(tmp_path):
    assert "No benchmark results yet" in report.render(tmp_path)


def test_update_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{report.START}\nold table\n{report.END}\nafter\n")
    _write_suite(tmp_path, "latency", "h200", ENV["date"], {"latency": _complete(_latency(612.5))})
    assert report.main(["--results-dir", str(tmp_path), "--check", str(readme)]) == 1
    assert report.main(["--results-dir", str(tmp_path), "--update", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{report.END}\nafter\n")
    assert "old table" not in text and "612.5 ms" in text
    assert report.readme_section(text) == report.render(tmp_path)
    assert report.main(["--results-dir", str(tmp_path), "--check", str(readme)]) == 0


@pytest.mark.parametrize(
    "text", ["no markers", f"{report.END}\n{report.START}\n", f"{report.START}\n{report.START}\n"]
)
def test_missing_or_misplaced_markers_are_refused(text):
    with pytest.raises(ValueError, match="results:start"):
        report.replace_section(text, "x")
