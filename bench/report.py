"""The one table writer: benchmark rows -> Markdown tables, the goals check, a throughput plot, saved results.

Each row (bench.harness.measure) holds its labels, its minimal work (bytes, flops, images) and its median
time. The peaks come from the same run: the device-to-device copy row gives the copy bandwidth, the large
matmul rows give the matmul peak per dtype (TF32 for float32). From them every row gets images/s, GB/s,
TFLOP/s, the share of each peak, and which of the two bounds it (the roofline of its minimal work).

    python -m bench.report bench/results/<gpu>-<date>.json    # re-renders the .md and .png beside it
"""
import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INFERENCE_GROUP = "lfm inference"
TRAINING_GROUP = "lfm training step"
PEAK_GROUP = "peak"
# BRIEF / issue 5 goals
SPEEDUP_OVER_EAGER_FP32 = 5.0
SPEEDUP_OVER_BEST_COMPILE = 1.5
COPY_BANDWIDTH_SHARE = 0.70
GOAL_SIZE = 256
# An op whose minimal work takes less than this at the peaks is bound by launch latency, not by a roofline.
LATENCY_S = 5e-6


def measured_peaks(rows):
    """{"copy": bytes/s, dtype name: FLOP/s} from the peak rows."""
    peaks = {}
    for r in rows:
        if r["group"] == PEAK_GROUP:
            key = "copy" if r["op"] == "copy" else r["dtype"]
            peaks[key] = (r["bytes"] if key == "copy" else r["flops"]) / r["median_s"]
    return peaks


def derived(row, peaks):
    """images/s, GB/s, TFLOP/s, shares of the peaks, the roofline share and the bound of one row."""
    t = row["median_s"]
    bw, flops_peak = peaks.get("copy"), peaks.get(row["dtype"])
    d = {"ms": t * 1e3, "images_s": row["images"] / t if row["images"] else None,
         "gb_s": row["bytes"] / t / 1e9, "tflop_s": row["flops"] / t / 1e12,
         "bw_share": row["bytes"] / t / bw if bw else None,
         "flop_share": row["flops"] / t / flops_peak if flops_peak else None,
         "roofline": None, "bound": None}
    if bw and flops_peak:
        memory_s, compute_s = row["bytes"] / bw, row["flops"] / flops_peak
        ideal_s = max(memory_s, compute_s)
        d["bound"] = "latency" if ideal_s < LATENCY_S else "memory" if memory_s >= compute_s else "compute"
        d["roofline"] = ideal_s / t
    return d


