"""`lfm eval`: a detector's metrics on test subsets, as detection papers report them, and its robustness.

Preprocessing as released for testing: resize to 256x256, no crop (`resize=None` for sets such as
GANGen-Detection, which the authors score at their native size; `center_crop` as the benchmarks that
test at 224). Test sets come in any layout of lfm.data.LAYOUTS. Each perturbation of a sweep
(lfm.perturb) scores every image again, perturbed after loading and before preprocessing. A threshold
may be chosen on a validation set (`calibrate_on`, the best-accuracy threshold there) and applied to
the test subsets (cal_acc). Writes results.csv and results.json (metrics per perturbation and subset,
and their mean), predictions.csv (prob_fake per image) and, for a sweep, robustness.png.
"""
import csv
import io
import math

import numpy as np

from .data import describe_failures, find_test_subsets
from .engines import DEFAULT_ENGINE, check_engine, prepare
from .errors import UsageError, warn
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, EvalTransform
from .inference import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, cap_workers, check_loading_options, score_items
from .metrics import CALIBRATED, METRICS, best_threshold, binary_metrics, format_table, mean_metrics
from .perturb import SEVERITY_NAMES, parse_sweeps
from .runtime import compute_dtype, session
from .weights import load_model, prepare_output_folder, write_json, write_text

CLEAN = "none"  # the name of the unperturbed condition in the results
DEFAULT_OUT = "runs/eval"
PLOT_FILE = "robustness.png"
PLOTTED = ("acc", "ap", "auc")


def subset_metrics(subsets: dict, prob_fake: np.ndarray, threshold: float | None = None) -> dict:
    """Metrics per subset from the probabilities of all subsets' items concatenated in order;
    unscored items (NaN) are left out. `threshold`: the calibrated one, for cal_acc."""
    rows, start = {}, 0
    for name, items in subsets.items():
        probs = prob_fake[start:start + len(items)]
        labels = np.array([item.label for item in items])
        scored = ~np.isnan(probs)
        rows[name] = binary_metrics(labels[scored], probs[scored], threshold)
        start += len(items)
    return rows


