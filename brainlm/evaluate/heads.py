"""The penalised linear heads of the connectome baselines, with penalty grids that follow the
data's scale, and the check that inner cross-validation did not stop at a grid edge.

Why: a ridge penalty means something only relative to the eigenvalues of the training
features' Gram matrix. A fixed grid (10^-3 to 10^5) sat far below the scale of 89,676 pooled-
scaled FC edges (trace ~2e6 with 24 recordings), so inner CV chose its top edge every time and
the baseline was under-regularised by construction. Here the grid is the trace of the centred
Gram matrix of the training features times fixed factors spanning eight decades: multiplying
the features by c multiplies every candidate penalty by c^2, so the choice does not depend on
units. An edge chosen while the inner-CV score still improves towards it is said
(warnings.warn naming the baseline and the penalty) and kept (`edge_`, `edge_limiting_`), so a
report can show which baseline may be limited by its grid.

Also here: the scalers that come before the heads (_PooledScaler, _RowSpace).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin

# Penalties as multiples of the trace of the centred training Gram matrix: 1e-6 is nearly
# unpenalised (the minimum-norm fit), 1e2 shrinks even the largest component over 100-fold,
# i.e. to the training mean / class frequencies; three candidates per decade.
RIDGE_FACTORS = tuple(np.logspace(-6, 2, 25))


def gram_scale(X) -> float:
    """Trace of the centred Gram matrix of a [n, p] feature matrix (the sum of its eigenvalues,
    = the summed squared deviation from the column means); 1.0 for constant features."""
    X = np.asarray(X, dtype=np.float64)
    scale = float(np.sum((X - X.mean(axis=0)) ** 2))
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def grid_edge(alphas, scores, chosen: float) -> tuple[str | None, bool]:
    """Where inner CV's choice sits on its grid: ("lowest" / "highest" / None, limiting).

    `alphas` are penalty strengths, `scores` their mean inner-CV scores (higher is better).
    An edge choice is *limiting* when the score is still improving towards it: the edge beats
    its neighbour by more than 1 % of the scores' range over the grid. An edge on a plateau
    is not (the heaviest penalties already give the training mean, or with a strong signal the
    lightest are all alike): a penalty beyond it would change nothing."""
    alphas = np.asarray(alphas, dtype=np.float64)
    order = np.argsort(alphas)
    alphas, scores = alphas[order], np.asarray(scores, dtype=np.float64)[order]
    if np.isclose(chosen, alphas[0], rtol=1e-9, atol=0):
        edge, k, near = "lowest", 0, 1
    elif np.isclose(chosen, alphas[-1], rtol=1e-9, atol=0):
        edge, k, near = "highest", len(alphas) - 1, len(alphas) - 2
    else:
        return None, False
    finite = scores[np.isfinite(scores)]
    if len(alphas) < 2 or len(finite) < 2 or not np.isfinite(scores[[k, near]]).all():
        return edge, True
    spread = float(finite.max() - finite.min())
    return edge, bool(scores[k] - scores[near] > 0.01 * spread)


def warn_edge(name: str, edge: str | None, limiting: bool, alphas, what: str,
              shown: float) -> bool:
    """Warn when inner CV's choice is a limiting edge of the penalty grid `alphas` (penalty
    strengths); `what` / `shown` name the chosen value in the estimator's own units (e.g.
    logistic C = 1 / alpha). Returns whether it warned."""
    if edge is None or not limiting:
        return False
    why = ("a heavier penalty might do better (the inner-CV score still improves towards it)"
           if edge == "highest" else
           "a lighter penalty might do better (the inner-CV score still improves towards it)")
    warnings.warn(f"baseline {name}: inner cross-validation chose the {edge} penalty of its "
                  f"grid ({what}={shown:.3g}; penalties {min(alphas):.3g} to "
                  f"{max(alphas):.3g}); {why}", stacklevel=3)
    return True


class ScaledRidgeCV(RegressorMixin, BaseEstimator):
    """Ridge with its penalty chosen by inner CV (mean squared error) over `factors` x
    gram_scale(training X); `cv` None: efficient leave-one-out, else a list of (train,
    test) index pairs. After fit: alpha_, alphas_ (the grid), scores_ (mean inner-CV score of
    each, higher is better), edge_ ("lowest" / "highest" / None), edge_limiting_."""

    def __init__(self, factors=RIDGE_FACTORS, cv=None):
        self.factors, self.cv = factors, cv

    def fit(self, X, y):
        from sklearn.linear_model import Ridge, RidgeCV

        self.alphas_ = gram_scale(X) * np.asarray(self.factors, dtype=np.float64)
        if self.cv is None:
            self.model_ = RidgeCV(alphas=self.alphas_, store_cv_results=True).fit(X, y)
            self.alpha_ = float(self.model_.alpha_)
            self.scores_ = -self.model_.cv_results_.mean(axis=0)
        else:
            self.scores_ = _ridge_fold_scores(X, y, self.cv, self.alphas_)
            self.alpha_ = float(self.alphas_[int(np.argmax(self.scores_))])
            self.model_ = Ridge(alpha=self.alpha_).fit(X, y)
        self.edge_, self.edge_limiting_ = grid_edge(self.alphas_, self.scores_, self.alpha_)
        return self

    def predict(self, X):
        return self.model_.predict(X)


def _ridge_fold_scores(X, y, folds, alphas) -> np.ndarray:
    """Mean over `folds` ((train, test) index pairs) of minus the held-out mean squared error of
    ridge with an intercept at each of `alphas`: what GridSearchCV(Ridge(), scoring=
    "neg_mean_squared_error") computes, from one SVD per fold instead of one fit per penalty
    (0.5 s -> 10 ms for 25 penalties x 5 folds)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    scores = []
    for train, test in folds:
        x_mean, y_mean = X[train].mean(axis=0), y[train].mean()
        u, sv, vt = np.linalg.svd(X[train] - x_mean, full_matrices=False)
        shrink = sv[:, None] / (sv[:, None] ** 2 + alphas[None])  # [rank, n_alphas]
        coef = shrink * (u.T @ (y[train] - y_mean))[:, None]
        pred = y_mean + ((X[test] - x_mean) @ vt.T) @ coef  # [n_test, n_alphas]
        scores.append(-np.mean((y[test][:, None] - pred) ** 2, axis=0))
    return np.mean(scores, axis=0)


