"""`lfm eval`: accuracy and average precision of a detector on test subsets, as the authors report them.

Preprocessing as released for testing: resize to 256x256, no crop (`resize=None` for sets such as
GANGen-Detection, which the authors score at their native size). Writes results.csv and results.json
(metrics per subset and their mean) and predictions.csv (prob_fake per image, to study calibration).
"""
import csv
import io
import math

import numpy as np

from .data import describe_failures, find_test_subsets
from .engines import DEFAULT_ENGINE, check_engine, prepare
from .errors import UsageError, warn
from .images import DEFAULT_MAX_PIXELS, TEST_SIZE, EvalTransform
from .inference import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, check_loading_options, score_items
from .metrics import METRICS, binary_metrics, format_table, mean_metrics
from .runtime import compute_dtype, session
from .weights import load_model, prepare_output_folder, write_json, write_text

CSV_COLUMNS = ("subset", "n", "n_real", "n_fake") + METRICS
DEFAULT_OUT = "runs/eval"


def subset_metrics(subsets: dict, prob_fake: np.ndarray) -> dict:
    """Metrics per subset from the probabilities of all subsets' items concatenated in order;
    unscored items (NaN) are left out."""
    rows, start = {}, 0
    for name, items in subsets.items():
        probs = prob_fake[start:start + len(items)]
        labels = np.array([item.label for item in items])
        scored = ~np.isnan(probs)
        rows[name] = binary_metrics(labels[scored], probs[scored])
        start += len(items)
    return rows


def _csv_text(header, rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def results_csv(rows: dict, mean: dict) -> str:
    return _csv_text(CSV_COLUMNS, [[name] + [row[key] for key in CSV_COLUMNS[1:]]
                                   for name, row in list(rows.items()) + [("mean", mean)]])


def predictions_csv(subsets: dict, prob_fake: np.ndarray) -> str:
    """subset, path, label, prob_fake per image (prob_fake empty where the image could not be scored)."""
    names = [name for name, items in subsets.items() for _ in items]
    items = [item for subset in subsets.values() for item in subset]
    return _csv_text(("subset", "path", "label", "prob_fake"),
                     [[name, item.path, item.label, "" if np.isnan(p) else repr(float(p))]
                      for name, item, p in zip(names, items, prob_fake)])


def evaluate(weights, roots, *, model_name=None, resize=TEST_SIZE, depth=None, batch_size=DEFAULT_BATCH_SIZE,
             workers=DEFAULT_WORKERS, device="auto", precision="float32", backend="auto",
             max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False, out=DEFAULT_OUT, progress=None, log=print,
             engine=DEFAULT_ENGINE):
    """Score every test subset under `roots`; on rank 0 print the table, write `out`/results.{csv,json}
    and predictions.csv and return the report (other ranks return None). `engine`: see lfm.engines."""
    check_loading_options(batch_size, workers, max_pixels)
    check_engine(engine, resize, precision)
    subsets = find_test_subsets(roots, depth)
    out = prepare_output_folder(out, "--out")
    items = [item for subset in subsets.values() for item in subset]
    with session(device, backend, precision) as ctx:
        model, config = load_model(weights, model_name, backend=backend, command="eval",
                                   dtype=compute_dtype(precision))
        runner = prepare(model.to(ctx.device), engine, ctx.device, (resize, resize), "eval")
        scores = score_items(runner, items, EvalTransform(resize), ctx, batch_size=batch_size,
                             workers=workers, precision=precision, max_pixels=max_pixels,
                             exif_transpose=exif_transpose, progress=progress, desc="evaluating")
    paths = [item.path for item in items]
    if scores.failures and ctx.is_main:
        warn("eval", describe_failures(scores.failures, paths))
    if np.isnan(scores.prob_fake).all():
        raise UsageError(f"no image could be scored among the {len(items)} file(s) under {', '.join(map(str, roots))}")
    if not ctx.is_main:
        return None
    rows = subset_metrics(subsets, scores.prob_fake)
    for name, row in rows.items():
        if row["n"] == 0:
            warn("eval", f"subset {name}: no image could be scored; it is left out of the mean")
    mean = mean_metrics(list(rows.values()))
    report = {
        "weights": str(weights), "model": config, "resize": resize, "precision": precision,
        "subsets": rows, "mean": mean,
        "skipped": [{"path": str(items[i].path), "reason": reason} for i, reason in scores.failures],
    }
    write_text(out / "results.csv", results_csv(rows, mean))
    write_text(out / "predictions.csv", predictions_csv(subsets, scores.prob_fake))
    # JSON has no NaN: a metric that does not exist (a class absent from a subset) is null.
    write_json(out / "results.json", _nan_to_none(report))
    log(format_table(rows, mean))
    log(f"results: {out / 'results.csv'}, {out / 'results.json'}, {out / 'predictions.csv'}")
    return report


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(value) for value in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj
