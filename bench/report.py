"""The one table writer: results -> Markdown tables, the goals check, a throughput plot.

Each row (bench.harness.measure) holds its labels, its minimal work (bytes, flops, images), its median
time and interquartile range. The peaks come from the same run: the device-to-device copy row gives the
copy bandwidth, the large matmul rows give the matmul peak per dtype (TF32 for float32). From them every
row gets images/s, GB/s, TFLOP/s, the share of each peak, and which of the two bounds it (the roofline of
its minimal work).

    python -m bench.report bench/results/<gpu>-<date>-<time>.jsonl    # (re)writes the .md and .png beside it
"""
import argparse
import sys
from pathlib import Path

from bench import results
from bench.shapes import IMAGE_SIZE, LARGE_BATCH, TRAIN_BATCH

INFERENCE_GROUP = "lfm inference"
TRAINING_GROUP = "lfm training step"
PEAK_GROUP = "peak"
CUDA_GRAPH_GROUP = "lfm inference, CUDA graph"
HOST_TIME_GROUP = "lfm host time"  # bench_host_time: the host side of a forward or a training step, launches stubbed
# Goals (issues 21 and 22), each checked in the rows of one run. Inference at GOAL_SIZE and LARGE_BATCH: ours
# this many times faster than eager float32 and than the best torch.compile of its dtype; batch TRAIN_BATCH at
# least this share of LARGE_BATCH's images/s. The training step: this many times compile-default's images/s, at
# most this share of eager's peak memory. Per op: ours at least as fast as eager; a memory-bound kernel at least
# this share of the copy bandwidth, an SNet conv forward (compute-bound) of the matmul peak.
SPEEDUP_OVER_EAGER_FP32 = 5.0
SPEEDUP_OVER_BEST_COMPILE = 2.0
SMALL_BATCH_SHARE = 0.8
TRAINING_SPEEDUP_OVER_COMPILE = 2.0
TRAINING_MEMORY_SHARE = 1 / 3
COPY_BANDWIDTH_SHARE = 0.70
MATMUL_PEAK_SHARE = 0.50
HOST_TIME_GOAL_S = 100e-6  # one forward at batch 1, launches stubbed out
CUDA_GRAPH_GOAL_S = 0.1e-3  # triton at batch 1 in a CUDA graph, per image
GOAL_SIZE = IMAGE_SIZE
# An op whose minimal work takes less than this at the peaks is bound by launch latency, not by a roofline.
LATENCY_S = 5e-6
PROFILE_KERNELS = 12  # kernels listed per profiled case, longest first (the rest in one line)
KERNEL_NAME_CHARS = 90  # cuDNN's and ATen's kernel names run to hundreds of characters


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
    """One Markdown table per group; "x eager" is the speedup over the eager provider on the same case, "peak
    MiB" the device memory a call allocates beyond what was held before it (bench.harness.call_peak_bytes)."""
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
                "| op | mode | dtype | batch | size | provider | ms (median) | IQR ms | images/s | x eager | GB/s "
                "| % copy BW | TFLOP/s | % matmul peak | % roofline | bound | peak MiB |",
                "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in (r for r in rows if r["group"] == group):
            d = derived(r, peaks)
            base = eager.get(case_key(r))
            out.append("| " + " | ".join([
                r["op"], r["mode"], r["dtype"], str(r["batch"]), str(r["size"]), r["provider"],
                f"{d['ms']:.3f}", f"{(r['q3_s'] - r['q1_s']) * 1e3:.3f}", _fmt(d["images_s"], ",.0f"),
                _fmt(base and base / r["median_s"], ".2f"),
                f"{d['gb_s']:.1f}", _fmt(d["bw_share"] and 100 * d["bw_share"], ".0f"), f"{d['tflop_s']:.2f}",
                _fmt(d["flop_share"] and 100 * d["flop_share"], ".0f"),
                _fmt(d["roofline"] and 100 * d["roofline"], ".0f"), d["bound"] or "-",
                _fmt(r.get("peak_bytes") and r["peak_bytes"] / 2**20, ",.0f")]) + " |")
    return "\n".join(out)


