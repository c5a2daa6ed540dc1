"""Detection metrics as detection papers report them, and their table.

Per test subset, fake being the positive class and prob_fake the score:
  acc        accuracy at threshold 0.5 (a probability above 0.5 means "generated")
  ap         average precision
  auc        area under the ROC curve
  eer        equal error rate: where the false-positive and false-negative rates meet on the ROC
             curve (linearly interpolated between its points)
  real_acc, fake_acc   accuracy at 0.5 on the real images and on the fake ones
  best_acc   accuracy at the best single threshold (the "oracle" accuracy), best_threshold that
             threshold (the rule stays "fake if prob_fake > threshold")
  ece        expected calibration error: |accuracy - confidence| averaged over 15 equal-width bins
             of the confidence in the predicted class, max(p, 1 - p), weighted by their counts
  cal_acc    accuracy at a threshold chosen elsewhere (on a validation set), when one is given
then the mean of each over subsets. Metrics that need both classes are NaN when one is absent.
"""
import math

import numpy as np

METRICS = ("acc", "ap", "auc", "eer", "real_acc", "fake_acc", "best_acc", "best_threshold", "ece")
CALIBRATED = "cal_acc"
ECE_BINS = 15
PLAIN_NUMBERS = ("best_threshold",)  # shown as they are, not in percent


def _ranked(labels, scores):
    """Labels and scores sorted by decreasing score, and the last position of each run of equal scores
    (each run is one threshold)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    return labels, scores, last_of_run


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve as a step sum over distinct thresholds,
    sum_n (R_n - R_{n-1}) P_n: the same definition as scikit-learn's average_precision_score."""
    labels, _, last_of_run = _ranked(labels, scores)
    positives = labels.sum()
    if positives == 0:
        return math.nan
    true_pos = np.cumsum(labels)[last_of_run]
    precision = true_pos / (last_of_run + 1)
    recall_gain = np.diff(np.r_[0, true_pos]) / positives
    return float(np.sum(recall_gain * precision))


def roc_curve(labels, scores):
    """(fpr, tpr) at every distinct threshold, from the strictest (nothing positive: (0, 0)) down to
    the loosest (everything positive: (1, 1)); NaN arrays when a class is absent."""
    labels, _, last_of_run = _ranked(labels, scores)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return np.full(1, math.nan), np.full(1, math.nan)
    true_pos = np.r_[0, np.cumsum(labels)[last_of_run]]
    false_pos = np.r_[0, last_of_run + 1 - true_pos[1:]]
    return false_pos / negatives, true_pos / positives


def roc_auc(labels, scores) -> float:
    """Trapezoidal area under the ROC curve (ties count half): scikit-learn's roc_auc_score."""
    fpr, tpr = roc_curve(labels, scores)
    if np.isnan(fpr).any():
        return math.nan
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def equal_error_rate(labels, scores) -> float:
    """The rate at which false positives and false negatives are equal, on the ROC curve between the
    two points where their difference changes sign."""
    fpr, tpr = roc_curve(labels, scores)
    if np.isnan(fpr).any():
        return math.nan
    gap = (1 - tpr) - fpr  # falls from 1 (strictest) to -1 (loosest)
    i = int(np.argmax(gap <= 0))  # first point at or past the crossing; i >= 1 since gap[0] = 1
    share = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + share * (fpr[i] - fpr[i - 1]))


