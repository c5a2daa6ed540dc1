import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

from lfm.metrics import (
    average_precision,
    best_threshold,
    binary_metrics,
    equal_error_rate,
    expected_calibration_error,
    format_table,
    mean_metrics,
)
from lfm.metrics import roc_curve as our_roc_curve

# Labels with scores from few distinct values (many ties) or from a continuum.
_tied = st.lists(st.tuples(st.booleans(), st.integers(0, 6).map(lambda v: v / 6)), min_size=1, max_size=40)
_continuous = st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=1, max_size=40)
_pairs = st.one_of(_tied, _continuous)


def _both_classes(pairs):
    labels = [label for label, _ in pairs]
    return any(labels) and not all(labels)


@settings(max_examples=60, deadline=None)
@given(_tied)
def test_average_precision_matches_scikit_learn_with_ties(pairs):
    labels = [label for label, _ in pairs]
    scores = [score for _, score in pairs]
    if not any(labels):
        assert math.isnan(average_precision(labels, scores))
        return
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(_pairs)
def test_roc_curve_and_auc_match_scikit_learn(pairs):
    labels = [label for label, _ in pairs]
    scores = [score for _, score in pairs]
    if not _both_classes(pairs):
        assert math.isnan(binary_metrics(labels, scores)["auc"])
        return
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    ours = our_roc_curve(labels, scores)
    assert np.allclose(ours[0], fpr, rtol=0, atol=1e-12) and np.allclose(ours[1], tpr, rtol=0, atol=1e-12)
    assert abs(binary_metrics(labels, scores)["auc"] - roc_auc_score(labels, scores)) <= 1e-9


def _brute_force_eer(labels, scores):
    """Error rates counted one threshold at a time ("fake if score >= t", t from +inf down through every
    distinct score), then the crossing of FNR and FPR between the two neighbouring thresholds."""
    reals = [s for label, s in zip(labels, scores) if not label]
    fakes = [s for label, s in zip(labels, scores) if label]
    points = []
    for t in [math.inf] + sorted(set(scores), reverse=True):
        fpr = sum(s >= t for s in reals) / len(reals)
        fnr = sum(s < t for s in fakes) / len(fakes)
        points.append((fpr, fnr))
    for (fpr0, fnr0), (fpr1, fnr1) in zip(points, points[1:]):
        if fnr1 - fpr1 <= 0:
            # On the segment, fpr(s) = fpr0 + s (fpr1 - fpr0), fnr(s) likewise: solve fpr(s) = fnr(s).
            s = (fnr0 - fpr0) / ((fnr0 - fpr0) - (fnr1 - fpr1))
            return fpr0 + s * (fpr1 - fpr0)
    raise AssertionError("the error rates never cross")


def _brute_force_best_accuracy(labels, scores):
    """The best accuracy over every way a single threshold splits the images (all fake, all real, and
    "fake if score >= t" for every distinct score t)."""
    cuts = [[True] * len(scores), [False] * len(scores)] + [[s >= t for s in scores] for t in set(scores)]
    return max(sum(p == bool(label) for p, label in zip(cut, labels)) / len(labels) for cut in cuts)


def _brute_force_ece(labels, probs, bins=15):
    total = 0.0
    for b in range(bins):
        lower, upper = b / bins, (b + 1) / bins
        members = [(label, p) for label, p in zip(labels, probs) if lower < max(p, 1 - p) <= upper]
        if members:
            accuracy = sum((p > 0.5) == bool(label) for label, p in members) / len(members)
            confidence = sum(max(p, 1 - p) for _, p in members) / len(members)
            total += len(members) / len(labels) * abs(accuracy - confidence)
    return total