def goal_checks(rows):
    """(goal, verdict, detail) for each goal above that the rows can answer; verdict PASS, FAIL or
    NOT MEASURED."""
    peaks = measured_peaks(rows)
    times = {(r["group"], r["provider"], r["dtype"], r["batch"], r["size"]): r["median_s"] for r in rows
             if r["op"] == "lfm"}
    checks = []
    dtypes = sorted({r["dtype"] for r in rows if r["group"] in (INFERENCE_GROUP, TRAINING_GROUP)})
    for dtype in dtypes:
        ours = times.get((INFERENCE_GROUP, "triton", dtype, LARGE_BATCH, GOAL_SIZE))
        eager = times.get((INFERENCE_GROUP, "eager", "float32", LARGE_BATCH, GOAL_SIZE))
        compile_times = [t for t in (times.get((INFERENCE_GROUP, p, dtype, LARGE_BATCH, GOAL_SIZE))
                                     for p in ("compile-default", "compile-max-autotune")) if t]
        case = f"inference {GOAL_SIZE}x{GOAL_SIZE} batch {LARGE_BATCH}, triton {dtype}"
        checks.append(_ratio_check(f"{case} >= {SPEEDUP_OVER_EAGER_FP32:g}x eager float32", eager, ours,
                                   SPEEDUP_OVER_EAGER_FP32))
        checks.append(_ratio_check(f"{case} >= {SPEEDUP_OVER_BEST_COMPILE:g}x best torch.compile {dtype}",
                                   min(compile_times) if compile_times else None, ours, SPEEDUP_OVER_BEST_COMPILE))
        # Per image: batch TRAIN_BATCH's images/s over LARGE_BATCH's.
        small = times.get((INFERENCE_GROUP, "triton", dtype, TRAIN_BATCH, GOAL_SIZE))
        checks.append(_ratio_check(f"inference {GOAL_SIZE}x{GOAL_SIZE} triton {dtype}: batch {TRAIN_BATCH} >= "
                                   f"{SMALL_BATCH_SHARE:.0%} of batch {LARGE_BATCH}'s images/s",
                                   ours and ours / LARGE_BATCH, small and small / TRAIN_BATCH, SMALL_BATCH_SHARE))
        train = {r["provider"]: r for r in rows if r["group"] == TRAINING_GROUP and r["dtype"] == dtype}
        ours_row = train.get("triton")
        checks.append(_ratio_check(f"training step triton {dtype} >= {TRAINING_SPEEDUP_OVER_COMPILE:g}x "
                                   f"compile-default {dtype}", train.get("compile-default", {}).get("median_s"),
                                   ours_row and ours_row["median_s"], TRAINING_SPEEDUP_OVER_COMPILE))
        checks.append(_memory_check(f"training step triton {dtype}: peak memory <= {TRAINING_MEMORY_SHARE:.2f}x "
                                    f"eager's", train.get("eager"), ours_row, TRAINING_MEMORY_SHARE))
    for r in rows:
        if r["group"] == CUDA_GRAPH_GROUP and r["provider"] == "triton":
            goal = f"triton {r['dtype']} batch 1 in a CUDA graph <= {CUDA_GRAPH_GOAL_S * 1e3:.1f} ms per image"
            verdict = "PASS" if r["median_s"] <= CUDA_GRAPH_GOAL_S else "FAIL"
            checks.append((goal, verdict, f"{r['median_s'] * 1e3:.3f} ms"))
        if r["group"] == HOST_TIME_GROUP and r["mode"].startswith("training"):
            # Not a goal of its own: whether the host keeps up with our step's device time in this run.
            goal = (f"training step triton {r['dtype']} batch {r['batch']}: host time (launches stubbed out) "
                    f"below the measured step time (not host-bound)")
            step = times.get((TRAINING_GROUP, "triton", r["dtype"], r["batch"], r["size"]))
            detail = f"{r['median_s'] * 1e3:.2f} ms, {r['launches']} launches per step"
            checks.append((goal, "NOT MEASURED", f"{detail}; no training step row at this batch") if step is None
                          else (goal, "PASS" if r["median_s"] < step else "FAIL",
                                f"{detail} against a step of {step * 1e3:.2f} ms"))
        elif r["group"] == HOST_TIME_GROUP:
            goal = (f"host time of one forward at batch {r['batch']}, launches stubbed out, "
                    f"<= {HOST_TIME_GOAL_S * 1e6:.0f} us")
            verdict = "PASS" if r["median_s"] <= HOST_TIME_GOAL_S else "FAIL"
            checks.append((goal, verdict, f"{r['median_s'] * 1e6:.0f} us, {r['launches']} launches per forward"))
    eager_ops = {case_key(r): r["median_s"] for r in rows if r["provider"] == "eager" and r["group"].startswith("op:")}
    for r in rows:
        if r["provider"] != "triton" or not r["group"].startswith("op:"):
            continue
        case = f"{r['op']} {r['mode']} {r['dtype']} batch {r['batch']}"
        checks.append(_ratio_check(f"{case}: triton at least as fast as eager", eager_ops.get(case_key(r)),
                                   r["median_s"], 1.0))
        d = derived(r, peaks)
        if d["bound"] == "memory":
            goal = f"{case}: memory-bound kernel >= {COPY_BANDWIDTH_SHARE:.0%} of copy bandwidth"
            verdict = "PASS" if d["bw_share"] >= COPY_BANDWIDTH_SHARE else "FAIL"
            checks.append((goal, verdict, f"{d['gb_s']:.0f} GB/s = {d['bw_share']:.0%}"))
        elif d["bound"] == "compute" and r["op"].startswith("snet_") and r["mode"] == "forward":
            goal = f"{case}: SNet conv >= {MATMUL_PEAK_SHARE:.0%} of the {r['dtype']} matmul peak"
            verdict = "PASS" if d["flop_share"] >= MATMUL_PEAK_SHARE else "FAIL"
            checks.append((goal, verdict, f"{d['tflop_s']:.0f} TFLOP/s = {d['flop_share']:.0%}"))
    return checks


