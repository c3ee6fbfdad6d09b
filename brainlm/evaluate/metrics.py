"""Metrics and subject-level bootstrap CIs: every number a report of ours shows.

A subject may contribute several recordings, which are not independent, so intervals here
resample test SUBJECTS, never rows; and a score that is undefined (constant targets, ROC-AUC
with one class) is NaN rather than a misleading number. The model and its baselines go through
exactly these functions, so their rows can be read side by side.

Shapes: labels and values are [n]; class probabilities [n, n_classes]; forecasting arrays are
[n, parcels, horizon].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import ConfigError
from .intervals import members_by_group, percentile_interval, subject_draws

TASKS = ("regression", "classification", "forecast")
TASK_METRICS = {
    "regression": ("r2", "mae", "pearson_r"),
    "classification": ("accuracy", "balanced_accuracy", "roc_auc"),
    "forecast": ("mse", "r2"),
}
# Method names the baselines report under; results_table puts every other method first.
BASELINE_METHODS = ("fc_linear", "tangent_linear", "raw_roi_mlp", "train_mean", "majority",
                    "persistence", "parcel_mean", "linear_ar")
# Error metrics: lower is better (a comparison flips their difference so > 0 means better).
LOWER_IS_BETTER = ("mae", "mse")
# The floor every model must clear: the training mean (regression, forecasting) or the
# training class frequencies (classification), whatever the input.
NULL_METHODS = ("train_mean", "majority")


def _task(task: str) -> str:
    task = {"forecasting": "forecast"}.get(task, task)
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return task


def _same_length(y_true, y_pred, where: str):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ConfigError(f"{where}: {len(y_true)} targets but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise ConfigError(f"{where}: no samples to score")
    return y_true, y_pred


# ----------------------------------------------------------------------------- metrics

def regression_metrics(y_true, y_pred) -> dict:
    """R^2 (1 - SSE/SST, not clipped: a model worse than the mean must show as negative),
    MAE and Pearson r. NaN where a quantity is undefined (constant targets or predictions)."""
    y_true, y_pred = _same_length(y_true, y_pred, "regression_metrics")
    t = y_true.astype(np.float64).ravel()
    p = y_pred.astype(np.float64).ravel()
    if t.shape != p.shape:
        raise ConfigError(f"regression_metrics: shapes {y_true.shape} and {y_pred.shape} differ")
    sst = float(np.sum((t - t.mean()) ** 2))
    sse = float(np.sum((t - p) ** 2))
    tc, pc = t - t.mean(), p - p.mean()
    denom = math.sqrt(float(tc @ tc) * float(pc @ pc))
    # "constant" up to rounding: a bootstrap draw of one subject repeated has SST ~1e-28, and
    # 1 - SSE/SST would be a meaningless -1e29 instead of undefined
    constant = sst <= 1e-12 * max(1.0, float(np.sum(t ** 2)))
    return {
        "r2": math.nan if constant else 1.0 - sse / sst,
        "mae": float(np.mean(np.abs(t - p))),
        "pearson_r": float(tc @ pc) / denom if denom > 0 else math.nan,
    }


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC (ties count half); NaN unless both classes are present."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y_true, proba, classes=None) -> dict:
    """Accuracy, balanced accuracy and ROC-AUC from class probabilities [n, n_classes].

    `classes` labels the columns of `proba` (default 0..n_classes-1, as sklearn's
    `classes_` for integer labels). A 1-D `proba` is read as P(classes[1]). ROC-AUC is that of
    the positive column for two classes and the one-vs-rest macro average over the classes
    present in `y_true` otherwise; it is NaN (not an error) when `y_true` holds one class,
    which happens in small test sets and bootstrap resamples.
    """
    y_true, proba = _same_length(y_true, proba, "classification_metrics")
    proba = proba.astype(np.float64)
    if proba.ndim == 1:
        proba = np.column_stack([1.0 - proba, proba])
    if proba.ndim != 2:
        raise ConfigError(f"classification_metrics: proba must be [n, n_classes], got "
                          f"shape {proba.shape}")
    classes = np.arange(proba.shape[1]) if classes is None else np.asarray(classes)
    if len(classes) != proba.shape[1]:
        raise ConfigError(f"classification_metrics: {len(classes)} classes but proba has "
                          f"{proba.shape[1]} columns")
    unknown = set(np.unique(y_true).tolist()) - set(classes.tolist())
    if unknown:
        raise ConfigError(f"classification_metrics: labels {sorted(map(str, unknown))} are not "
                          f"among the classes {classes.tolist()}; pass classes=model.classes_")
    pred = classes[np.argmax(proba, axis=1)]
    present = [c for c in classes if np.any(y_true == c)]
    recalls = [float(np.mean(pred[y_true == c] == c)) for c in present]
    if len(classes) == 2:
        auc = _auc(y_true == classes[1], proba[:, 1])
    elif len(present) < 2:
        auc = math.nan
    else:
        auc = float(np.mean([_auc(y_true == c, proba[:, k])
                             for k, c in enumerate(classes) if c in present]))
    return {"accuracy": float(np.mean(pred == y_true)),
            "balanced_accuracy": float(np.mean(recalls)),
            "roc_auc": auc}


def forecast_metrics(y_true, y_pred) -> dict:
    """MSE over every value, and for each horizon step the R^2 of each parcel across the n
    samples averaged over parcels whose target varies (a constant parcel has no R^2).

    Arrays are [n, parcels, horizon]. R^2 per step shows how fast skill decays with lead time,
    which one pooled number hides.
    """
    y_true, y_pred = _same_length(y_true, y_pred, "forecast_metrics")
    if y_true.ndim != 3 or y_true.shape != y_pred.shape:
        raise ConfigError(f"forecast_metrics: expected two [n, parcels, horizon] arrays of one "
                          f"shape, got {y_true.shape} and {y_pred.shape}")
    t, p = y_true.astype(np.float64), y_pred.astype(np.float64)
    sse = np.sum((t - p) ** 2, axis=0)  # [P, H]
    sst = np.sum((t - t.mean(axis=0)) ** 2, axis=0)
    ok = sst > 1e-12 * len(t)
    r2 = np.where(ok, 1.0 - sse / np.where(ok, sst, 1.0), np.nan)
    by_h = [float(np.mean(r2[ok[:, h], h])) if ok[:, h].any() else math.nan
            for h in range(t.shape[2])]
    return {"mse": float(np.mean((t - p) ** 2)), "r2_by_horizon": by_h}


def metric_fn(task: str, name: str, classes=None) -> Callable:
    """`metric(y_true, y_pred) -> float` for one named metric, as bootstrap_ci wants.
    The forecast metric "r2" is the mean of r2_by_horizon over the steps."""
    task = _task(task)
    if name not in TASK_METRICS[task]:
        raise ConfigError(f"metric {name!r} is not one of {', '.join(TASK_METRICS[task])} "
                          f"for {task}")
    if task == "regression":
        return lambda t, p: regression_metrics(t, p)[name]
    if task == "classification":
        return lambda t, p: classification_metrics(t, p, classes)[name]
    if name == "mse":
        return lambda t, p: forecast_metrics(t, p)["mse"]
    return lambda t, p: _mean_finite(forecast_metrics(t, p)["r2_by_horizon"])


def _mean_finite(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else math.nan


# ----------------------------------------------------------------------------- bootstrap

def bootstrap_ci(metric: Callable, y_true, y_pred, groups, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """Percentile CI of `metric(y_true, y_pred)` resampling GROUPS (subjects) with replacement.

    Each resample draws as many subjects as there are, with replacement, and keeps all rows
    of every drawn subject, so correlated recordings of one subject move together and the
    interval reflects the number of subjects, not recordings. Rows are indexed on axis 0, so
    y arrays of any trailing shape work (labels, probabilities, [n, P, H] forecasts).
    Resamples where the metric is NaN (e.g. ROC-AUC with one class drawn) are skipped and
    counted in `n_skipped`. The same seed gives the same subject draws for every method, so
    intervals of methods scored on one split are paired.

    `value` is the metric on the full data. For skewed metrics the percentile interval can
    miss the point estimate; then the interval is widened to include it (`widened` is True),
    so a reported CI always brackets the reported value.
    Returns {"value", "low", "high", "n_boot", "n_skipped", "widened"}.
    """
    y_true, y_pred = _same_length(y_true, y_pred, "bootstrap_ci")
    _, members = members_by_group(groups, len(y_true))
    value = float(metric(y_true, y_pred))
    stats = []
    for draw in subject_draws(len(members), n_boot, seed):
        idx = np.concatenate([members[g] for g in draw])
        stats.append(float(metric(y_true[idx], y_pred[idx])))
    out = percentile_interval(stats, value, alpha, len(members))
    out["n_skipped"] = int(n_boot) - out["n_boot"]
    return out


def score_rows(task: str, target: str, method: str, y_true, y_pred, groups, *, classes=None,
               n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> list[dict]:
    """One results row per metric of `task`, each with its subject-level bootstrap CI, in the
    shape results_table / write_results / plot_comparison read. `y_pred` is values
    (regression), probabilities (classification) or [n, P, H] forecasts."""
    task = _task(task)
    n_subjects = len(np.unique(np.asarray(groups)))
    rows = []
    for name in TASK_METRICS[task]:
        ci = bootstrap_ci(metric_fn(task, name, classes), y_true, y_pred, groups,
                          n_boot=n_boot, seed=seed, alpha=alpha)
        rows.append({"task": task, "target": target, "method": method, "metric": name,
                     "value": ci["value"], "low": ci["low"], "high": ci["high"],
                     "n_subjects": n_subjects, "n_boot": ci["n_boot"],
                     "widened": bool(ci.get("widened", False)),
                     "n_skipped": int(ci.get("n_skipped", 0))})
    return rows


def subject_split_check(train_subjects: Iterable, test_subjects: Iterable) -> None:
    """Raise ConfigError naming the subjects found on both sides of a split: a subject in
    train and test lets a model score by recognising the person rather than the effect."""
    both = sorted(set(map(str, train_subjects)) & set(map(str, test_subjects)))
    if both:
        shown = ", ".join(both[:20]) + (f", ... ({len(both)} in all)" if len(both) > 20 else "")
        raise ConfigError(f"{len(both)} subject(s) are in both train and test: {shown}; "
                          f"split by subject, not by recording")