def best_threshold(labels, scores) -> tuple[float, float]:
    """(accuracy, threshold) of the best rule "fake if score > threshold". The candidates cut between
    consecutive distinct scores (at their midpoint) or beside all of them; among equally accurate ones,
    the closest to 0.5 wins. NaN when a class is absent."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        return math.nan, math.nan
    distinct = np.unique(scores)
    below_all = np.nextafter(distinct[0], -np.inf)
    cuts = np.r_[below_all, (distinct[:-1] + distinct[1:]) / 2, distinct[-1]]
    # Correct answers per cut: fakes above it plus reals at or below it, by counting over sorted scores.
    fake_above = labels.sum() - np.searchsorted(np.sort(scores[labels]), cuts, side="right")
    real_at_or_below = np.searchsorted(np.sort(scores[~labels]), cuts, side="right")
    accuracy = (fake_above + real_at_or_below) / labels.size
    best = np.flatnonzero(accuracy == accuracy.max())
    choice = best[np.argmin(np.abs(cuts[best] - 0.5))]
    return float(accuracy[choice]), float(cuts[choice])


def expected_calibration_error(labels, probs, bins: int = ECE_BINS) -> float:
    """Sum over equal-width bins (lower, upper] of the confidence max(p, 1 - p) in the predicted class
    of |accuracy - mean confidence| times the share of images in the bin."""
    labels = np.asarray(labels, dtype=bool)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        return math.nan
    predicted_fake = probs > 0.5
    confidence = np.where(predicted_fake, probs, 1 - probs)
    correct = predicted_fake == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / labels.size)


def accuracy_at(labels, probs, threshold: float) -> float:
    labels = np.asarray(labels, dtype=bool)
    return float(((np.asarray(probs, dtype=np.float64) > threshold) == labels).mean()) if labels.size else math.nan


def binary_metrics(labels, probs, calibrated_threshold: float | None = None) -> dict:
    """The metrics of one subset (see the module's docstring) and its counts; with
    `calibrated_threshold`, also cal_acc, the accuracy at that threshold."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    correct = (probs > 0.5) == (labels == 1)
    real, fake = labels == 0, labels == 1
    both = real.any() and fake.any()
    best_acc, threshold = best_threshold(fake, probs)
    row = {
        "n": int(labels.size), "n_real": int(real.sum()), "n_fake": int(fake.sum()),
        "acc": float(correct.mean()) if labels.size else math.nan,
        "ap": average_precision(fake, probs) if both else math.nan,
        "auc": roc_auc(fake, probs),
        "eer": equal_error_rate(fake, probs),
        "real_acc": float(correct[real].mean()) if real.any() else math.nan,
        "fake_acc": float(correct[fake].mean()) if fake.any() else math.nan,
        "best_acc": best_acc, "best_threshold": threshold,
        "ece": expected_calibration_error(fake, probs),
    }
    if calibrated_threshold is not None:
        row[CALIBRATED] = accuracy_at(fake, probs, calibrated_threshold)
    return row


def metric_names(row: dict) -> tuple:
    """The metric columns a row has, in order."""
    return METRICS + ((CALIBRATED,) if CALIBRATED in row else ())


def mean_metrics(rows: list[dict]) -> dict:
    """Mean of each metric over subsets (NaN entries left out) and the total counts; a threshold has
    no mean (NaN)."""
    mean = {key: sum(row[key] for row in rows) for key in ("n", "n_real", "n_fake")}
    for key in metric_names(rows[0]) if rows else METRICS:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        mean[key] = sum(values) / len(values) if values and key not in PLAIN_NUMBERS else math.nan
    return mean


def format_table(rows: dict[str, dict], mean: dict | None = None, title: str = "subset") -> str:
    """Plain-text table, metrics in percent (thresholds as they are): one line per subset, then the mean."""
    entries = list(rows.items()) + ([("mean", mean)] if mean is not None else [])
    keys = metric_names(entries[0][1])
    widths = [max(8, len(key)) for key in keys]
    width = max([len(title)] + [len(name) for name, _ in entries])
    header = f"{title:<{width}}  {'n':>6}  " + "  ".join(f"{key:>{w}}" for key, w in zip(keys, widths))
    lines = [header, "-" * len(header)]
    for name, row in entries:
        if name == "mean":
            lines.append("-" * len(header))
        cells = "  ".join(f"{'-':>{w}}" if math.isnan(row[key]) else f"{row[key]:{w}.4f}" if key in PLAIN_NUMBERS
                          else f"{100 * row[key]:{w}.2f}" for key, w in zip(keys, widths))
        lines.append(f"{name:<{width}}  {row['n']:>6}  {cells}")
    return "\n".join(lines)