def case_key(row):
    return row["group"], row["op"], row["dtype"], row["batch"], row["size"], row["mode"]


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_tables(rows) -> str:
    """One Markdown table per group; "x eager" is the speedup over the eager provider on the same case."""
    peaks = measured_peaks(rows)
    eager = {case_key(r): r["median_s"] for r in rows if r["provider"] == "eager"}
    out = []
    if peaks:
        parts = [f"copy {peaks['copy'] / 1e9:.0f} GB/s" if "copy" in peaks else None]
        parts += [f"{k} matmul {v / 1e12:.1f} TFLOP/s" for k, v in peaks.items() if k != "copy"]
        out.append("Measured peaks: " + ", ".join(filter(None, parts)) + " (float32 matmul in TF32 on a GPU)")
    groups = dict.fromkeys(r["group"] for r in rows if r["group"] != PEAK_GROUP)
    for group in groups:
        out += ["", f"### {group}", "",
                "| op | mode | dtype | batch | size | provider | ms | images/s | x eager | GB/s | % copy BW "
                "| TFLOP/s | % matmul peak | % roofline | bound |",
                "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r["group"] == group):
            d = derived(r, peaks)
            base = eager.get(case_key(r))
            out.append("| " + " | ".join([
                r["op"], r["mode"], r["dtype"], str(r["batch"]), str(r["size"]), r["provider"],
                f"{d['ms']:.3f}", _fmt(d["images_s"], ",.0f"), _fmt(base and base / r["median_s"], ".2f"),
                f"{d['gb_s']:.1f}", _fmt(d["bw_share"] and 100 * d["bw_share"], ".0f"), f"{d['tflop_s']:.2f}",
                _fmt(d["flop_share"] and 100 * d["flop_share"], ".0f"),
                _fmt(d["roofline"] and 100 * d["roofline"], ".0f"), d["bound"] or "-"]) + " |")
    return "\n".join(out)


def goal_checks(rows):
    """(goal, verdict, detail) for each goal of issue 5 that the rows can answer; verdict PASS, FAIL or
    NOT MEASURED."""
    peaks = measured_peaks(rows)
    times = {(r["group"], r["op"], r["provider"], r["dtype"], r["batch"], r["size"], r["mode"]): r["median_s"]
             for r in rows}
    checks = []
    inference = [r for r in rows if r["group"] == INFERENCE_GROUP and r["size"] == GOAL_SIZE]
    for batch in sorted({r["batch"] for r in inference}):
        for dtype in sorted({r["dtype"] for r in inference}):
            ours = times.get((INFERENCE_GROUP, "lfm", "triton", dtype, batch, GOAL_SIZE, "inference"))
            eager = times.get((INFERENCE_GROUP, "lfm", "eager", "float32", batch, GOAL_SIZE, "inference"))
            compile_times = [times.get((INFERENCE_GROUP, "lfm", p, dtype, batch, GOAL_SIZE, "inference"))
                             for p in ("compile-default", "compile-max-autotune")]
            compile_times = [t for t in compile_times if t]
            case = f"inference {GOAL_SIZE}x{GOAL_SIZE} batch {batch}, triton {dtype}"
            checks.append(_ratio_check(f"{case} >= {SPEEDUP_OVER_EAGER_FP32}x eager float32", eager, ours,
                                       SPEEDUP_OVER_EAGER_FP32))
            checks.append(_ratio_check(f"{case} >= {SPEEDUP_OVER_BEST_COMPILE}x best torch.compile {dtype}",
                                       min(compile_times) if compile_times else None, ours,
                                       SPEEDUP_OVER_BEST_COMPILE))
    for r in rows:
        if r["provider"] != "triton" or not r["group"].startswith("op:"):
            continue
        d = derived(r, peaks)
        if d["bound"] != "memory":
            continue
        goal = (f"{r['op']} {r['mode']} {r['dtype']} batch {r['batch']}: memory-bound kernel >= "
                f"{COPY_BANDWIDTH_SHARE:.0%} of copy bandwidth")
        verdict = "PASS" if d["bw_share"] >= COPY_BANDWIDTH_SHARE else "FAIL"
        checks.append((goal, verdict, f"{d['gb_s']:.0f} GB/s = {d['bw_share']:.0%}"))
    return checks


def _ratio_check(goal, baseline_s, ours_s, needed):
    if not baseline_s or not ours_s:
        return goal, "NOT MEASURED", "a provider of this comparison has no row"
    speedup = baseline_s / ours_s
    return goal, "PASS" if speedup >= needed else "FAIL", f"{speedup:.2f}x"


def format_goals(rows) -> str:
    checks = goal_checks(rows)
    if not checks:
        return "Goals: nothing to check in these rows (they need GPU inference rows and the peaks)."
    lines = ["| goal | verdict | measured |", "|---|---|---|"]
    return "\n".join(lines + [f"| {goal} | {verdict} | {detail} |" for goal, verdict, detail in checks])


def plot_throughput(rows, path, title):
    """images/s per provider against batch size, one panel per (size, dtype) of the inference rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inference = [r for r in rows if r["group"] == INFERENCE_GROUP]
    panels = sorted({(r["size"], r["dtype"]) for r in inference}, key=lambda p: (-p[0], p[1]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (size, dtype) in zip(axes[0], panels):
        for provider in dict.fromkeys(r["provider"] for r in inference):
            points = sorted((r["batch"], r["images"] / r["median_s"]) for r in inference
                            if (r["size"], r["dtype"], r["provider"]) == (size, dtype, provider))
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.set(xscale="log", yscale="log", xlabel="batch size", title=f"{size}x{size} {dtype}")
        batches = sorted({r["batch"] for r in inference})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("images / s (end to end)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment() -> dict:
    """Device, versions and settings that the numbers depend on."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS_DIR.parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    on_gpu = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU {platform.processor() or platform.machine()}",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def render(results: dict) -> str:
    """The Markdown report of saved results: environment, goals, tables, what was skipped."""
    env = results["environment"]
    lines = [f"## {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
             f"commit {env['commit'] or '?'}; weights: {results.get('weights', '?')}; cuDNN benchmark mode "
             f"{'on' if env['cudnn_benchmark'] else 'off'}, cuDNN TF32 {'on' if env['cudnn_allow_tf32'] else 'off'}.",
             "", "### Goals", "", format_goals(results["rows"]), "", format_tables(results["rows"])]
    if results.get("skipped"):
        lines += ["", "### Not measured", ""] + [f"- `{s['test']}`: {s['reason']}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def save(rows, skipped, weights, directory=RESULTS_DIR):
    """Write <device>-<date>.json, .md and .png under `directory`; returns the JSON path."""
    env = environment()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{slug(env['device'])}-{env['date']}.json"
    results = {"environment": env, "weights": weights, "rows": rows, "skipped": skipped}
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_report(path)
    return path


def write_report(json_path):
    """(Re)write the .md and .png beside a results JSON."""
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(render(results))
    env = results["environment"]
    plot_throughput(results["rows"], json_path.with_suffix(".png"), f"LFM end to end, {env['device']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-render the Markdown table and plot of saved results.")
    parser.add_argument("results", nargs="+", help="bench/results/<gpu>-<date>.json")
    for path in parser.parse_args(argv).results:
        write_report(path)
        sys.stdout.write(Path(path).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
