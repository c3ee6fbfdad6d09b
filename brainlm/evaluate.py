"""Downstream evaluation: metrics, subject-level bootstrap CIs, simple baselines and reports.

Independent benchmarks found that functional connectivity + a linear model often matches or
beats fMRI foundation models, so every result here is meant to be shown next to baselines
fitted on exactly the same recordings and subject-level split, with confidence intervals that
resample test SUBJECTS (a subject may contribute several recordings, which are not independent).

Shapes: one recording is [parcels, time]; stacks are [n, parcels, time]; forecasting arrays are
[n, parcels, horizon].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.model_selection import GridSearchCV

from .errors import ConfigError, check_orientation
from .fileio import atomic_path, write_bytes_atomic

TASKS = ("regression", "classification", "forecast")
TASK_METRICS = {
    "regression": ("r2", "mae", "pearson_r"),
    "classification": ("accuracy", "balanced_accuracy", "roc_auc"),
    "forecast": ("mse", "r2"),
}
# Method names the baselines report under; results_table puts every other method first.
BASELINE_METHODS = ("fc_linear", "raw_roi_mlp", "train_mean", "majority", "persistence",
                    "parcel_mean", "linear_ar")
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

def _group_members(groups, n: int) -> list[np.ndarray]:
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ConfigError(f"groups must have one entry per row ({n}), got shape {groups.shape}")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


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
    if int(n_boot) < 1:
        raise ConfigError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ConfigError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    members = _group_members(groups, len(y_true))
    value = float(metric(y_true, y_pred))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(int(n_boot), len(members)))
    stats = []
    for draw in draws:
        idx = np.concatenate([members[g] for g in draw])
        s = float(metric(y_true[idx], y_pred[idx]))
        if np.isfinite(s):
            stats.append(s)
    out = {"value": value, "low": math.nan, "high": math.nan, "n_boot": len(stats),
           "n_skipped": int(n_boot) - len(stats), "widened": False}
    if stats:
        low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        low, high = float(low), float(high)
        if np.isfinite(value) and not low <= value <= high:
            low, high = min(low, value), max(high, value)
            out["widened"] = True
        out.update(low=low, high=high)
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


# ----------------------------------------------------------------------------- features

def _recordings(xs, where: str) -> list[np.ndarray]:
    xs = [np.asarray(x) for x in xs]
    if not xs:
        raise ConfigError(f"{where}: no recordings")
    n_parcels = xs[0].shape[0] if xs[0].ndim == 2 else -1
    for i, x in enumerate(xs):
        check_orientation(x, n_parcels, f"{where} recording {i}")
    return xs


def fc_features(x) -> np.ndarray:
    """Upper triangle (k=1) of the Pearson correlation matrix of a [P, T] recording, Fisher z
    transformed (correlations clipped to +-(1 - 1e-7) so arctanh stays finite). A constant
    parcel has no correlation; it is given 0 instead of NaN so one flat ROI does not poison
    every model. Length P * (P - 1) / 2."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ConfigError(f"fc_features: expected a [parcels, time] array with >= 2 "
                          f"timepoints, got shape {x.shape}")
    xc = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.sum(xc * xc, axis=1))
    scale = np.where(norm > 1e-12 * max(1.0, float(norm.max())), norm, np.inf)
    z = xc / scale[:, None]
    corr = np.clip(z @ z.T, -1 + 1e-7, 1 - 1e-7)
    return np.arctanh(corr[np.triu_indices(len(x), k=1)])


def roi_block_features(x, block: int = 20, window: int = 200) -> np.ndarray:
    """The first `window` timepoints of a [P, T] recording averaged in non-overlapping blocks
    of `block` (the model's patch) and flattened parcel-major: the numbers the model sees,
    without the transformer. Length P * window / block."""
    x = np.asarray(x, dtype=np.float64)
    if block < 1 or window < block or window % block:
        raise ConfigError(f"window {window} must be a positive multiple of block {block}")
    if x.ndim != 2 or x.shape[1] < window:
        raise ConfigError(f"roi_block_features: need a [parcels, time>={window}] recording, "
                          f"got shape {x.shape}; lower `window` or use longer recordings")
    return x[:, :window].reshape(len(x), window // block, block).mean(axis=2).ravel()


def _inner_cv(task: str, y, groups, seed: int):
    """Folds for hyper-parameter search inside the training set. With `groups` they keep each
    subject in one fold, so the penalty is not tuned on a subject's other recordings."""
    from sklearn.model_selection import (GroupKFold, StratifiedGroupKFold,
                                         StratifiedKFold)

    if task == "classification":
        n_min = int(np.min(np.unique(y, return_counts=True)[1]))
        if n_min < 2:
            raise ConfigError("classification baseline: every class needs >= 2 training "
                              "recordings for cross-validation")
        k = min(5, n_min)
        if groups is None:
            return StratifiedKFold(k, shuffle=True, random_state=seed)
        k = min(k, len(np.unique(groups)))
        return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed)
                    .split(np.zeros(len(y)), y, groups))
    if groups is None:
        return None  # RidgeCV's efficient leave-one-out
    k = min(5, len(np.unique(groups)))
    if k < 2:
        raise ConfigError("regression baseline: need >= 2 training subjects")
    return list(GroupKFold(k).split(np.zeros(len(y)), y, groups))


