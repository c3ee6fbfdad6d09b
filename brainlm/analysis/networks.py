"""Functional networks from model representations, next to the functional-connectivity baseline.

Why: a claim that a foundation model "learned brain networks" means little unless the same
clustering on plain functional connectivity (FC) is shown beside it; `identify_networks`
always reports both, with the adjusted Rand index (ARI) against known labels when given.

Parcel representations need one token per (parcel, time patch), which only our BrainLM
token model (Family A) has; the released ViTMAE canvas patches mix parcels.
Arrays are [parcels, time]; batches [batch, parcels, time].
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..model import is_released
from .reconstruction import inference

__all__ = ["parcel_representations", "fc_matrix", "cluster_parcels", "network_agreement",
           "identify_networks"]


def _require_token_model(model, what: str) -> None:
    if is_released(model) or not hasattr(model, "encode"):
        raise ConfigError(f"{what} needs a BrainLM (Family A) model with one token per parcel "
                          "and time patch; released ViTMAE canvas patches mix parcels")


def _as_windows(windows) -> np.ndarray:
    w = np.asarray(windows.detach().cpu() if torch.is_tensor(windows) else windows)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or 0 in w.shape:
        raise ConfigError(f"windows must be [batch, parcels, time] (or one [parcels, time]), got "
                          f"shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ConfigError("windows contain NaN or inf")
    return w


def parcel_representations(model, windows, coords=None, batch_size: int = 16) -> np.ndarray:
    """[P, H]: each parcel's encoder token states, nothing masked, averaged over its time
    patches and over the windows [B, P, T] (T a multiple of the patch size)."""
    _require_token_model(model, "parcel_representations")
    w = _as_windows(windows)
    b, p, t = w.shape
    ps = model.config.patch_size
    if t % ps:
        raise ConfigError(f"windows of {t} timepoints are not a multiple of patch_size {ps}")
    param = next(model.parameters())
    total = torch.zeros(p, model.config.hidden_size, dtype=torch.float64)
    with inference(model):
        for i in range(0, b, batch_size):
            x = torch.from_numpy(w[i:i + batch_size]).to(device=param.device, dtype=param.dtype)
            hidden = model.encode(x, coords)[:, 1:]  # [b, P * N, H], token p * N + n
            total += hidden.reshape(x.shape[0], p, t // ps, -1).double().sum((0, 2)).cpu()
    return (total / (b * (t // ps))).numpy()


def _pearson(x: np.ndarray) -> np.ndarray:
    """[P, T] -> [P, P] correlation; a constant parcel correlates 0 with others, 1 with itself."""
    x = np.asarray(x, np.float64)
    z = x - x.mean(1, keepdims=True)
    sd = np.sqrt((z ** 2).sum(1))
    z = np.divide(z, sd[:, None], out=np.zeros_like(z), where=sd[:, None] > 0)
    fc = z @ z.T
    np.fill_diagonal(fc, 1.0)
    return np.clip(fc, -1.0, 1.0)


def fc_matrix(data) -> np.ndarray:
    """[P, P] Pearson FC averaged over recordings or windows.

    `data`: one [P, T], a [B, P, T] array, or a list of [P, T] of any lengths. Plain mean of
    the correlations (no Fisher z), no detrending: detrend/scale before if drifts matter.
    """
    if isinstance(data, (list, tuple)):
        items = [np.asarray(d) for d in data]
    else:
        arr = np.asarray(data.detach().cpu() if torch.is_tensor(data) else data)
        items = list(arr) if arr.ndim == 3 else [arr]
    if not items or any(i.ndim != 2 or i.shape[1] < 2 for i in items):
        raise ConfigError("fc_matrix needs [parcels, time] recordings with >= 2 timepoints")
    if len({i.shape[0] for i in items}) > 1:
        raise ConfigError(f"recordings have different parcel counts: "
                          f"{sorted({i.shape[0] for i in items})}")
    if not all(np.all(np.isfinite(i)) for i in items):
        raise ConfigError("fc_matrix input contains NaN or inf")
    return np.mean([_pearson(i) for i in items], axis=0)


def cluster_parcels(features, k: int, seed: int = 0) -> np.ndarray:
    """Labels [P] from KMeans (n_init=10, seeded) on standardized features [P, F].

    Standardizing each feature keeps one high-variance dimension from deciding the clusters;
    for an FC matrix the rows are the features (a parcel's connectivity profile).
    """
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] < 1:
        raise ConfigError(f"features must be [parcels, features], got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ConfigError("features contain NaN or inf")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= f.shape[0]:
        raise ConfigError(f"k={k!r} clusters must be an integer between 1 and {f.shape[0]} "
                          "(the parcel count)")
    z = StandardScaler().fit_transform(f)
    return KMeans(n_clusters=int(k), n_init=10, random_state=seed).fit_predict(z).astype(np.int64)


def network_agreement(labels, truth) -> float:
    """Adjusted Rand index: 1 for the same partition (any label names), ~0 for chance."""
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(labels).ravel(), np.asarray(truth).ravel()
    if a.shape != b.shape:
        raise ConfigError(f"labels ({a.size}) and truth ({b.size}) must label the same parcels")
    return float(adjusted_rand_score(b, a))


def identify_networks(model, windows, coords=None, k: int = 7, truth=None, seed: int = 0,
                      batch_size: int = 16) -> dict:
    """Cluster parcels into `k` networks from (a) model representations and (b) raw FC of the
    same windows [B, P, T], with the same clustering.

    Returns {"k", "n_windows", "model": {...}, "position_only": {...}, "fc": {...}}, each with
    "labels" [P],
    "features" ([P, H] representations / [P, P] FC) and "ari" (None without `truth` [P]).
    """
    w = _as_windows(windows)
    if truth is not None and np.asarray(truth).size != w.shape[1]:
        raise ConfigError(f"truth labels {np.asarray(truth).size} parcels, windows have "
                          f"{w.shape[1]}")
    out = {"k": int(k), "n_windows": int(w.shape[0])}
    # control: every token carries its parcel's coordinates, and networks are spatial, so the
    # model's clusters are compared with those it gives for flat (all-zero) input
    control = parcel_representations(model, np.zeros_like(w[:1]), coords, batch_size)
    for name, feats in (("model", parcel_representations(model, w, coords, batch_size)),
                        ("position_only", control), ("fc", fc_matrix(w))):
        labels = cluster_parcels(feats, k, seed)
        out[name] = {"labels": labels, "features": feats,
                     "ari": None if truth is None else network_agreement(labels, truth)}
    return out


def network_labels(path, store) -> np.ndarray | None:
    """Network label per parcel: brainlm synth's ground_truth.json, or a one-column table."""
    if path is None:
        return None
    import json
    from pathlib import Path

    path = Path(path)
    try:
        if path.suffix == ".json":
            truth = json.loads(path.read_text())
            labels = dict(zip(truth["parcel_labels"], truth["modules"]))
            missing = [int(v) for v in store.parcels["label"] if int(v) not in labels]
            if missing:
                raise ConfigError(f"{path}: no network for parcel label(s) "
                                  f"{', '.join(map(str, missing[:10]))} of the store")
            return np.array([labels[int(v)] for v in store.parcels["label"]])
        import pandas as pd

        table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        if "label" in table.columns and table.shape[1] > 1:  # rows keyed by parcel label
            keyed = dict(zip(table["label"].astype(int), table.drop(columns="label").iloc[:, -1]))
            missing = [int(v) for v in store.parcels["label"] if int(v) not in keyed]
            if missing:
                raise ConfigError(f"{path}: no network for parcel label(s) "
                                  f"{', '.join(map(str, missing[:10]))} of the store")
            column = pd.Series([keyed[int(v)] for v in store.parcels["label"]])
        else:  # one label per parcel, in the store's parcel order
            column = table.iloc[:, -1]
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"{path}: cannot read network labels ({type(exc).__name__}: "
                          f"{exc})") from None
    if len(column) != store.n_parcels or column.isna().any():
        raise ConfigError(f"{path}: needs one network label per parcel ({store.n_parcels}), "
                          f"got {len(column)} rows ({int(column.isna().sum())} empty)")
    return column.astype(str).to_numpy()