def _memory_check(goal, eager_row, ours_row, share):
    eager_bytes, ours_bytes = (r and r.get("peak_bytes") for r in (eager_row, ours_row))
    if not eager_bytes or ours_bytes is None:
        return goal, "NOT MEASURED", "a provider of this comparison has no peak memory"
    ratio = ours_bytes / eager_bytes
    return (goal, "PASS" if ratio <= share else "FAIL",
            f"{ours_bytes / 2**20:,.0f} MiB against {eager_bytes / 2**20:,.0f} MiB = {ratio:.2f}x")


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


def format_profiles(profiles, rows) -> str:
    """Per profiled case (bench_kernel_profile): the device's busy time per call against the case's timed
    median (less than the median: the host or gaps between launches bound the call), then its longest
    PROFILE_KERNELS kernels with their launches, time and share per call, the rest summed in one line."""
    timed = {(r["provider"], r["dtype"], r["batch"], r["size"], r["mode"]): r["median_s"] for r in rows
             if r["group"] in (INFERENCE_GROUP, TRAINING_GROUP)}
    out = []
    for p in profiles:
        on_gpu = p["device"] == "cuda"
        busy = "device" if on_gpu else "CPU ops"
        median = timed.get((p["provider"], p["dtype"], p["batch"], p["size"], p["mode"]))
        line = f"{busy} busy {p['total_s'] * 1e3:.3f} ms per call"
        if median:
            line += f", {p['total_s'] / median:.0%} of the timed median {median * 1e3:.3f} ms"
        out += ["" if out else None, f"#### {p['op']} {p['mode']}, {p['provider']} {p['dtype']}, batch {p['batch']}, "
                f"{p['size']}x{p['size']} ({p['calls']} calls profiled)", "", line, "",
                "| kernel | launches per call | ms per call | % of busy |" if on_gpu else
                "| op | calls per call | ms per call | % of busy |", "|---|---:|---:|---:|"]
        kernels = p["kernels"]
        for k in kernels[:PROFILE_KERNELS]:
            name = k["name"].replace("|", "/")
            name = name if len(name) <= KERNEL_NAME_CHARS else name[:KERNEL_NAME_CHARS - 3] + "..."
            out.append(f"| `{name}` | {k['launches']:g} | {k['seconds'] * 1e3:.3f} | "
                       f"{k['seconds'] / p['total_s']:.1%} |")
        rest = kernels[PROFILE_KERNELS:]
        if rest:
            seconds = sum(k["seconds"] for k in rest)
            out.append(f"| {len(rest)} more | {sum(k['launches'] for k in rest):g} | {seconds * 1e3:.3f} | "
                       f"{seconds / p['total_s']:.1%} |")
    return "\n".join(line for line in out if line is not None)


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