class _PooledScaler(TransformerMixin, BaseEstimator):
    """Centre each feature, divide all by one pooled SD (keeps their relative variances)."""

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        self.mean_ = X.mean(axis=0)
        sd = float(np.sqrt(np.mean((X - self.mean_) ** 2)))
        self.scale_ = sd if sd > 0 else 1.0
        return self

    def transform(self, X):
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_


class _RowSpace(TransformerMixin, BaseEstimator):
    """Project onto the span of the (centred) training rows when there are fewer rows than
    features: [n, p] -> [n, rank]. Exact for L2-penalised linear models with an unpenalised
    intercept (ridge, L2 logistic regression): their weights lie in that span, and
    ||V b|| = ||b|| keeps the penalty, so the fit, the inner CV and every prediction are
    unchanged while the solver sees 24 columns instead of 89,676 (A424 edges)."""

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        self.mean_ = X.mean(axis=0)
        if X.shape[0] >= X.shape[1]:
            self.components_ = None
            return self
        _, sv, vt = np.linalg.svd(X - self.mean_, full_matrices=False)
        keep = sv > 1e-10 * max(float(sv[0]), 1e-300) if len(sv) else sv > 0
        self.components_ = vt[keep] if keep.any() else vt[:1]
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=np.float64)
        if self.components_ is None:
            return X
        # centring is a shift of the intercept; it keeps the scores small
        return (X - self.mean_) @ self.components_.T


class _Baseline:
    """Shared fit/predict over a list of [P, T] recordings; subclasses set `name` and build
    the sklearn pipeline from the feature matrix."""

    name = "baseline"

    def __init__(self, task: str, seed: int = 0):
        if task not in ("regression", "classification"):
            raise ConfigError(f"{type(self).__name__}: task must be 'regression' or "
                              f"'classification', got {task!r}")
        self.task, self.seed, self.model = task, seed, None

    def features(self, xs) -> np.ndarray:
        raise NotImplementedError

    def _pipeline(self, y, groups):
        raise NotImplementedError

    def fit(self, xs, y, groups=None):
        """Fit on training recordings; `groups` (their subjects) makes inner CV subject-wise."""
        X = self.features(xs)
        y = np.asarray(y)
        if len(y) != len(X):
            raise ConfigError(f"{self.name}: {len(X)} recordings but {len(y)} targets")
        if self.task == "regression":
            y = y.astype(np.float64)
        elif len(np.unique(y)) < 2:
            raise ConfigError(f"{self.name}: the training labels hold one class only")
        if groups is not None and len(groups) != len(y):
            raise ConfigError(f"{self.name}: {len(y)} recordings but {len(groups)} groups")
        self.model = self._pipeline(y, groups).fit(X, y)
        return self

    def _fitted(self):
        if self.model is None:
            raise ConfigError(f"{self.name}: call fit() before predicting")
        return self.model

    @property
    def classes_(self):
        return self._fitted().classes_

    def predict(self, xs) -> np.ndarray:
        """Values (regression) or labels (classification)."""
        return self._fitted().predict(self.features(xs))

    def predict_proba(self, xs) -> np.ndarray:
        """[n, n_classes] probabilities, columns in `classes_` order."""
        if self.task != "classification":
            raise ConfigError(f"{self.name}: predict_proba is for classification")
        return self._fitted().predict_proba(self.features(xs))


