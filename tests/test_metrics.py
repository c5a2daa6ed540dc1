import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from lfm.metrics import average_precision, binary_metrics, format_table, mean_metrics


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=1, max_size=40))
def test_average_precision_matches_scikit_learn_with_ties(pairs):
    labels = [label for label, _ in pairs]
    scores = [score / 6 for _, score in pairs]  # few distinct values: many ties
    if not any(labels):
        assert math.isnan(average_precision(labels, scores))
        return
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_binary_metrics_threshold_and_per_class_accuracy():
    labels = [0, 0, 0, 1, 1]
    probs = [0.1, 0.5, 0.7, 0.9, 0.2]  # 0.5 is not above the threshold: predicted real
    m = binary_metrics(labels, probs)
    assert (m["n"], m["n_real"], m["n_fake"]) == (5, 3, 2)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["real_acc"] == pytest.approx(2 / 3)
    assert m["fake_acc"] == pytest.approx(1 / 2)
    assert m["ap"] == pytest.approx(average_precision_score(labels, probs))


def test_a_missing_class_gives_nan_and_the_mean_skips_it():
    only_fake = binary_metrics([1, 1], [0.9, 0.4])
    assert math.isnan(only_fake["ap"]) and math.isnan(only_fake["real_acc"]) and only_fake["fake_acc"] == 0.5
    full = binary_metrics([0, 1], [0.2, 0.8])
    mean = mean_metrics([only_fake, full])
    assert mean["ap"] == 1.0 and mean["acc"] == pytest.approx(0.75) and mean["n"] == 4
    table = format_table({"only_fake": only_fake, "full": full}, mean)
    lines = table.splitlines()
    assert lines[0].split() == ["subset", "n", "acc", "ap", "real_acc", "fake_acc"]
    assert lines[2].split() == ["only_fake", "2", "50.00", "-", "-", "50.00"]
    assert lines[-1].split() == ["mean", "4", "75.00", "100.00", "100.00", "75.00"]


def test_average_precision_perfect_and_reversed():
    labels = np.array([0, 1, 0, 1])
    assert average_precision(labels, [0.1, 0.9, 0.2, 0.8]) == 1.0
    scores = [0.9, 0.1, 0.8, 0.2]
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores))