@settings(max_examples=80, deadline=None)
@given(_pairs)
def test_eer_best_accuracy_and_ece_match_brute_force(pairs):
    labels = [label for label, _ in pairs]
    scores = [score for _, score in pairs]
    assert abs(expected_calibration_error(labels, scores) - _brute_force_ece(labels, scores)) <= 1e-9
    if not _both_classes(pairs):
        assert math.isnan(equal_error_rate(labels, scores)) and math.isnan(best_threshold(labels, scores)[0])
        return
    assert abs(equal_error_rate(labels, scores) - _brute_force_eer(labels, scores)) <= 1e-9
    accuracy, threshold = best_threshold(labels, scores)
    assert abs(accuracy - _brute_force_best_accuracy(labels, scores)) <= 1e-9
    # The threshold it reports gives that accuracy with the rule "fake if score > threshold".
    assert abs(accuracy_score(labels, np.array(scores) > threshold) - accuracy) <= 1e-9


def test_eer_of_known_curves():
    assert equal_error_rate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separated
    assert equal_error_rate([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # reversed
    # One real above one fake of two each: the curve passes (0, .5), (.5, .5)... EER 0.5 exactly at a point.
    assert equal_error_rate([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.5)


def test_best_threshold_prefers_the_cut_nearest_one_half():
    # Every cut between 0.2 and 0.8 separates the classes; the midpoint cut at 0.5 is chosen.
    assert best_threshold([0, 1], [0.2, 0.8]) == (1.0, 0.5)
    # A detector that calls everything fake at 0.5 is perfect with a cut higher up.
    accuracy, threshold = best_threshold([0, 0, 1, 1], [0.6, 0.7, 0.9, 0.95])
    assert accuracy == 1.0 and threshold == pytest.approx(0.8)


def test_binary_metrics_threshold_and_per_class_accuracy():
    labels = [0, 0, 0, 1, 1]
    probs = [0.1, 0.5, 0.7, 0.9, 0.2]  # 0.5 is not above the threshold: predicted real
    m = binary_metrics(labels, probs, calibrated_threshold=0.8)
    assert (m["n"], m["n_real"], m["n_fake"]) == (5, 3, 2)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["real_acc"] == pytest.approx(2 / 3)
    assert m["fake_acc"] == pytest.approx(1 / 2)
    assert m["ap"] == pytest.approx(average_precision_score(labels, probs))
    assert m["cal_acc"] == pytest.approx(4 / 5)  # only 0.9 above 0.8
    assert "cal_acc" not in binary_metrics(labels, probs)


def test_a_missing_class_gives_nan_and_the_mean_skips_it():
    only_fake = binary_metrics([1, 1], [0.9, 0.4])
    for key in ("ap", "auc", "eer", "best_acc", "best_threshold", "real_acc"):
        assert math.isnan(only_fake[key]), key
    assert only_fake["fake_acc"] == 0.5 and only_fake["ece"] == pytest.approx((abs(1 - 0.9) + abs(0 - 0.6)) / 2)
    full = binary_metrics([0, 1], [0.2, 0.8])
    mean = mean_metrics([only_fake, full])
    assert mean["ap"] == 1.0 and mean["acc"] == pytest.approx(0.75) and mean["n"] == 4
    assert math.isnan(mean["best_threshold"])  # thresholds have no mean
    table = format_table({"only_fake": only_fake, "full": full}, mean)
    lines = table.splitlines()
    assert lines[0].split() == ["subset", "n", "acc", "ap", "auc", "eer", "real_acc", "fake_acc", "best_acc",
                                "best_threshold", "ece"]
    assert lines[2].split() == ["only_fake", "2", "50.00", "-", "-", "-", "-", "50.00", "-", "-", "35.00"]
    assert lines[3].split()[8:10] == ["100.00", "0.5000"]
    assert lines[-1].split()[:8] == ["mean", "4", "75.00", "100.00", "100.00", "0.00", "100.00", "75.00"]
    assert all(len(line) == len(lines[0]) for line in lines)


def test_average_precision_perfect_and_reversed():
    labels = np.array([0, 1, 0, 1])
    assert average_precision(labels, [0.1, 0.9, 0.2, 0.8]) == 1.0
    scores = [0.9, 0.1, 0.8, 0.2]
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores))