def format_tests(tests) -> str:
    """The smoke tier's outcomes, failures first."""
    order = {"failed": 0, "timeout": 0, "crashed": 0, "started": 1, "skipped": 2, "passed": 3}
    lines = ["| test | outcome | s | detail |", "|---|---|---:|---|"]
    for t in sorted(tests, key=lambda t: order.get(t["outcome"], 1)):
        lines.append(f"| `{t['test']}` | {t['outcome']} | {t.get('duration_s', 0):.1f} | {t.get('reason', '')} |")
    return "\n".join(lines)


def format_tiers(tiers) -> str:
    """How long each tier took, or why it did not run."""
    done = [f"{t['tier']} {t['duration_s']:.0f} s" if t["status"] == "done" else f"{t['tier']} skipped ({t['reason']})"
            for t in tiers]
    return "Tiers: " + (", ".join(done) if done else "none finished (the run was stopped during its first).")


def render(loaded: dict) -> str:
    """The Markdown report of a loaded results file (bench.results.load): environment, weights, the smoke
    tier, goals, tables, the kernel profiles, tiers and what was not measured."""
    header, rows = loaded["header"], loaded["rows"]
    env = header["environment"]
    tests = list(loaded["tests"].values())
    lines = [f"## {env['device']}, {env['date']}", ""]
    if header.get("random_weights"):
        lines += [f"> **WARNING: {header['weights']}**", ""]
    lines += [f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
              f"commit {env['commit']}; weights: {header['weights']}; cuDNN benchmark mode "
              f"{'on' if env['cudnn_benchmark'] else 'off'}, cuDNN TF32 {'on' if env['cudnn_allow_tf32'] else 'off'}; "
              f"budget {header['budget_s']:.0f} s.", "", format_tiers(loaded["tiers"])]
    smoke = [t for t in tests if t.get("tier") == "smoke"]
    if smoke:
        lines += ["", "### Correctness smoke (real kernels against the PyTorch reference)", "", format_tests(smoke)]
    lines += ["", "### Goals", "", format_goals(rows), "", format_tables(rows)]
    if loaded["profiles"]:
        lines += ["", "### Where the device time goes", "", format_profiles(loaded["profiles"], rows)]
    missing = [t for t in tests if t.get("tier") != "smoke" and t["outcome"] != "passed"]
    if missing:
        lines += ["", "### Not measured", ""] + [f"- `{t['test']}`: {t['outcome']}: {t.get('reason', '')}"
                                                  for t in missing]
    return "\n".join(lines) + "\n"


def write_report(path):
    """(Re)write the .md and .png beside a results file."""
    path = Path(path)
    loaded = results.load(path)
    path.with_suffix(".md").write_text(render(loaded))
    try:
        device = loaded["header"]["environment"]["device"]
        plot_throughput(loaded["rows"], path.with_suffix(".png"), f"LFM end to end, {device}")
    except ImportError:  # matplotlib is an optional dependency (the demo's)
        sys.stderr.write("bench.report: matplotlib is not installed, no .png\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-render the Markdown report and plot of saved results.")
    parser.add_argument("results", nargs="+", help="bench/results/<gpu>-<date>-<time>.jsonl")
    for path in parser.parse_args(argv).results:
        write_report(path)
        sys.stdout.write(Path(path).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
