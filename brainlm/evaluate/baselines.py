"""The baselines every model result is shown beside, fitted on the same recordings and split.

Independent benchmarks found that functional connectivity + a linear model often matches or
beats fMRI foundation models, so a model score means little without FC + linear, a generic
non-linear model of the same inputs (raw ROI MLP), the training-mean / majority floor, and for
forecasting persistence, parcel means and a linear AR model. Inner cross-validation is by
subject where subjects are given, so no penalty is tuned on a subject's other recordings.

Shapes: one recording is [parcels, time]; forecasting contexts and futures are
[n, parcels, time].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.model_selection import GridSearchCV

from ..errors import ConfigError, check_orientation

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