class ScaledLogisticCV(ClassifierMixin, BaseEstimator):
    """L2 logistic regression, C chosen by inner CV (log loss) over C = 1 / (factors x
    gram_scale(training X)): the same penalties as ScaledRidgeCV (sklearn's C multiplies the
    data term, so 1/C is the ridge-like penalty). After fit: C_, alpha_ (= 1/C_), alphas_,
    scores_, edge_, edge_limiting_, classes_."""

    def __init__(self, factors=RIDGE_FACTORS, cv=None, random_state: int = 0):
        self.factors, self.cv, self.random_state = factors, cv, random_state

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegressionCV

        self.alphas_ = gram_scale(X) * np.asarray(self.factors, dtype=np.float64)
        # newton-cholesky: same optimum as lbfgs, ~10x faster on few columns; but its Hessian
        # is columns^2 (60 GB for A424's 89,676 edges), so lbfgs beyond a few thousand
        solver = "newton-cholesky" if np.shape(X)[1] <= 2000 else "lbfgs"
        self.model_ = LogisticRegressionCV(
            Cs=1.0 / self.alphas_, l1_ratios=(0.0,), cv=self.cv, scoring="neg_log_loss",
            solver=solver, max_iter=1000, random_state=self.random_state,
            use_legacy_attributes=False).fit(X, y)
        self.C_ = float(self.model_.C_)
        self.alpha_ = 1.0 / self.C_
        scores = np.asarray(self.model_.scores_, dtype=np.float64)  # [folds, l1_ratios, Cs]
        self.scores_ = scores.reshape(-1, scores.shape[-1]).mean(axis=0)
        self.edge_, self.edge_limiting_ = grid_edge(1.0 / np.asarray(self.model_.Cs_),
                                                    self.scores_, self.alpha_)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(X)

    def predict(self, X):
        return self.model_.predict(X)


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
    ||V b|| = ||b|| keeps the penalty (and the trace that scales the grid), so the fit, the
    inner CV and every prediction are unchanged while the solver sees 24 columns instead of
    89,676 (A424 edges)."""

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
