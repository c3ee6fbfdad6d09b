"""Intervals over subjects for comparisons, and the three-valued verdicts read from them.

Why: a gain measured on a few subjects is a point drawn from a wide distribution. Every
comparison the platform states (a model against its best baseline, a challenger against the
champion) is a paired bootstrap over subjects: the same resamples of subjects score both
sides, so what they share (which subjects are easy) cancels in the difference. A verdict is
positive only when the whole 95 % interval of the difference is above 0, negative when it is
below 0, and `undecided` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

# (positive, negative) words of each kind of comparison; the third value is always UNDECIDED
LEARNED = ("learned", "not learned")  # a model against the best baseline of what it predicts
BETTER = ("better", "worse")  # one method against another
UNDECIDED = "undecided"


def subject_draws(n_subjects: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_subjects] indices of subjects drawn with replacement. The same seed gives the
    same draws, so every method scored with it is resampled on the same subjects (paired)."""
    if int(n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if n_subjects < 1:
        raise ConfigError("a bootstrap over subjects needs at least one subject")
    return np.random.default_rng(seed).integers(0, n_subjects, size=(int(n_boot), n_subjects))


def draw_counts(draws: np.ndarray, n_subjects: int) -> np.ndarray:
    """[n_boot, n_subjects] how often each subject is in each resample (weights for statistics
    that are sums over subjects)."""
    counts = np.zeros((len(draws), n_subjects))
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1.0)
    return counts


def expanded_alpha(alpha: float, n_subjects: int | None) -> float:
    """The tail probability the percentiles are read at so that the interval keeps its nominal
    coverage with few subjects (Hesterberg's expanded percentile interval: the normal quantile
    is replaced by sqrt(n / (n - 1)) times Student's t with n - 1 degrees of freedom). Plain
    percentiles of 8 subjects cover a known effect about 85 % of the time instead of 95 %;
    these about 95 %. `alpha` itself without a subject count or with fewer than 2."""
    if not n_subjects or n_subjects < 2:
        return alpha
    from scipy import stats

    n = int(n_subjects)
    z = math.sqrt(n / (n - 1)) * stats.t.ppf(1 - alpha / 2, n - 1)
    return float(2 * stats.norm.sf(z))


def percentile_interval(stats, value: float, alpha: float = 0.05,
                        n_subjects: int | None = None) -> dict:
    """Percentile interval of the finite resampled `stats`, expanded for few subjects
    (`expanded_alpha`, when `n_subjects` is given) and widened to contain `value` when the
    resamples miss it (skewed statistics), so a reported interval always brackets its point.
    -> {"value", "low", "high", "n_boot" (finite resamples), "widened"}."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    out = {"value": float(value), "low": math.nan, "high": math.nan, "n_boot": int(len(stats)),
           "widened": False}
    if len(stats):
        a = expanded_alpha(alpha, n_subjects)
        low, high = (float(v) for v in np.percentile(stats, [100 * a / 2, 100 * (1 - a / 2)]))
        if np.isfinite(value) and not low <= value <= high:
            low, high = min(low, value), max(high, value)
            out["widened"] = True
        out.update(low=low, high=high)
    return out


def verdict(low, high, words: tuple[str, str] = BETTER) -> str:
    """words[0] when the interval of a difference lies above 0, words[1] when below 0,
    `undecided` when it holds 0 or is undefined."""
    low, high = float(low), float(high)
    if math.isfinite(low) and low > 0:
        return words[0]
    if math.isfinite(high) and high < 0:
        return words[1]
    return UNDECIDED


def members_by_group(groups, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the sorted group labels, the row indices of each) for `n` rows."""
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ConfigError(f"groups must have one entry per row ({n}), got shape {groups.shape}")
    labels, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return labels, np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def paired_bootstrap(metric: Callable, y_true, pred_a, pred_b, groups, n_boot: int = 1000,
                     seed: int = 0, alpha: float = 0.05, words=BETTER) -> dict:
    """Interval of metric(y, a) - metric(y, b) over subjects: each resample draws subjects with
    replacement (all rows of a drawn subject) and scores both predictions on it. Resamples
    where either side is undefined are skipped. Rows are on axis 0 (labels, probabilities or
    [n, P, H] forecasts). -> {"value", "low", "high", "a", "b", "n_boot", "widened",
    "n_subjects", "verdict"}."""
    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not len(y_true) == len(pred_a) == len(pred_b):
        raise ConfigError(f"paired_bootstrap: {len(y_true)} targets, {len(pred_a)} and "
                          f"{len(pred_b)} predictions")
    _, members = members_by_group(groups, len(y_true))
    a, b = float(metric(y_true, pred_a)), float(metric(y_true, pred_b))
    diffs = []
    for draw in subject_draws(len(members), n_boot, seed):
        idx = np.concatenate([members[g] for g in draw])
        diffs.append(float(metric(y_true[idx], pred_a[idx])) -
                     float(metric(y_true[idx], pred_b[idx])))
    out = percentile_interval(diffs, a - b, alpha, len(members))
    out.update(a=a, b=b, n_subjects=len(members), verdict=verdict(out["low"], out["high"], words))
    return out


def mean_difference(scores_a: dict, scores_b: dict, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05, words=BETTER) -> dict:
    """Paired interval of the mean over subjects of per-subject scores a - b, on the subjects
    both were scored on ({subject: score}). -> as paired_bootstrap, with `subjects` (how many
    were shared)."""
    shared = sorted(set(scores_a) & set(scores_b))
    if not shared:
        raise ConfigError("no subject was scored on both sides: not comparable")
    d = np.array([float(scores_a[s]) - float(scores_b[s]) for s in shared])
    resampled = d[subject_draws(len(d), n_boot, seed)].mean(axis=1)
    out = percentile_interval(resampled, float(d.mean()), alpha, len(d))
    out.update(a=float(np.mean([float(scores_a[s]) for s in shared])),
               b=float(np.mean([float(scores_b[s]) for s in shared])), n_subjects=len(shared),
               verdict=verdict(out["low"], out["high"], words))
    return out
