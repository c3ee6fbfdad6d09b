"""Forecasting baselines: what a model's forecast of the next timepoints must beat.

Persistence (the last value held), each parcel's context mean, and a linear autoregressive
model fitted on the training windows. They live apart from the subject-variable baselines
because they take [n, parcels, time] contexts, not recordings, and share nothing with them.

Shapes: contexts are [n, parcels, time]; forecasts and futures are [n, parcels, horizon].
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


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