class FCBaseline(_Baseline):
    """Fisher-z FC upper triangle -> scale -> RidgeCV (regression) or cross-validated L2
    logistic regression (classification). The baseline foundation models must beat.

    `scaling="pooled"` (default) centres every edge and divides all edges by ONE pooled SD:
    the penalty grid becomes scale-free while edges keep their relative between-subject
    variance. Per-edge standardization (`scaling="feature"`) blows noise edges up to the size
    of informative ones, which an L2 penalty cannot undo when edges outnumber recordings (on a
    planted one-edge effect with 45 training recordings held-out R^2 fell from ~0.9 to
    0.1-0.7, depending on the seed).
    """

    name = "fc_linear"

    def __init__(self, task: str, seed: int = 0, scaling: str = "pooled"):
        super().__init__(task, seed)
        if scaling not in ("pooled", "feature"):
            raise ConfigError(f"FCBaseline: scaling must be 'pooled' or 'feature', got "
                              f"{scaling!r}")
        self.scaling = scaling

    def features(self, xs) -> np.ndarray:
        feats = np.stack([fc_features(x) for x in _recordings(xs, self.name)])
        self._n_features = feats.shape[1]
        return feats

    def _pipeline(self, y, groups):
        from sklearn.linear_model import LogisticRegressionCV, RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        cv = _inner_cv(self.task, y, groups, self.seed)
        if self.task == "regression":
            head = RidgeCV(alphas=np.logspace(-3, 5, 17), cv=cv)
        else:
            # newton-cholesky: same optimum as lbfgs, ~10x faster on few columns; but its
            # Hessian is columns^2 (60 GB for A424's 89,676 edges), so lbfgs beyond a few
            # thousand (after _RowSpace: only with more recordings than that)
            small = min(getattr(self, "_n_features", 0), len(y)) <= 2000
            head = LogisticRegressionCV(Cs=np.logspace(-3, 5, 17), l1_ratios=(0.0,), cv=cv,
                                        scoring="neg_log_loss",
                                        solver="newton-cholesky" if small else "lbfgs",
                                        max_iter=1000, random_state=self.seed,
                                        use_legacy_attributes=False)
        scaler = (StandardScaler() if self.scaling == "feature" else _PooledScaler())
        return make_pipeline(scaler, _RowSpace(), head)


class RawROIMLP(_Baseline):
    """Small MLP on block-averaged parcel time series (roi_block_features): tells whether the
    transformer adds anything over a generic non-linear model of the same inputs.

    Built to be sane with few recordings and thousands of inputs (A424: 4,240 per window):
    inputs standardised and reduced to at most `n_components` whitened principal components
    (fitted on the training recordings only), regression targets standardised, and the L2
    penalty `alpha` chosen from `alphas` by inner cross-validation on the training recordings,
    by subject when `groups` are given (the same folds as FCBaseline). The grid reaches
    penalties that shrink the network to its output bias, i.e. the training mean (or class
    frequencies), so when the inputs carry nothing the inner CV can fall back to that floor
    instead of extrapolating (the former early-stopped MLP scored R^2 -59 on the demo's 8 test
    subjects). lbfgs: full-batch, deterministic for a seed, suited to a few hundred rows."""

    name = "raw_roi_mlp"

    def __init__(self, task: str, seed: int = 0, block: int = 20, window: int = 200,
                 hidden: Sequence[int] = (64,),
                 alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
                 n_components: int = 20, max_iter: int = 200):
        super().__init__(task, seed)
        if block < 1 or window < block or window % block:
            raise ConfigError(f"RawROIMLP: window {window} must be a positive multiple of "
                              f"block {block}")
        if int(n_components) < 1 or not len(alphas) or min(alphas) < 0:
            raise ConfigError(f"RawROIMLP: need n_components >= 1 and non-negative alphas, got "
                              f"{n_components}, {tuple(alphas)}")
        self.block, self.window, self.hidden = block, window, tuple(hidden)
        self.alphas, self.n_components, self.max_iter = tuple(alphas), int(n_components), max_iter

    def features(self, xs) -> np.ndarray:
        return np.stack([roi_block_features(x, self.block, self.window)
                         for x in _recordings(xs, self.name)])

    def _folds(self, y, groups):
        from sklearn.model_selection import KFold

        cv = _inner_cv(self.task, y, groups, self.seed)
        if cv is None:  # regression without groups: plain shuffled folds
            cv = list(KFold(min(5, len(y)), shuffle=True, random_state=self.seed)
                      .split(np.zeros(len(y))))
        elif not isinstance(cv, list):
            cv = list(cv.split(np.zeros(len(y)), y))
        return cv

    def _pipeline(self, y, groups):
        from sklearn.compose import TransformedTargetRegressor
        from sklearn.neural_network import MLPClassifier, MLPRegressor
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        kw = dict(hidden_layer_sizes=self.hidden, solver="lbfgs", max_iter=self.max_iter,
                  random_state=self.seed)
        mlp = MLPRegressor(**kw) if self.task == "regression" else MLPClassifier(**kw)
        # scaler and PCA are refitted in every inner fold, on that fold's training rows only
        net = Pipeline([("scale", StandardScaler()),
                        ("pca", _CappedPCA(self.n_components, random_state=self.seed)),
                        ("mlp", mlp)])
        if self.task == "regression":
            model = TransformedTargetRegressor(net, transformer=StandardScaler())
            grid = {"regressor__mlp__alpha": list(self.alphas)}
            scoring = "neg_mean_squared_error"
        else:
            model, grid, scoring = net, {"mlp__alpha": list(self.alphas)}, "neg_log_loss"
        return _QuietSearch(model, grid, cv=self._folds(y, groups), scoring=scoring,
                            refit=True, error_score="raise")

    @property
    def alpha_(self) -> float:
        """The penalty the inner CV chose."""
        return float(next(iter(self._fitted().best_params_.values())))


