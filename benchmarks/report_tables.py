"""One markdown renderer per benchmark result (the ``benchmark`` JSON each script writes),
and a generic one for the others. Pure functions of the JSON: the same results always
render the same text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Lines = list[str]
ENV_KEYS = {"benchmark", "date", "command", "python", "torch", "cuda", "gpus", "gpu",
            "gpu_kind", "commit", "dirty", "args"}  # fmt: skip


def fmt(value: Any, spec: str = ".1f", unit: str = "") -> str:
    if value is None or isinstance(value, (dict, list)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:{spec}}{unit}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> Lines:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def _with_peak(ms: Any, peak: Any) -> str:
    return fmt(ms, ".1f", " ms") + (f" (+{peak:.2f} GiB)" if isinstance(peak, (int, float)) else "")


# --- per benchmark -------------------------------------------------------------------------
def attention_kernels(r: dict[str, Any]) -> Lines:
    grid = "x".join(str(g) for g in r.get("grid", []))
    out = [f"{fmt(r.get('tokens'), ',')} tokens ({grid}), {r.get('heads')} heads x "
           f"{r.get('head_dim')}, bf16; error relative to fp32 attention (STA: under the "
           "same mask).", ""]  # fmt: skip
    rows = []
    for row in r.get("rows", []):
        if "error" in row:
            rows.append([row["backend"], "-", "-", f"cannot run: {row['error'][:90]}", "-"])
            continue
        err = row.get("rel_err_vs_fp32", row.get("rel_err_vs_fp32_masked"))
        rows.append([row["backend"], fmt(row.get("ms"), ".2f"), fmt(row.get("tflops"), ".0f"),
                     fmt(err, ".1e"), fmt(row.get("kept_blocks"), ".3f")])  # fmt: skip
    return out + table(["backend", "ms", "TFLOP/s", "rel. error", "kept blocks"], rows)


def _video_row(name: str, e: dict[str, Any], ref_s: Any) -> list[str]:
    extra = []
    if e.get("thresh") is not None:
        skipped = e.get("skipped", {})
        extra.append(f"threshold {fmt(e['thresh'], 'g')}, skipped "
                     + "/".join(fmt(v, ".0f") for _, v in sorted(skipped.items())))  # fmt: skip
    psnr = e.get("psnr_vs_exact_db")
    if psnr is not None:
        same = psnr == "inf" or psnr == float("inf")
        extra.append("identical to exact" if same else f"PSNR vs exact {fmt(psnr, '.1f', ' dB')}")
    ratio = e["seconds"] / ref_s if isinstance(ref_s, (int, float)) else None
    label = name + (f" ({', '.join(extra)})" if extra else "")
    return [label, fmt(e.get("seconds"), ".1f", " s"), "-", fmt(ratio, ".3f")]


def latency(r: dict[str, Any]) -> Lines:
    size = r.get("size", {})
    out = [f"{size.get('height')}x{size.get('width')}x{size.get('frames')} "
           f"({fmt(r.get('tokens'), ',')} tokens), {r.get('steps')} steps with CFG, our "
           f"attention backend {r.get('attention_backend', '?')}; {r.get('weights', '')}.",
           ""]  # fmt: skip
    rows = []
    dit = (("eager", "DiT forward, eager"), ("compiled", "DiT forward, regional compile"))
    for tag, label in dit:
        if f"ours_dit_{tag}_ms" in r:
            ours = _with_peak(r[f"ours_dit_{tag}_ms"], r.get(f"ours_dit_{tag}_peak_gib"))
            ref = _with_peak(r[f"diffusers_dit_{tag}_ms"], r.get(f"diffusers_dit_{tag}_peak_gib"))
            rows.append(
                [label, ours, ref, fmt(r.get(f"dit_{tag}_ratio_ours_over_diffusers"), ".3f")]
            )
    if "ours_dit_eager_unfused_ms" in r:
        err = fmt(r.get("dit_eager_fused_rel_err_vs_unfused"), ".1e")
        ours = _with_peak(r["ours_dit_eager_unfused_ms"], r.get("ours_dit_eager_unfused_peak_gib"))
        rows.append([f"DiT forward, eager without the fused kernels (fused rel. err {err})",
                     ours, "-", "-"])  # fmt: skip
    for key, label in (("our_kernels", "our fused kernels as graph ops"),
                       ("inductor_fusion", "Inductor's own fusion of the torch ops")):  # fmt: skip
        if f"ours_dit_compiled_{key}_ms" in r:
            ms = _with_peak(r[f"ours_dit_compiled_{key}_ms"],
                            r.get(f"ours_dit_compiled_{key}_peak_gib"))  # fmt: skip
            err = fmt(r.get(f"ours_dit_compiled_{key}_rel_err_vs_default"), ".1e")
            rows.append([f"DiT forward, regional compile with {label} (rel. err vs the "
                         f"default compile {err})", ms, "-", "-"])  # fmt: skip
    fp8 = r.get("fp8") or {}
    for tag in ("eager", "compiled"):
        if f"ours_dit_fp8_{tag}_ms" in fp8:
            ms = _with_peak(fp8[f"ours_dit_fp8_{tag}_ms"], fp8.get(f"ours_dit_fp8_{tag}_peak_gib"))
            err = fmt(fp8.get(f"{tag}_rel_err_vs_bf16"), ".1e")
            rows.append([f"DiT forward, fp8 {tag} (rel. err vs our bf16 {err})", ms, "-", "-"])
    for prec in ("fp32", "bf16", "fp16"):
        v = r.get(f"vae_{prec}")
        if v:
            rows.append([f"VAE decode, {prec}", _with_peak(v["ours_ms"], v.get("ours_peak_gib")),
                         _with_peak(v["diffusers_ms"], v.get("diffusers_peak_gib")),
                         fmt(v.get("ratio_ours_over_diffusers"), ".3f")])  # fmt: skip
    ref_s = r.get("e2e_diffusers", {}).get("seconds")
    steps = r.get("steps")
    if "e2e_exact" in r:
        exact = r["e2e_exact"]["seconds"]
        rows.append([f"{steps}-step video, exact", fmt(exact, ".1f", " s"), fmt(ref_s, ".1f", " s"),
                     fmt(exact / ref_s if ref_s else None, ".3f")])  # fmt: skip
    for name, label in (("teacache", "TeaCache"), ("magcache", "MagCache"), ("fp8", "fp8 DiT")):
        if f"e2e_{name}" in r:
            rows.append(_video_row(f"{steps}-step video, {label}", r[f"e2e_{name}"], ref_s))
    out += table(["", "ours", "diffusers", "ours / diffusers"], rows) if rows else []
    psnr = r.get("e2e_diffusers", {}).get("psnr_vs_ours_exact_db")
    if psnr is not None:
        out += ["", f"diffusers' video vs our exact one: PSNR {fmt(psnr, '.1f')} dB."]
    if r.get("e2e_note"):
        out += ["", f"_Note: {r['e2e_note']}._"]
    floor = r.get("floor")
    if floor:
        out += ["", f"bf16 floor of one DiT forward at this shape: {floor['floor_ms']:.1f} ms "
                    f"(attention {floor['attention_floor_ms']:.1f} ms at "
                    f"{floor['attention_tflops']:.0f} TFLOP/s, the fastest dense kernel here "
                    f"({floor['best_kernel']}); linear layers {floor['linear_floor_ms']:.1f} ms at "
                    f"{floor['linear_tflops']:.0f} TFLOP/s); {floor['video_forwards']} forwards: "
                    f"{floor['video_denoising_floor_s']:.1f} s."]  # fmt: skip
    prof = r.get("profile") or {}
    kinds = prof.get("kernel_ms_by_kind")
    if kinds:
        ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{k} {v:.1f} ms" for k, v in ranked)
        out += ["", f"GPU kernel time of our eager forward ({prof.get('attention_backend')}): "
                    f"{parts}; total {prof['kernel_ms_total']:.1f} ms ('other': norms, "
                    "modulation, rotary, gating, dtype copies)."]  # fmt: skip
    return out


def models(r: dict[str, Any]) -> Lines:
    rows, notes = [], []
    for name, c in r.get("cases", {}).items():
        if "error" in c:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", f"failed: {c['error'][:80]}"])
            continue
        s, o, d = c["size"], c["ours"], c.get("diffusers", {})
        peak = "-"
        if o.get("peak_gib") is not None:
            ref = "-" if d.get("peak_gib") is None else f"+{d['peak_gib']:.1f}"
            peak = f"+{o['peak_gib']:.1f} / {ref}"
        label = name if c.get("attention_backend") != "sta" else f"{name} (sta)"
        rows.append([label, f"{s['height']}x{s['width']}x{s['frames']}", fmt(c["tokens"], ","),
                     fmt(o["step_ms"], ".0f"), fmt(d.get("step_ms"), ".0f"),
                     fmt(c.get("ratio_ours_over_diffusers"), ".3f"), peak,
                     fmt(c.get("weights_gib"), ".1f"),
                     fmt(c.get("rel_err_vs_diffusers"), ".1e")])  # fmt: skip
        notes += _switch_note(name, c.get("switch", {})) + _dense_note(name, c)
    header = ["model", "size", "tokens", "ours ms/step", "diffusers ms/step", "ours / diffusers",
              "peak GiB above weights (ours / diffusers)", "weights GiB", "rel. error"]  # fmt: skip
    intro = ["A step: ours one forward of batch 2 with CFG, diffusers two of batch 1 (as its "
             "pipelines run); HunyuanVideo (embedded guidance) one of batch 1. Random bf16 "
             "weights shared by both.", ""]  # fmt: skip
    return intro + table(header, rows) + (["", *notes] if notes else [])


def _dense_note(name: str, c: dict[str, Any]) -> Lines:
    d = c.get("dense", {})
    if "step_ms" not in d:
        return []
    window = f" (window {tuple(c['sta_window'])})" if c.get("sta_window") else ""
    return [f"{name}: {c['attention_backend']}{window} {c['ours']['step_ms']:.0f} ms/step vs "
            f"dense {d['backend']} {d['step_ms']:.0f} ms/step (speed-up "
            f"{d['speedup_of_chosen']:.2f}x), output rel. error vs dense "
            f"{d['rel_err_chosen_vs_dense']:.1e}."]  # fmt: skip


def _switch_note(name: str, switch: dict[str, Any]) -> Lines:
    if not isinstance(switch.get("ours"), dict):
        return []
    move = switch.get("move")
    move_s = "; both experts stay on the GPU"
    if isinstance(move, dict):
        move_s = f"; moving one expert host -> device {move['to_device_s']:.2f} s"
    ours, ref = switch["ours"]["switch_ms"], switch["diffusers"]["switch_ms"]
    return [f"{name}: expert switch {ours:+.1f} ms (ours), {ref:+.1f} ms (diffusers){move_s}."]


def parallel_scaling(r: dict[str, Any]) -> Lines:
    rows = [[fmt(x["gpus"], "d"), x["plan"], fmt(x["step_s"] * 1e3, ".1f"),
             fmt(x.get("speedup_vs_first"), ".2f", "x"),
             fmt(x.get("latents_rel_err_vs_first"), ".1e"),
             ", ".join(f"{m:.1f}" for m in x.get("peak_memory_gib_per_rank", [])) or "-"]
            for x in r.get("rows", [])]  # fmt: skip
    header = ["GPUs", "plan", "ms/step", "speed-up", "latents rel. error vs first", "peak GiB/rank"]
    return table(header, rows)


def diffusers_cp(r: dict[str, Any]) -> Lines:
    line = (f"diffusers' own Ulysses context parallelism on {r.get('world_size')} GPU(s), "
            f"attention {r.get('attention')}: {fmt(r.get('step_ms'), '.1f')} ms per step (two "
            "forwards with CFG)")  # fmt: skip
    if r.get("e2e_s") is not None:
        line += f"; a {r.get('e2e_steps')}-step video {r['e2e_s']:.1f} s"
    return [line + "."]


def throughput(r: dict[str, Any]) -> Lines:
    rows = [[f"{x['gpus']}:{x['setting']}", ", ".join(x.get("plans", [])),
             fmt(x.get("videos_per_hour"), ".0f"), fmt(x.get("latency_mean_s"), ".2f"),
             fmt(x.get("engine_overhead_ms_median"), ".2f"),
             fmt(x.get("throughput_vs_first"), ".2f", "x")] for x in r.get("rows", [])]  # fmt: skip
    args = r.get("args", {})
    size = f"{args.get('height')}x{args.get('width')}x{args.get('frames')}"
    intro = [f"{args.get('num_requests', '?')} requests at {size}, {args.get('steps')} steps, "
             "submitted at once.", ""]  # fmt: skip
    header = ["GPUs:setting", "plans", "videos/h", "mean latency s", "engine overhead ms",
              "vs first"]  # fmt: skip
    return intro + table(header, rows)


def gpu_tests(r: dict[str, Any]) -> Lines:
    counts = r.get("counts", {})
    out = [", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
           f" in {fmt(r.get('duration_s'), '.0f')} s."]  # fmt: skip
    bad = [t for t in r.get("tests", []) if t["outcome"] in ("failed", "error")]
    if bad:
        out += ["", *table(["failed test", "reason"],
                           [[t["test"], t.get("reason", "")[:120]] for t in bad])]  # fmt: skip
    reasons: dict[str, int] = {}
    for t in r.get("tests", []):
        if t["outcome"] == "skipped":
            key = t.get("reason", "")[:120]
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        out += ["", *table(["skipped because", "tests"],
                           [[k, str(v)] for k, v in sorted(reasons.items())])]  # fmt: skip
    return out


def load(r: dict[str, Any]) -> Lines:
    disk = r.get("disk", {})
    out = []
    if disk:
        out += [f"Checkpoint {fmt(disk.get('bytes', 0) / 1e9, '.2f')} GB; cold sequential read "
                f"{fmt(disk.get('gb_per_s'), '.2f')} GB/s, disk floor "
                f"{fmt(disk.get('cold_read_s'), '.2f')} s.", ""]  # fmt: skip
    best = r.get("best", {})
    if not best:
        return out + render_generic(r)
    runs = list(best.items())
    for key, label in (("spawned_workers_same_call", "workers spawned, not forked"),
                       ("tokenizer_prefetch", "tokenizers prefetched"),
                       ("fa4_without_disk_cache", "FA4 installed, JIT not cached")):  # fmt: skip
        extra = r.get(key) or {}
        tag = f"{label}, commit {extra['commit']}" if extra.get("commit") else label
        runs += [(f"{name} ({tag})", b) for name, b in (extra.get("best") or {}).items()]
    rows = [[name, fmt(b.get("import_s"), ".2f"), fmt(b.get("ready_s"), ".2f"),
             fmt(b.get("total_s"), ".2f")] for name, b in runs]  # fmt: skip
    return out + table(["run (best of reps)", "import s", "ready s", "total s"], rows)


def memory_fit(r: dict[str, Any]) -> Lines:
    rows = []
    for c in r.get("results", []):
        if c["kind"] == "vae":
            tiles = {True: "tiled", False: "whole"}.get(c["tiled"], f"{c['tiled']} tiles")
            what = f"VAE decode {c['resolution']} {c['precision']} {tiles}"
            if c.get("levels"):
                what += ", to uint8 frames"
        elif c["kind"] == "dit":
            what = f"DiT 14B {c['resolution']} {c['mode']}, budget {fmt(c['budget_gb'], '.0f')} GiB"
        elif c["kind"] == "e2e":
            budget = "none" if c["budget_gb"] is None else f"{c['budget_gb']:.0f} GiB"
            what = f"14B video {c['resolution']} end to end ({c['steps']} steps), budget {budget}"
        else:
            what = "UMT5-XXL text encoder bf16 / fp8 linears"
        if c.get("status") != "ok":
            rows.append([what, c.get("status", "?"), "", ""])
        elif c["kind"] == "e2e":
            note = (f"ms per step; ready {fmt(c['ready_s'])} s, decode {fmt(c['decode_s'])} s; "
                    + "; ".join(c.get("memory_plan", [])))  # fmt: skip
            rows.append([what, fmt(c["step_ms"]), fmt(c["peak_gib"], ".2f"), note])
        elif c["kind"] == "text_encoder":
            b, f = c["bf16"], c["fp8"]
            gib = [fmt(x["weights_on_gpu_gib"], ".2f") for x in (b, f)]
            rows.append([what, f"{fmt(b['ms'])} / {fmt(f['ms'])}", " / ".join(gib),
                         f"fp8 rel. err {fmt(c['fp8_rel_err_vs_bf16'], '.2e')}"])  # fmt: skip
        else:
            extra = (f"estimate {fmt(c['estimate_gib'], '.2f')} GiB" if c["kind"] == "vae"
                     else f"weights on GPU {fmt(c['weights_on_gpu_gib'], '.2f')} GiB")  # fmt: skip
            if c["kind"] == "vae" and "peak_above_weights_gib" in c:
                extra += f"; +{fmt(c['peak_above_weights_gib'], '.2f')} GiB above the weights"
            if c.get("grid"):
                extra += (f"; grid {c['grid'][0]}x{c['grid'][1]} within "
                          f"{fmt(c.get('exact_budget_gib'), '.2f')} GiB, halo work "
                          f"{fmt(c.get('tile_work'), '.3f')}x")  # fmt: skip
            rows.append([what, fmt(c["ms"]), fmt(c["peak_gib"], ".2f"), extra])
    return table(["case", "ms", "peak GiB", "note"], rows)


def render_generic(r: dict[str, Any]) -> Lines:
    """Every scalar of the result (nested keys joined by dots), at most 40."""
    rows: list[list[str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)) and len(rows) < 40:
            rows.append([prefix, fmt(value, ".4g") if isinstance(value, float) else fmt(value)])

    walk("", {k: v for k, v in r.items() if k not in ENV_KEYS})
    return table(["field", "value"], rows) if rows else ["_(no scalar fields)_"]


RENDERERS: dict[str, Callable[[dict[str, Any]], Lines]] = {
    "attention_kernels": attention_kernels,
    "latency": latency,
    "models": models,
    "parallel_scaling": parallel_scaling,
    "diffusers_cp": diffusers_cp,
    "throughput": throughput,
    "engine_overhead_tiny": throughput,
    "pytest": gpu_tests,
    "load": load,
    "load_previous": load,  # written before load.py named itself in its result
    "memory_fit": memory_fit,
}