def _csv_text(header, rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def results_csv(conditions: dict) -> str:
    """One row per perturbation and subset, then the perturbation's mean: conditions maps a perturbation's
    name to {"subsets": rows, "mean": mean}."""
    first = next(iter(conditions.values()))["mean"]
    columns = ("n", "n_real", "n_fake") + METRICS + ((CALIBRATED,) if CALIBRATED in first else ())
    rows = [[condition, name] + [row[key] for key in columns]
            for condition, result in conditions.items()
            for name, row in list(result["subsets"].items()) + [("mean", result["mean"])]]
    return _csv_text(("perturbation", "subset") + columns, rows)


def predictions_csv(subsets: dict, scores: dict) -> str:
    """subset, path, label, prob_fake, perturbation per image and perturbation (prob_fake empty where the
    image could not be scored); `scores` maps a perturbation's name to prob_fake of every item."""
    names = [name for name, items in subsets.items() for _ in items]
    items = [item for subset in subsets.values() for item in subset]
    return _csv_text(("subset", "path", "label", "prob_fake", "perturbation"),
                     [[name, item.path, item.label, "" if np.isnan(p) else repr(float(p)), condition]
                      for condition, prob_fake in scores.items()
                      for name, item, p in zip(names, items, prob_fake)])


def _check_center_crop(center_crop, resize):
    if center_crop is None:
        return
    if isinstance(center_crop, bool) or not isinstance(center_crop, int) or center_crop < 1:
        raise UsageError(f"--center-crop must be an integer >= 1, got {center_crop!r}")
    if resize and center_crop > resize:
        raise UsageError(f"--center-crop {center_crop} is larger than the {resize}x{resize} resize")


def _calibration_items(root):
    """The images of the validation root pooled, in whichever layout it fits; both classes needed."""
    items = [item for subset in find_test_subsets([root]).values() for item in subset]
    if len({item.label for item in items}) < 2:
        raise UsageError(f"--calibrate-on {root}: a threshold needs real and fake images; it holds only "
                         f"{'fake' if items[0].label else 'real'} ones")
    return items


def evaluate(weights, roots, *, model_name=None, resize=TEST_SIZE, center_crop=None, depth=None, layout=None,
             perturbations=(), calibrate_on=None, batch_size=DEFAULT_BATCH_SIZE, workers=DEFAULT_WORKERS,
             device="auto", precision="float32", backend="auto", max_pixels=DEFAULT_MAX_PIXELS,
             exif_transpose=False, out=DEFAULT_OUT, progress=None, log=print, engine=DEFAULT_ENGINE):
    """Score every test subset under `roots` (in `layout`, else the one each root fits), clean and under
    each perturbation of `perturbations` (strings such as "jpeg:95,75" or "blur:1,2"); with
    `calibrate_on`, a validation root, also the accuracy at the best threshold found there. On rank 0
    print the tables, write `out`/results.{csv,json}, predictions.csv and, for a sweep, robustness.png,
    and return the report (other ranks return None). `engine`: see lfm.engines.

    Every option, layout and perturbation is checked before any image is read."""
    check_loading_options(batch_size, workers, max_pixels)
    check_engine(engine, resize, precision)
    _check_center_crop(center_crop, resize)
    sweep = parse_sweeps(perturbations)
    subsets = find_test_subsets(roots, depth, layout)
    calibration = _calibration_items(calibrate_on) if calibrate_on is not None else None
    plot = bool(sweep) and _can_plot()
    out = prepare_output_folder(out, "--out")
    items = [item for subset in subsets.values() for item in subset]
    workers = cap_workers(workers, len(items), batch_size, "eval")
    size = center_crop or resize
    options = dict(batch_size=batch_size, workers=workers, precision=precision, max_pixels=max_pixels,
                   exif_transpose=exif_transpose, progress=progress)
    with session(device, backend, precision) as ctx:
        model, config = load_model(weights, model_name, backend=backend, command="eval",
                                   dtype=compute_dtype(precision))
        runner = prepare(model.to(ctx.device), engine, ctx.device, (size, size), "eval")
        threshold = None
        if calibration is not None:
            cal = score_items(runner, calibration, EvalTransform(resize, center_crop), ctx, desc="calibrating",
                              **options)
            threshold = _calibrated_threshold(calibration, cal, calibrate_on, ctx)
        scores = {}
        for perturbation in [None] + sweep:
            name = perturbation.name if perturbation else CLEAN
            scores[name] = score_items(runner, items, EvalTransform(resize, center_crop, perturbation), ctx,
                                       desc=f"evaluating ({name})" if perturbation else "evaluating", **options)
    clean = scores[CLEAN]
    paths = [item.path for item in items]
    if ctx.is_main:
        _report_failures(scores, paths)
    if np.isnan(clean.prob_fake).all():
        raise UsageError(f"no image could be scored among the {len(items)} file(s) under {', '.join(map(str, roots))}")
    if not ctx.is_main:
        return None
    conditions = {}
    for name, result in scores.items():
        rows = subset_metrics(subsets, result.prob_fake, threshold)
        conditions[name] = {"subsets": rows, "mean": mean_metrics(list(rows.values()))}
    for name, row in conditions[CLEAN]["subsets"].items():
        if row["n"] == 0:
            warn("eval", f"subset {name}: no image could be scored; it is left out of the mean")
    report = {
        "weights": str(weights), "model": config, "resize": resize, "center_crop": center_crop,
        "precision": precision,
        "calibration": None if threshold is None else {"root": str(calibrate_on), "threshold": threshold,
                                                       "n": len(calibration)},
        "subsets": conditions[CLEAN]["subsets"], "mean": conditions[CLEAN]["mean"],
        "perturbations": {p.name: {"kind": p.kind, "severity": p.severity, **conditions[p.name]} for p in sweep},
        "skipped": [{"path": str(items[i].path), "reason": reason} for i, reason in clean.failures],
    }
    written = [out / "results.csv", out / "results.json", out / "predictions.csv"]
    write_text(out / "results.csv", results_csv(conditions))
    # JSON has no NaN: a metric that does not exist (a class absent from a subset) is null. Written before the
    # predictions, the larger file, so that the results are saved whatever happens to it.
    write_json(out / "results.json", _nan_to_none(report))
    write_text(out / "predictions.csv", predictions_csv(subsets, {name: s.prob_fake for name, s in scores.items()}))
    if threshold is not None:
        log(f"cal_acc: accuracy at the threshold {threshold:.6g}, the best on {calibrate_on} ({len(calibration)} "
            "images)")
    log(format_table(conditions[CLEAN]["subsets"], conditions[CLEAN]["mean"]))
    if sweep:
        log("\n" + format_table({name: result["mean"] for name, result in conditions.items()},
                                title="perturbation (mean over subsets)"))
        if plot:
            plot_sweep(report, out / PLOT_FILE)
            written.append(out / PLOT_FILE)
    log(f"results: {', '.join(map(str, written))}")
    return report


def _calibrated_threshold(calibration, scores, root, ctx) -> float:
    """The best-accuracy threshold over the validation images that could be scored (the others are warned
    about)."""
    scored = ~np.isnan(scores.prob_fake)
    if scores.failures and ctx.is_main:
        warn("eval", f"--calibrate-on {root}: " + describe_failures(scores.failures, [i.path for i in calibration]))
    labels = np.array([item.label for item in calibration])[scored]
    if len(set(labels.tolist())) < 2:
        raise UsageError(f"--calibrate-on {root}: too few of its images could be scored to choose a threshold")
    return best_threshold(labels, scores.prob_fake[scored])[1]


def _report_failures(scores: dict, paths):
    """The clean run's skipped files, then per perturbation those it alone could not use."""
    clean = {index for index, _ in scores[CLEAN].failures}
    if clean:
        warn("eval", describe_failures(scores[CLEAN].failures, paths))
    for name, result in scores.items():
        new = [(index, reason) for index, reason in result.failures if index not in clean]
        if name != CLEAN and new:
            warn("eval", f"under {name}, " + describe_failures(new, paths))


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("eval", f"no {PLOT_FILE}: plotting needs matplotlib (pip install 'lfm[demo]')")
        return False
    return True


def plot_sweep(report: dict, path):
    """acc, AP and AUC (percent) against severity, one row of plots per perturbation kind, a line per
    subset and the mean; the unperturbed score is the first point of every line."""
    _plot_lines({name: (report, name) for name in list(report["subsets"]) + ["mean"]}, path)


def plot_comparison(reports: dict, path):
    """As plot_sweep, a line per report (e.g. per model, from results.json files of the same sweep): the
    mean over its subsets."""
    _plot_lines({label: (report, "mean") for label, report in reports.items()}, path)


def _plot_lines(lines: dict, path):
    """lines: label -> (report, "mean" or a subset's name); the sweep is that of the first report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(result, subset, metric):
        number = (result["mean"] if subset == "mean" else result["subsets"][subset])[metric]
        return math.nan if number is None else 100 * number  # None: NaN read back from results.json

    kinds = {}
    for name, result in next(iter(lines.values()))[0]["perturbations"].items():
        kinds.setdefault(result["kind"], []).append((name, result["severity"]))
    fig, axes = plt.subplots(len(kinds), len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.2 * len(kinds)), squeeze=False)
    for row_axes, (kind, points) in zip(axes, kinds.items()):
        labels = [CLEAN] + [f"{severity:g}" for _, severity in points]
        for ax, metric in zip(row_axes, PLOTTED):
            for label, (report, subset) in lines.items():
                results = [report] + [report["perturbations"][name] for name, _ in points]
                style = dict(color="black", linewidth=2.2) if label == "mean" else dict(linewidth=1.4, alpha=0.85)
                ax.plot(range(len(labels)), [value(r, subset, metric) for r in results], marker="o", markersize=3,
                        label=label, **style)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(f"{kind} {SEVERITY_NAMES[kind]}")
            ax.set_title(f"{metric} (%)")
            ax.set_ylim(0, 101)
            ax.axhline(50, color="0.6", linewidth=0.8, linestyle="--")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(names) // 6), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(value) for value in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj
