"""The baselines every model result is shown beside, fitted on the same recordings and split.

Independent benchmarks found that functional connectivity + a linear model often matches or
beats fMRI foundation models, so a model score means little without FC + linear, the
tangent-space connectome + linear (the field's standard strong baseline for phenotypes), a
generic non-linear model of the same inputs (raw ROI MLP), the training-mean / majority
floor, and for forecasting persistence, parcel means and a linear AR model (forecasting.py,
re-exported here). Inner
cross-validation is by subject where subjects are given, so no penalty is tuned on a subject's
other recordings; penalty grids follow the data's scale (heads.py).

Every baseline sees what BrainLM sees: BrainLM averages its head over every window of a
recording (stride = window, the last window ending at the last timepoint:
brainlm.data.windows.sliding_batches), so the connectomes are computed on all of a
recording's timepoints (the union of those windows) and the MLP is trained on every training
window and its outputs averaged per recording.

Shapes: one recording is [parcels, time]; forecasting contexts and futures are
[n, parcels, time].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.model_selection import GridSearchCV

from ..data.windows import window_starts
from ..errors import ConfigError, check_orientation
from .forecasting import LinearAR, parcel_mean, persistence
from .heads import (
    RIDGE_FACTORS,
    ScaledLogisticCV,
    ScaledRidgeCV,
    _PooledScaler,
    _RowSpace,
    grid_edge,
    warn_edge,
)

__all__ = ["FCBaseline", "LinearAR", "RawROIMLP", "TangentBaseline", "TrainMean", "fc_features",
           "parcel_mean", "persistence", "roi_block_features", "roi_window_features",
           "window_starts"]

# The MLP's L2 penalties as multiples of n_rows - 1, the eigenvalue of each whitened input
# component in the Gram matrix: 1e-3 is nearly unpenalised, 1e3 shrinks the network to its
# output bias (the training mean / class frequencies).
MLP_FACTORS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)

def _one_blas_thread():
    """BLAS on one thread while a baseline fits or predicts: its matrices are small (a few
    hundred rows, or [P, P] with P in the hundreds), and on a busy 2-core machine two BLAS
    threads per process contend: measured 6x (tangent, A424) to 10x (the MLP) slower."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


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
    of `block` (the model's patch) and flattened parcel-major: the numbers the model sees in
    one window, without the transformer. Length P * window / block."""
    x = np.asarray(x, dtype=np.float64)
    if block < 1 or window < block or window % block:
        raise ConfigError(f"window {window} must be a positive multiple of block {block}")
    if x.ndim != 2 or x.shape[1] < window:
        raise ConfigError(f"roi_block_features: need a [parcels, time>={window}] recording, "
                          f"got shape {x.shape}; lower `window` or use longer recordings")
    return x[:, :window].reshape(len(x), window // block, block).mean(axis=2).ravel()



def roi_window_features(x, block: int = 20, window: int = 200,
                        stride: int | None = None) -> np.ndarray:
    """roi_block_features of every window of a [P, T] recording (window_starts):
    [n_windows, P * window / block]."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < window:
        raise ConfigError(f"roi_window_features: need a [parcels, time>={window}] recording, "
                          f"got shape {x.shape}; lower `window` or use longer recordings")
    return np.stack([roi_block_features(x[:, s:s + window], block, window)
                     for s in window_starts(x.shape[1], window, stride)])


def _inner_cv(task: str, y, groups, seed: int):
    """Folds for hyper-parameter search inside the training set. With `groups` they keep each
    subject (or recording, for windows) in one fold, so the penalty is not tuned on a
    subject's other recordings; for classification there are at most as many folds as the
    rarest class has groups, so every held-out fold can hold every class."""
    from sklearn.model_selection import (GroupKFold, StratifiedGroupKFold,
                                         StratifiedKFold)

    if task == "classification":
        y = np.asarray(y)
        n_min = (int(np.min(np.unique(y, return_counts=True)[1])) if groups is None else
                 min(len(np.unique(np.asarray(groups)[y == c])) for c in np.unique(y)))
        if n_min < 2:
            raise ConfigError("classification baseline: every class needs >= 2 training "
                              "subjects (recordings) for cross-validation")
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


class _Baseline:
    """Shared fit/predict over a list of [P, T] recordings. Subclasses set `name`, the design
    matrix (`_design`: rows and the recording each row belongs to; one row per recording
    unless overridden) and the sklearn pipeline; outputs of a recording's rows are averaged,
    as BrainLM averages its windows. After fit, `penalty_` holds the penalty inner CV chose
    and whether it is an edge of its grid (also said as a warning)."""

    name = "baseline"

    def __init__(self, task: str, seed: int = 0):
        if task not in ("regression", "classification"):
            raise ConfigError(f"{type(self).__name__}: task must be 'regression' or "
                              f"'classification', got {task!r}")
        self.task, self.seed, self.model, self.penalty_ = task, seed, None, None

    def features(self, xs) -> np.ndarray:
        raise NotImplementedError

    def _design(self, xs, fit: bool = False) -> tuple[np.ndarray, np.ndarray]:
        X = self.features(xs)
        return X, np.arange(len(X))

    def _pipeline(self, X, y, groups):
        raise NotImplementedError

    def _chosen_penalty(self) -> tuple[str, float, object]:
        """(its name, the value inner CV chose in its own units, the fitted head with
        alphas_, edge_ and edge_limiting_)."""
        head = self.model[-1]
        return ("C", head.C_, head) if isinstance(head, ScaledLogisticCV) else \
            ("alpha", head.alpha_, head)

    def fit(self, xs, y, groups=None):
        """Fit on training recordings; `groups` (their subjects) makes inner CV subject-wise
        (a recording's rows always stay in one fold)."""
        xs = _recordings(xs, self.name)
        y = np.asarray(y)
        if len(y) != len(xs):
            raise ConfigError(f"{self.name}: {len(xs)} recordings but {len(y)} targets")
        if self.task == "regression":
            y = y.astype(np.float64)
        elif len(np.unique(y)) < 2:
            raise ConfigError(f"{self.name}: the training labels hold one class only")
        if groups is not None and len(groups) != len(y):
            raise ConfigError(f"{self.name}: {len(y)} recordings but {len(groups)} groups")
        with _one_blas_thread():
            X, owner = self._design(xs, fit=True)
            rows_groups = (np.asarray(groups)[owner] if groups is not None
                           else owner if len(owner) > len(xs) else None)
            self.model = self._pipeline(X, y[owner], rows_groups).fit(X, y[owner])
        what, value, head = self._chosen_penalty()
        self.penalty_ = {"penalty_name": what, "penalty": float(value),
                         "penalty_edge": head.edge_, "penalty_at_edge": warn_edge(
                             self.name, head.edge_, head.edge_limiting_, head.alphas_, what,
                             float(value))}
        return self

    def _fitted(self):
        if self.model is None:
            raise ConfigError(f"{self.name}: call fit() before predicting")
        return self.model

    @property
    def classes_(self):
        return self._fitted().classes_

    def _averaged(self, xs, method: str) -> np.ndarray:
        model = self._fitted()
        with _one_blas_thread():
            X, owner = self._design(_recordings(xs, self.name))
            out = np.asarray(getattr(model, method)(X), dtype=np.float64)
        counts = np.bincount(owner)
        sums = np.zeros((len(counts),) + out.shape[1:])
        np.add.at(sums, owner, out)
        return sums / counts.reshape((-1,) + (1,) * (out.ndim - 1))

    def predict(self, xs) -> np.ndarray:
        """Values (regression) or labels (classification: the class of the highest averaged
        probability), one per recording."""
        if self.task == "regression":
            return self._averaged(xs, "predict")
        return np.asarray(self.classes_)[np.argmax(self.predict_proba(xs), axis=1)]

    def predict_proba(self, xs) -> np.ndarray:
        """[n, n_classes] probabilities averaged over each recording's rows, columns in
        `classes_` order."""
        if self.task != "classification":
            raise ConfigError(f"{self.name}: predict_proba is for classification")
        return self._averaged(xs, "predict_proba")


def _linear_head(task: str, y, groups, seed: int, scaling: str, factors):
    """scale -> row space -> ridge / L2 logistic regression, penalty grid from the data."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = _inner_cv(task, y, groups, seed)
    head = (ScaledRidgeCV(factors, cv=cv) if task == "regression"
            else ScaledLogisticCV(factors, cv=cv, random_state=seed))
    scaler = StandardScaler() if scaling == "feature" else _PooledScaler()
    return make_pipeline(scaler, _RowSpace(), head)


class FCBaseline(_Baseline):
    """Fisher-z FC upper triangle of every timepoint of a recording -> scale -> ridge
    (regression) or L2 logistic regression (classification), the penalty chosen by inner CV
    on a grid that follows the features' scale (`factors` x the trace of the training
    features' centred Gram matrix: heads.py). The baseline foundation models must beat.

    `scaling="pooled"` (default) centres every edge and divides all edges by ONE pooled SD,
    so edges keep their relative between-subject variance. Per-edge standardization
    (`scaling="feature"`) blows noise edges up to the size of informative ones, which an L2
    penalty cannot undo when edges outnumber recordings (on a planted one-edge effect with 45
    training recordings held-out R^2 fell from ~0.9 to 0.1-0.7, depending on the seed).
    """

    name = "fc_linear"

    def __init__(self, task: str, seed: int = 0, scaling: str = "pooled",
                 factors: Sequence[float] = RIDGE_FACTORS):
        super().__init__(task, seed)
        if not len(factors) or min(factors) <= 0:
            raise ConfigError(f"{type(self).__name__}: penalty factors must be positive, got "
                              f"{tuple(factors)}")
        if scaling not in ("pooled", "feature"):
            raise ConfigError(f"{type(self).__name__}: scaling must be 'pooled' or 'feature', "
                              f"got {scaling!r}")
        self.scaling, self.factors = scaling, tuple(factors)

    def features(self, xs) -> np.ndarray:
        return np.stack([fc_features(x) for x in _recordings(xs, self.name)])

    def _pipeline(self, X, y, groups):
        return _linear_head(self.task, y, groups, self.seed, self.scaling, self.factors)


class TangentBaseline(FCBaseline):
    """Tangent-space connectome + the same linear head as FCBaseline: each recording's
    covariance (Ledoit-Wolf, of z-scored parcels over all its timepoints) whitened by the
    geometric mean of the TRAINING recordings' covariances and mapped to the tangent space by
    the matrix logarithm, upper triangle without the diagonal (nilearn's
    ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True)). The reference
    mean is fitted in `fit` only; held-out recordings are transformed against it.

    Cost: one eigendecomposition of a [P, P] matrix per recording and per iteration of the
    geometric mean (A424, 105 training + 45 held-out recordings of 300 timepoints: ~30 s on
    one thread of a busy 2-core machine, ~3 min with two contending BLAS threads)."""

    name = "tangent_linear"

    def __init__(self, task: str, seed: int = 0, scaling: str = "pooled",
                 factors: Sequence[float] = RIDGE_FACTORS):
        super().__init__(task, seed, scaling, factors)
        self.measure_ = None

    def _design(self, xs, fit: bool = False):
        from nilearn.connectome import ConnectivityMeasure

        series = [np.asarray(x, dtype=np.float64).T for x in _recordings(xs, self.name)]
        if fit:
            self.measure_ = ConnectivityMeasure(kind="tangent", vectorize=True,
                                                discard_diagonal=True)
            X = self.measure_.fit_transform(series)
        elif self.measure_ is None:
            raise ConfigError(f"{self.name}: call fit() before predicting")
        else:
            X = self.measure_.transform(series)
        return np.asarray(X, dtype=np.float64), np.arange(len(series))


class RawROIMLP(_Baseline):
    """Small MLP on block-averaged parcel time series of EVERY window of a recording
    (roi_window_features, BrainLM's windows): tells whether the transformer adds anything over
    a generic non-linear model of the same inputs. Trained on all training windows (each with
    its recording's target); a recording's prediction is the mean of its windows' outputs
    (class probabilities for classification), as BrainLM's.

    Built to be sane with few recordings and thousands of inputs (A424: 4,240 per window):
    inputs standardised and reduced to at most `n_components` whitened principal components
    (fitted on the training windows only), regression targets standardised, and the L2
    penalty chosen by inner cross-validation on the training windows (a recording's windows,
    or a subject's with `groups`, in one fold) from `factors` x (n_windows - 1): whitened
    inputs put every component's Gram eigenvalue at n_windows - 1, so the grid follows the
    number of rows. The heaviest penalties shrink the network to its output bias, i.e. the
    training mean (or class frequencies), so when the inputs carry nothing inner CV can fall
    back to that floor instead of extrapolating (the former early-stopped MLP scored R^2 -59
    on the former demo's 8 test subjects). lbfgs: full-batch, deterministic for a seed."""

    name = "raw_roi_mlp"

    def __init__(self, task: str, seed: int = 0, block: int = 20, window: int = 200,
                 stride: int | None = None, hidden: Sequence[int] = (64,),
                 factors: Sequence[float] = MLP_FACTORS, n_components: int = 20,
                 max_iter: int = 200):
        super().__init__(task, seed)
        if block < 1 or window < block or window % block:
            raise ConfigError(f"RawROIMLP: window {window} must be a positive multiple of "
                              f"block {block}")
        if int(n_components) < 1 or not len(factors) or min(factors) <= 0:
            raise ConfigError(f"RawROIMLP: need n_components >= 1 and positive factors, got "
                              f"{n_components}, {tuple(factors)}")
        self.block, self.window, self.stride = block, window, stride
        self.hidden, self.factors = tuple(hidden), tuple(factors)
        self.n_components, self.max_iter = int(n_components), max_iter

    def _design(self, xs, fit: bool = False):
        feats = [roi_window_features(x, self.block, self.window, self.stride)
                 for x in _recordings(xs, self.name)]
        owner = np.repeat(np.arange(len(feats)), [len(f) for f in feats])
        return np.concatenate(feats), owner

    def _folds(self, y, groups):
        from sklearn.model_selection import KFold

        cv = _inner_cv(self.task, y, groups, self.seed)
        if cv is None:  # regression without groups: plain shuffled folds
            cv = list(KFold(min(5, len(y)), shuffle=True, random_state=self.seed)
                      .split(np.zeros(len(y))))
        elif not isinstance(cv, list):
            cv = list(cv.split(np.zeros(len(y)), y))
        return cv

    def _pipeline(self, X, y, groups):
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
        self.alphas_ = max(len(X) - 1, 1) * np.asarray(self.factors, dtype=np.float64)
        if self.task == "regression":
            model = TransformedTargetRegressor(net, transformer=StandardScaler())
            grid = {"regressor__mlp__alpha": list(self.alphas_)}
            scoring = "neg_mean_squared_error"
        else:
            model, grid, scoring = net, {"mlp__alpha": list(self.alphas_)}, "neg_log_loss"
        return _QuietSearch(model, grid, cv=self._folds(y, groups), scoring=scoring,
                            refit=True, error_score="raise")

    def _chosen_penalty(self):
        search = self._fitted()
        self.alphas_ = np.asarray(search.cv_results_[f"param_{next(iter(search.best_params_))}"],
                                  dtype=np.float64)
        self.scores_ = np.asarray(search.cv_results_["mean_test_score"], dtype=np.float64)
        self.edge_, self.edge_limiting_ = grid_edge(self.alphas_, self.scores_, self.alpha_)
        return "alpha", self.alpha_, self

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
