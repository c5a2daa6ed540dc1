"""Detection metrics as the authors report them, and their table.

Per test subset: accuracy at threshold 0.5 (a probability above 0.5 means "generated"), average
precision (fake is the positive class), accuracy on the real images and on the fake ones; then
the mean of each over subsets.
"""
import math

import numpy as np

METRICS = ("acc", "ap", "real_acc", "fake_acc")


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve as a step sum over distinct thresholds,
    sum_n (R_n - R_{n-1}) P_n: the same definition as scikit-learn's average_precision_score."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = labels.sum()
    if positives == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # The last position of each run of equal scores is one threshold.
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    true_pos = np.cumsum(labels)[last_of_run]
    precision = true_pos / (last_of_run + 1)
    recall_gain = np.diff(np.r_[0, true_pos]) / positives
    return float(np.sum(recall_gain * precision))


def binary_metrics(labels, probs) -> dict:
    """acc, ap, real_acc, fake_acc (NaN when a class is absent) and the counts for one subset."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted_fake = np.asarray(probs, dtype=np.float64) > 0.5
    correct = predicted_fake == (labels == 1)
    real, fake = labels == 0, labels == 1
    return {
        "n": int(labels.size), "n_real": int(real.sum()), "n_fake": int(fake.sum()),
        "acc": float(correct.mean()) if labels.size else math.nan,
        "ap": average_precision(fake, probs) if real.any() else math.nan,
        "real_acc": float(correct[real].mean()) if real.any() else math.nan,
        "fake_acc": float(correct[fake].mean()) if fake.any() else math.nan,
    }


def mean_metrics(rows: list[dict]) -> dict:
    """Mean of each metric over subsets (NaN entries left out) and the total counts."""
    mean = {key: sum(row[key] for row in rows) for key in ("n", "n_real", "n_fake")}
    for key in METRICS:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        mean[key] = sum(values) / len(values) if values else math.nan
    return mean


def format_table(rows: dict[str, dict], mean: dict | None = None, title: str = "subset") -> str:
    """Plain-text table, metrics in percent: one line per subset, then the mean."""
    entries = list(rows.items()) + ([("mean", mean)] if mean is not None else [])
    width = max([len(title)] + [len(name) for name, _ in entries])
    header = f"{title:<{width}}  {'n':>6}  " + "  ".join(f"{key:>8}" for key in METRICS)
    lines = [header, "-" * len(header)]
    for name, row in entries:
        if name == "mean":
            lines.append("-" * len(header))
        cells = "  ".join(f"{'-':>8}" if math.isnan(row[key]) else f"{100 * row[key]:8.2f}" for key in METRICS)
        lines.append(f"{name:<{width}}  {row['n']:>6}  {cells}")
    return "\n".join(lines)
