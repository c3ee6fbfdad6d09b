"""Intervals over subjects and the verdicts read from them (brainlm.evaluate.intervals)."""

from __future__ import annotations

import numpy as np
import pytest

from brainlm.evaluate import intervals
from brainlm.evaluate.metrics import metric_fn


def test_the_paired_interval_covers_a_known_effect_at_its_nominal_rate():
    """8 subjects, a known mean difference of 0.1 between two models' per-subject scores: the
    95 % interval covers it about 95 % of the time (plain percentiles of 8 subjects would cover
    it about 85 % of the time; the expanded interval corrects that)."""
    rng = np.random.default_rng(0)
    covered, reps = 0, 300
    for _ in range(reps):
        shared = rng.normal(0.5, 0.3, 8)  # subject difficulty, cancels in a paired difference
        a = {f"s{i}": v + 0.1 + d for i, (v, d) in enumerate(zip(shared, rng.normal(0, 0.2, 8)))}
        b = {f"s{i}": v for i, v in enumerate(shared)}
        out = intervals.mean_difference(a, b, n_boot=400, seed=int(rng.integers(1 << 30)))
        covered += out["low"] <= 0.1 <= out["high"]
    assert 0.9 <= covered / reps <= 0.99, covered / reps


def test_the_paired_bootstrap_resamples_both_on_the_same_subjects():
    """Two predictions that share a large subject-level error: their difference is tight even
    though each one's own interval is wide."""
    rng = np.random.default_rng(1)
    y = rng.normal(50, 10, 40)
    groups = np.repeat(np.arange(20), 2)
    common = np.repeat(rng.normal(0, 8, 20), 2)
    a, b = y + common, y + common + rng.normal(0, 2, 40)
    r2 = metric_fn("regression", "r2")
    out = intervals.paired_bootstrap(r2, y, a, b, groups, n_boot=500, seed=0)
    assert out["value"] == pytest.approx(r2(y, a) - r2(y, b))
    assert out["n_subjects"] == 20 and out["low"] <= out["value"] <= out["high"]
    from brainlm.evaluate.metrics import bootstrap_ci

    alone = bootstrap_ci(r2, y, a, groups, n_boot=500, seed=0)
    assert out["high"] - out["low"] < 0.5 * (alone["high"] - alone["low"])


@pytest.mark.parametrize("low,high,word", [(0.01, 0.2, "better"), (-0.2, -0.01, "worse"),
                                           (-0.1, 0.1, "undecided"),
                                           (float("nan"), float("nan"), "undecided")])
def test_verdicts_take_three_values(low, high, word):
    assert intervals.verdict(low, high) == word
    learned = dict(zip(intervals.BETTER + (intervals.UNDECIDED,),
                       intervals.LEARNED + (intervals.UNDECIDED,)))
    assert intervals.verdict(low, high, intervals.LEARNED) == learned[word]


def test_the_interval_widens_for_few_subjects():
    assert intervals.expanded_alpha(0.05, 8) < 0.02 < intervals.expanded_alpha(0.05, 30) < 0.05
    assert intervals.expanded_alpha(0.05, None) == 0.05