class _QuietSearch(GridSearchCV):
    """GridSearchCV without lbfgs's ConvergenceWarning: stopping at max_iter on a few hundred
    rows is expected (the penalty, not the iteration count, is what regularises)."""

    def fit(self, X, y=None, **params):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return super().fit(X, y, **params)


class _CappedPCA(TransformerMixin, BaseEstimator):
    """Whitened PCA with at most `n_components`, fewer when the data has fewer rows/columns."""

    def __init__(self, n_components: int = 20, random_state: int = 0):
        self.n_components, self.random_state = n_components, random_state

    def fit(self, X, y=None):
        from sklearn.decomposition import PCA

        X = np.asarray(X, dtype=np.float64)
        k = max(1, min(self.n_components, X.shape[0] - 1, X.shape[1]))
        self.pca_ = PCA(k, whiten=True, svd_solver="full", random_state=self.random_state).fit(X)
        return self

    def transform(self, X):
        return self.pca_.transform(np.asarray(X, dtype=np.float64))


class TrainMean:
    """The floor: predicts the training mean (regression; method "train_mean") or the training
    class frequencies for every recording (classification; method "majority": its labels are
    the majority class, its ROC-AUC 0.5). Ignores the recordings; fits on labels only."""

    def __init__(self, task: str):
        if task not in ("regression", "classification"):
            raise ConfigError(f"TrainMean: task must be 'regression' or 'classification', "
                              f"got {task!r}")
        self.task = task
        self.name = "train_mean" if task == "regression" else "majority"
        self.mean_ = self.classes_ = self.priors_ = None

    def fit(self, xs, y, groups=None):
        y = np.asarray(y)
        if len(y) == 0:
            raise ConfigError(f"{self.name}: no training targets")
        if self.task == "regression":
            self.mean_ = float(np.mean(y.astype(np.float64)))
        else:
            self.classes_, counts = np.unique(y, return_counts=True)
            self.priors_ = counts / counts.sum()
        return self

    def _n(self, xs) -> int:
        if self.mean_ is None and self.priors_ is None:
            raise ConfigError(f"{self.name}: call fit() before predicting")
        return len(xs)

    def predict(self, xs) -> np.ndarray:
        n = self._n(xs)
        if self.task == "regression":
            return np.full(n, self.mean_)
        return np.repeat(self.classes_[np.argmax(self.priors_)], n)

    def predict_proba(self, xs) -> np.ndarray:
        if self.task != "classification":
            raise ConfigError(f"{self.name}: predict_proba is for classification")
        return np.tile(self.priors_, (self._n(xs), 1))


# ----------------------------------------------------------------------------- forecasting

def _context(context, horizon: int, where: str) -> np.ndarray:
    context = np.asarray(context, dtype=np.float64)
    if context.ndim < 1 or context.shape[-1] < 1:
        raise ConfigError(f"{where}: context needs >= 1 timepoint on its last axis, got shape "
                          f"{context.shape}")
    if int(horizon) < 1:
        raise ConfigError(f"{where}: horizon must be >= 1, got {horizon}")
    return context


def persistence(context, horizon: int) -> np.ndarray:
    """Last observed value repeated: [n, P, C] -> [n, P, horizon]."""
    c = _context(context, horizon, "persistence")
    return np.repeat(c[..., -1:], int(horizon), axis=-1)


def parcel_mean(context, horizon: int) -> np.ndarray:
    """Mean of each parcel's context repeated: [n, P, C] -> [n, P, horizon]."""
    c = _context(context, horizon, "parcel_mean")
    return np.repeat(c.mean(axis=-1, keepdims=True), int(horizon), axis=-1)


class LinearAR:
    """One ridge model shared by all parcels mapping a parcel's last `order` values to its next
    `horizon` values directly (one output per step, no recursion, so errors do not compound).
    Sharing across parcels keeps it a weak-but-honest baseline with few parameters."""

    name = "linear_ar"

    def __init__(self, order: int = 10, alpha: float = 1.0):
        if int(order) < 1 or alpha < 0:
            raise ConfigError(f"LinearAR: order must be >= 1 and alpha >= 0, got {order}, "
                              f"{alpha}")
        self.order, self.alpha, self.model, self.horizon = int(order), float(alpha), None, None

    def _lags(self, contexts) -> np.ndarray:
        c = np.asarray(contexts, dtype=np.float64)
        if c.ndim != 3 or c.shape[2] < self.order:
            raise ConfigError(f"LinearAR: contexts must be [n, parcels, time >= order "
                              f"{self.order}], got shape {c.shape}")
        return c[:, :, -self.order:].reshape(-1, self.order)

    def fit(self, contexts, futures):
        from sklearn.linear_model import Ridge

        X = self._lags(contexts)
        f = np.asarray(futures, dtype=np.float64)
        if f.ndim != 3 or f.shape[:2] != np.shape(contexts)[:2]:
            raise ConfigError(f"LinearAR: futures must be [n, parcels, horizon] matching "
                              f"contexts {np.shape(contexts)[:2]}, got {f.shape}")
        self.horizon = f.shape[2]
        self.model = Ridge(alpha=self.alpha).fit(X, f.reshape(-1, self.horizon))
        return self

    def predict(self, contexts) -> np.ndarray:
        if self.model is None:
            raise ConfigError("LinearAR: call fit() before predict()")
        n, p = np.shape(contexts)[:2]
        return self.model.predict(self._lags(contexts)).reshape(n, p, self.horizon)


