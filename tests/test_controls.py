"""The positive control is decided on its interval: a point above the threshold is not enough."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainlm.evaluate.controls import decide, positive_controls, synthetic_control_scores

TRUTH = {"effects": {"positive_controls": {
    "age": {"task": "regression", "method": "fc_linear", "metric": "r2", "threshold": 0.5},
    "sex": {"task": "classification", "method": "fc_linear", "metric": "roc_auc",
            "threshold": 0.8}, "symptom": None}}}


def _rows(value, low, high, metric="r2", task="regression", target="age", **extra):
    base = {"task": task, "target": target, "metric": metric, "n_subjects": 20, **extra}
    return [{**base, "method": "brainlm", "value": 0.1, "low": -0.4, "high": 0.3},
            {**base, "method": "fc_linear", "value": value, "low": low, "high": high}]


@pytest.mark.parametrize("value, low, high, status", [
    (0.62, 0.31, 0.80, "passed"),
    (0.62, -0.20, 0.80, "undetermined"),  # point above the threshold, interval reaches 0
    (0.62, 0.0, 0.80, "undetermined"),  # the lower bound must be ABOVE chance
    (0.45, 0.20, 0.70, "undetermined"),  # point below, but the interval reaches 0.5
    (0.30, -0.50, 0.49, "failed"),  # even the upper bound short of the threshold
    (-0.80, -3.0, 0.10, "failed"),
    (math.nan, math.nan, math.nan, "undetermined"),  # metric undefined
    (0.62, math.nan, math.nan, "undetermined"),  # no interval: cannot pass
])
def test_age_control_decided_on_the_interval(value, low, high, status):
    summary, md = positive_controls(_rows(value, low, high), "age", "regression", TRUTH)
    assert summary["status"] == status, summary
    assert f"The control {status.upper()}" in md and summary["why"] in md
    assert decide(value, low, high, 0.5, 0.0)[0] == status
    if status == "failed":
        assert "check the data and the pipeline" in md


def test_sex_control_chance_is_half():
    """ROC-AUC's chance level is 0.5, not 0: a lower bound of 0.45 does not pass."""
    rows = _rows(0.9, 0.45, 1.0, "roc_auc", "classification", "sex")
    summary, _ = positive_controls(rows, "sex", "classification", TRUTH)
    assert summary["status"] == "undetermined" and summary["chance"] == 0.5
    rows = _rows(0.9, 0.62, 1.0, "roc_auc", "classification", "sex")
    assert positive_controls(rows, "sex", "classification", TRUTH)[0]["status"] == "passed"


def test_control_reads_only_the_test_split():
    """Validation rows (split "val") are never the control; rows without a split are test."""
    val = _rows(0.9, 0.7, 0.95, split="val")
    test = _rows(0.2, -0.6, 0.45, split="test")
    summary, _ = positive_controls(val + test, "age", "regression", TRUTH)
    assert summary["status"] == "failed" and summary["baseline"]["value"] == 0.2
    summary, _ = positive_controls(val, "age", "regression", TRUTH)
    assert summary["status"] == "undetermined" and summary["baseline"] is None


def test_synthetic_control_scores_return_the_interval():
    """Straight from a small simulated cohort: the interval brackets the point and the
    verdict is the rule's."""
    from brainlm.data.synthetic import simulate_cohort

    rng = np.random.default_rng(0)
    coords = np.column_stack([rng.uniform(-60, 60, 48), rng.uniform(-90, 60, 48),
                              rng.uniform(-40, 70, 48)])
    cohort = simulate_cohort(coords, 30, 150, tr=0.735, seed=3)
    scores = synthetic_control_scores(cohort, (0.5, 0.2, 0.3), n_boot=200)
    for target, chance in (("age", 0.0), ("sex", 0.5)):
        s = scores[target]
        assert s["n_train"] == 15 and s["n_test"] == 9
        assert s["low"] <= s["value"] <= s["high"] and s["width"] == s["high"] - s["low"]
        assert s["chance"] == chance
        assert (s["status"], s["passed"]) == (
            decide(s["value"], s["low"], s["high"], s["threshold"], chance)[0],
            s["status"] == "passed")
