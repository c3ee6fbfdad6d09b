"""A linear head fitted in closed form: the FC baseline's ridge / L2-logistic head (penalty by
inner CV over subjects, `evaluate.baselines`) on a frozen encoder's pooled features, written
into an `nn.Linear` so the predictor, the registry and serving use it as any trained head.

Why: the connectivity pooling has P (P - 1) / 2 features (89,676 on A424) and a few dozen
training recordings; gradient steps on such a head depend on the learning rate and the epochs,
while the baseline's head is the penalised optimum with the penalty chosen by cross-validation.
BrainLM read out exactly as FC is read out makes the comparison with FC + linear one of the
features alone.
"""

from __future__ import annotations

import numpy as np
import torch


def affine_of(pipeline) -> tuple[np.ndarray, np.ndarray]:
    """(W [d, k], b [k]) with decision(x) = x @ W + b for a fitted scaler -> row space -> ridge
    or logistic pipeline (`baselines._linear_head`): every step is affine, so the whole is."""
    scaler, rows, head = (pipeline.steps[i][1] for i in range(3))
    model = head.model_
    coef = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64))  # [k, r]
    intercept = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64))
    basis = rows.components_  # [r, d], or None: the features themselves
    w_rows = coef.T if basis is None else basis.T @ coef.T  # [d, k]
    scale = np.asarray(getattr(scaler, "scale_", 1.0), dtype=np.float64)
    weight = w_rows / (scale[:, None] if scale.ndim else scale)
    shift = np.asarray(scaler.mean_, dtype=np.float64)
    bias = intercept - shift @ weight
    if basis is not None:  # the row space centres before projecting
        bias = bias - rows.mean_ @ w_rows
    return weight, bias


def fit_head(head: torch.nn.Module, features: np.ndarray, y: np.ndarray, groups, task: str,
             n_classes: int, seed: int) -> dict:
    """Fit the baseline's head on per-recording features [n, d] (targets: standardized values
    or class indices) and copy it into `head.linear` ([n_classes or 1] outputs; a binary
    logistic model's logit goes to class 1, class 0 gets 0). Returns the chosen penalty."""
    from ..evaluate.baselines import RIDGE_FACTORS, _linear_head

    pipeline = _linear_head(task, y, groups, seed, "pooled", RIDGE_FACTORS)
    pipeline.fit(features, y)
    weight, bias = affine_of(pipeline)
    if task == "classification" and n_classes == 2 and weight.shape[1] == 1:
        weight = np.concatenate([np.zeros_like(weight), weight], axis=1)
        bias = np.concatenate([[0.0], bias])
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(weight.T, dtype=torch.float32))
        head.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    fitted = pipeline.steps[-1][1]
    return {"alpha": float(fitted.alpha_), "edge": fitted.edge_}