# ----------------------------------------------------------------------------- reporting

def _is_baseline(row) -> bool:
    return bool(row.get("baseline", row["method"] in BASELINE_METHODS))


def _ordered(rows: list[dict]) -> list[dict]:
    """Rows grouped by (task, target, metric) in first-seen order; inside a group the model(s)
    first, then baselines, each in the order given."""
    rows = [dict(r) for r in rows]
    groups, methods = {}, {}
    for r in rows:
        groups.setdefault((r["task"], r["target"], r["metric"]), len(groups))
        methods.setdefault(r["method"], len(methods))
    return sorted(rows, key=lambda r: (groups[(r["task"], r["target"], r["metric"])],
                                       _is_baseline(r), methods[r["method"]]))


def _fmt(v) -> str:
    return "n/a" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"


def results_table(rows: list[dict]) -> str:
    """Markdown table, one line per (task, target, metric, method), the CI as `[low, high]`
    (marked * where it was widened to include the point estimate). A row is a baseline when
    its method is in BASELINE_METHODS or it has "baseline": True."""
    head = ["task", "target", "method", "metric", "value", "95 % CI", "n_subjects"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _ordered(rows):
        ci = f"[{_fmt(r.get('low'))}, {_fmt(r.get('high'))}]" + ("*" if r.get("widened") else "")
        cells = [r["task"], r["target"], r["method"], r["metric"], _fmt(r["value"]), ci,
                 str(r.get("n_subjects", ""))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


def write_results(rows: list[dict], out_dir, name: str = "results", notes: str = "") -> dict:
    """Write `<name>.md` (results_table, then `notes`: further markdown sections) and
    `<name>.json` (the rows, NaN as null), each atomically so a crash never leaves a truncated
    report. Returns {"markdown", "json"}."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / f"{name}.md", "json": out_dir / f"{name}.json"}
    text = results_table(rows) + (("\n" + notes.rstrip("\n") + "\n") if notes else "")
    write_bytes_atomic(paths["markdown"], text.encode())
    data = json.dumps(_jsonable(_ordered(rows)), indent=2, allow_nan=False)
    write_bytes_atomic(paths["json"], (data + "\n").encode())
    return paths


def _save_png(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _axis_limits(metric: str, group: list[dict]) -> tuple[float, float]:
    """x-axis range of one panel: every value and CI, except that a score far worse than the
    floor does not set the scale (R^2-like metrics stop at -1; an error metric at 3x the
    train-mean/majority row or, without one, 3x the median): such bars are drawn to the
    edge and labelled with their value, so one bad baseline cannot flatten the others."""
    vals = [float(v) for r in group for v in (r["value"], r.get("low"), r.get("high"))
            if v is not None and np.isfinite(float(v))]
    if not vals:
        return -1.0, 1.0
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    if metric in ("r2", "pearson_r"):
        lo = max(lo, -1.0)
        hi = min(max(hi, 0.1), 1.0)
    elif metric in ("mae", "mse"):
        floor = [float(r["value"]) for r in group if r["method"] in NULL_METHODS
                 and np.isfinite(float(r["value"]))]
        ref = floor[0] if floor else float(np.median([v for v in vals if v >= 0] or [1.0]))
        hi = min(hi, 3.0 * ref) if ref > 0 else hi
    pad = 0.05 * (hi - lo or 1.0)
    return lo - (pad if lo < 0 else 0.0), hi + pad


def plot_comparison(rows: list[dict], path) -> Path:
    """One PNG: a panel per (task, target, metric), a horizontal bar per method with its CI as
    error bar; model bars are coloured apart from baselines so the comparison reads at once."""
    from matplotlib.figure import Figure

    rows = _ordered(rows)
    if not rows:
        raise ConfigError("plot_comparison: no rows to plot")
    panels: dict = {}
    for r in rows:
        panels.setdefault((r["task"], r["target"], r["metric"]), []).append(r)
    fig = Figure(figsize=(7, sum(1 + 0.4 * len(v) for v in panels.values())))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, ((task, target, metric), group) in zip(axes, panels.items()):
        y = np.arange(len(group))[::-1]
        vals = np.array([float(r["value"]) for r in group])

        def err(r, key, sign):
            v = r.get(key)
            return 0.0 if v is None or not np.isfinite(v) else max(0.0, sign * (v - r["value"]))

        xerr = np.array([[err(r, "low", -1) for r in group], [err(r, "high", 1) for r in group]])
        colors = ["tab:gray" if _is_baseline(r) else "tab:blue" for r in group]
        lo_lim, hi_lim = _axis_limits(metric, group)
        shown = np.clip(np.nan_to_num(vals), lo_lim, hi_lim)
        xerr = np.where(np.isclose(shown, np.nan_to_num(vals)), xerr, 0.0)
        ax.barh(y, shown, xerr=xerr, color=colors, capsize=3)
        for yi, v, sh in zip(y, vals, shown):
            if np.isfinite(v) and not np.isclose(v, sh):  # off the axis: say where it went
                ax.text(sh, yi, f" {v:.3g} (off scale) ", va="center",
                        ha="left" if sh <= lo_lim else "right", fontsize=7)
        ax.set_xlim(lo_lim, hi_lim)
        ax.set_yticks(y, [r["method"] for r in group])
        ax.set_title(f"{task} / {target}: {metric}", fontsize=9)
        ax.axvline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_forecast(r2_by_horizon: dict[str, list], path) -> Path:
    """R^2 against forecast step, one line per method: where the model's skill decays
    relative to persistence / AR is the interesting part."""
    from matplotlib.figure import Figure

    if not r2_by_horizon:
        raise ConfigError("plot_forecast: no methods to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method, values in r2_by_horizon.items():
        values = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=method)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("forecast step")
    ax.set_ylabel("R$^2$ (mean over parcels)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


# ---------------------------------------------------------------------------- positive controls


def find_ground_truth(store) -> tuple[dict, Path] | None:
    """The synthetic generator's ground_truth.json behind a store, or None for other data.

    Looked for in the folders above the recordings' source paths (as written at preprocess
    time, relative to the working directory or to the store's parent); it counts only if it
    names every subject of the store, so an unrelated file cannot switch the controls on."""
    m = store.manifest
    subjects = set(m.loc[m["status"] == "ok", "subject"].astype(str))
    paths = m.loc[m["status"] == "ok", "source_path"].dropna().astype(str).unique()[:3]
    tried = set()
    for source in paths:
        for base in (Path.cwd(), Path(store.path).resolve().parent):
            for folder in (base / source).parents:
                candidate = folder / "ground_truth.json"
                if candidate in tried:
                    continue
                tried.add(candidate)
                try:
                    truth = json.loads(candidate.read_text())
                    named = {str(r["participant_id"]) for r in truth.get("subjects", [])}
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if subjects and subjects <= named and "effects" in truth:
                    return truth, candidate
    return None


def positive_controls(rows: list[dict], target: str, task: str, truth: dict | None,
                      where: str = "") -> tuple[dict, str]:
    """Whether the planted effect for `target` was found: FC + linear on the test split must
    reach the threshold the synthetic cohort promises (age R^2 >= 0.5, sex ROC-AUC >= 0.8;
    brainlm.data.synthetic.POSITIVE_CONTROLS, as stated in its ground_truth.json). BrainLM's
    score on the same metric is reported beside it, whatever it is; the control judges the
    pipeline and the data (a failed control means the evaluation cannot be trusted), not the
    model. Returns (a JSON-able summary, a markdown section)."""
    from .data.synthetic import POSITIVE_CONTROLS

    head = "## Positive control\n\n"
    if truth is None:
        summary = {"status": "none", "target": target,
                   "reason": "not a brainlm synthetic cohort (no ground_truth.json naming its "
                             "subjects): no planted effect, so no positive control"}
        return summary, head + summary["reason"] + ".\n"
    declared = (truth.get("effects") or {}).get("positive_controls")
    controls = POSITIVE_CONTROLS if declared is None else declared
    control = controls.get(target)
    if not control or control.get("task") != task:
        summary = {"status": "none", "target": target,
                   "reason": f"synthetic cohort, but no positive control is declared for "
                             f"{target!r} ({task}); controls: "
                             + ", ".join(f"{k} ({v['metric']} >= {v['threshold']:g})"
                                         for k, v in controls.items() if v)}
        return summary, head + summary["reason"] + ".\n"
    metric, threshold, method = control["metric"], float(control["threshold"]), control["method"]

    def row(m):
        return next((r for r in rows if r["method"] == m and r["metric"] == metric), None)

    base, model = row(method), row("brainlm")
    value = None if base is None else base["value"]
    if value is None or not np.isfinite(value):
        status = "undetermined"  # e.g. ROC-AUC with one class among the test subjects
    else:
        status = "passed" if value >= threshold else "failed"

    def ci(r):
        return None if r is None else {k: r.get(k) for k in ("value", "low", "high")}

    summary = {"status": status, "target": target, "metric": metric, "threshold": threshold,
               "method": method, "baseline": ci(base), "brainlm": ci(model),
               "n_subjects": None if base is None else base.get("n_subjects"),
               "ground_truth": where}
    verdict = {"passed": "PASSED", "failed": "FAILED",
               "undetermined": "UNDETERMINED (metric undefined on this test split)"}[status]
    lines = [head.rstrip("\n"), "",
             f"Planted effect: {target} (ground truth: {where or 'ground_truth.json'}). "
             f"Control: {method} on the test split reaches {metric} >= {threshold:g}.", "",
             "| method | metric | value | 95 % CI | threshold | control |",
             "|---|---|---|---|---|---|"]
    for name, r, mark in ((method, base, verdict), ("brainlm", model, "reported beside it")):
        if r is not None:
            lines.append(f"| {name} | {metric} | {_fmt(r['value'])} | [{_fmt(r.get('low'))}, "
                         f"{_fmt(r.get('high'))}] | {threshold:g} | {mark} |")
    if status == "failed":
        lines += ["", f"The control FAILED: {method} did not find an effect the cohort plants "
                      "at this strength; check the data and the pipeline before reading any "
                      "model score."]
    return summary, "\n".join(lines) + "\n"


def synthetic_control_scores(cohort, fractions=(0.6, 0.2, 0.2), split_seed: int = 0,
                             targets=("age", "sex")) -> dict:
    """The positive controls computed straight from a SyntheticCohort as the pipeline would:
    percent signal change after linear detrending, subject split (assign_splits), robust
    scaling fitted on the training subjects, FCBaseline fitted on train and scored on test
    (plus the train-mean / majority floor). {target: {"value", "floor", "threshold",
    "passed", "n_train", "n_test"}}; used by the tests and benchmarks/synthetic_realism.py."""
    from scipy import signal as sps

    from .data.scale import RobustScaler
    from .data.split import assign_splits
    from .data.synthetic import POSITIVE_CONTROLS

    raw = cohort.signals.astype(np.float64)
    x = 100.0 * sps.detrend(raw, axis=2) / raw.mean(axis=2, keepdims=True)
    ph = cohort.participants
    ids = ph["participant_id"].astype(str).tolist()
    split = assign_splits(ids, fractions, seed=split_seed)
    side = np.array([split[i] for i in ids])
    tr, te = np.flatnonzero(side == "train"), np.flatnonzero(side == "test")
    scaler = RobustScaler.fit([x[i] for i in tr])
    xs = [scaler.transform(xi) for xi in x]
    groups = np.asarray(ids)
    out = {}
    for target in targets:
        c = POSITIVE_CONTROLS[target]
        y = ph[target].to_numpy()
        y = y.astype(np.float64) if c["task"] == "regression" else y.astype(str)
        scores = []
        for model in (FCBaseline(c["task"]), TrainMean(c["task"])):
            model.fit([xs[i] for i in tr], y[tr], groups=groups[tr])
            test = [xs[i] for i in te]
            if c["task"] == "regression":
                scores.append(regression_metrics(y[te], model.predict(test))[c["metric"]])
            else:
                scores.append(classification_metrics(y[te], model.predict_proba(test),
                                                     model.classes_)[c["metric"]])
        out[target] = {"value": scores[0], "floor": scores[1], "metric": c["metric"],
                       "threshold": c["threshold"],
                       "passed": bool(np.isfinite(scores[0]) and scores[0] >= c["threshold"]),
                       "n_train": len(tr), "n_test": len(te)}
    return out


# ---------------------------------------------------------------------------- a fine-tuning run


def evaluate_run(run_dir, out_dir=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """`brainlm evaluate`: a fine-tuning run's test predictions beside the baselines, all fitted
    on the run's training recordings and scored on exactly its test recordings, with
    subject-level bootstrap CIs, with the training-mean / majority floor as a row. results.md
    ends with the positive-control section (synthetic cohorts: did FC + linear find the planted
    effect; BrainLM beside it), also written as positive_control.json. Writes results.md,
    results.json, positive_control.json and PNG plots."""

    import pandas as pd

    from .data.store import BrainStore
    from .train.finetune import prepare_target, window_batches

    run = Path(run_dir)
    try:
        meta = json.loads((run / "finetune.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run}: not a fine-tuning run (finetune.json: {exc})") from None
    cfg, window = meta["config"], int(meta["window"])
    task = cfg["task"]
    store = BrainStore(meta["store"])
    if not len(store.recordings("test")):
        raise ConfigError(f"{meta['store']}: the test split is empty; nothing to evaluate")
    out = Path(out_dir) if out_dir else run / "evaluation"
    rows: list[dict] = []
    plots = {}
    if task == "forecast":
        horizon = int(meta["horizon"])
        arrays = np.load(run / "forecast.npz", allow_pickle=False)
        y, pred, groups = arrays["test_true"], arrays["test_pred"], arrays["test_subject"]

        def windows(split):
            found = [x.numpy() for x, _ in window_batches(store, store.recordings(split), window,
                                                          window, 64)]
            return np.concatenate(found)

        test_w, train_w = windows("test"), windows("train")
        if test_w.shape[0] != y.shape[0] or not np.allclose(test_w[..., -horizon:], y):
            raise ConfigError(f"{run}: the store's test windows differ from the run's")
        subject_split_check(store.recordings("train")["subject"], groups)
        context = test_w[..., :-horizon]
        ar = LinearAR(order=min(10, window - horizon)).fit(train_w[..., :-horizon],
                                                          train_w[..., -horizon:])
        floor = np.broadcast_to(train_w[..., -horizon:].mean(axis=0), y.shape)
        methods = {"brainlm": pred, "persistence": persistence(context, horizon),
                   "parcel_mean": parcel_mean(context, horizon), "linear_ar": ar.predict(context),
                   "train_mean": floor}
        curves = {}
        for name, p in methods.items():
            rows += score_rows("forecast", "future", name, y, p, groups, n_boot=n_boot, seed=seed)
            curves[name] = forecast_metrics(y, p)["r2_by_horizon"]
        plots["forecast"] = plot_forecast(curves, out / "forecast_r2.png")
    else:
        target, classes = cfg["target"], meta["classes"]
        preds = pd.read_parquet(run / "predictions.parquet")
        preds = preds[preds["split"] == "test"].set_index("recording_id")
        train, y_train, _ = prepare_target(store.recordings("train"), target, task, str(run))
        test, y_test, _ = prepare_target(store.recordings("test"), target, task, str(run))
        if set(test["recording_id"]) != set(preds.index):
            raise ConfigError(f"{run}: its test predictions do not cover the store's labelled "
                              "test recordings (was the store rebuilt since?)")
        subject_split_check(train["subject"], test["subject"])
        groups = test["subject"].to_numpy()
        preds = preds.loc[test["recording_id"]]
        if task == "classification":
            y_true = y_test.astype(str)
            model_pred = preds[[f"proba_{c}" for c in classes]].to_numpy()
        else:
            y_true = y_test.astype(np.float64)
            model_pred = preds["y_pred"].to_numpy(np.float64)
        rows += score_rows(task, target, "brainlm", y_true, model_pred, groups, classes=classes,
                           n_boot=n_boot, seed=seed)
        xs_train = [np.asarray(store.load(r)) for _, r in train.iterrows()]
        xs_test = [np.asarray(store.load(r)) for _, r in test.iterrows()]
        block = meta.get("patch_size") or next(b for b in (20, 10, 5, 1) if window % b == 0)
        labels = y_train.astype(str) if task == "classification" else y_train.astype(np.float64)
        null = TrainMean(task)
        for name, baseline in (("fc_linear", FCBaseline(task, seed=seed)),
                               ("raw_roi_mlp", RawROIMLP(task, seed=seed, block=block,
                                                         window=window)),
                               (null.name, null)):
            baseline.fit(xs_train, labels, groups=train["subject"].to_numpy())
            if task == "classification":
                order = [list(baseline.classes_).index(c) for c in classes]
                p = baseline.predict_proba(xs_test)[:, order]
            else:
                p = baseline.predict(xs_test)
            rows += score_rows(task, target, name, y_true, p, groups, classes=classes,
                               n_boot=n_boot, seed=seed)
    if task == "forecast":
        control = {"status": "none", "target": "future",
                   "reason": "forecasting has no planted effect, so no positive control"}
        section = "## Positive control\n\n" + control["reason"] + ".\n"
    else:
        found = find_ground_truth(store)
        control, section = positive_controls(rows, target, task, found and found[0],
                                             str(found[1]) if found else "")
        for r in rows:  # the control's row says so in results.json too
            if control["status"] != "none" and r["method"] == control["method"] and \
                    r["metric"] == control["metric"]:
                r.update(positive_control=control["status"], control_threshold=control["threshold"])
    paths = write_results(rows, out, notes=section)
    write_bytes_atomic(out / "positive_control.json",
                       (json.dumps(_jsonable(control), indent=2) + "\n").encode())
    paths["positive_control"] = out / "positive_control.json"
    plots["comparison"] = plot_comparison(rows, out / "comparison.png")
    return {"rows": rows, "paths": {**paths, **plots}, "positive_control": control,
            "table": results_table(rows) + "\n" + section}
