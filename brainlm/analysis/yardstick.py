"""What a pretrained encoder is worth beyond reconstruction, on the same terms for every run.

Why: the pretraining runs of several mask ratios must be ranked as encoders, and their own
reconstruction numbers cannot do that. Two checks that need no fine-tuning:
- a linear probe of a phenotype from the frozen, deterministic (nothing masked) embeddings:
  mean-pooled embeddings per recording, a ridge (or logistic) model whose penalty is chosen by
  cross-validation on the training subjects only, scored on the test subjects with a
  subject-bootstrap CI, beside the training-mean (majority-class) predictor, with the paired
  subject-bootstrap interval of the probe's gain over that floor and its verdict (better /
  worse / undecided);
- zero-shot network identification: parcels clustered from the model's representations,
  compared (adjusted Rand index) with known networks, beside the same clustering of the
  model's representations of flat input (coordinates only: networks are spatial, so a model
  can "find" them without reading any signal) and of raw FC.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

ALPHAS = np.logspace(-2, 6, 17)  # up to shrinking to the training mean


def _probe_model(task: str):
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "regression":
        # 5-fold, not leave-one-out: on a few dozen subjects LOO (GCV) picks too weak a
        # penalty and the probe lands far below the training mean it should at worst match
        return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, cv=5))
    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=1 / ALPHAS, cv=5, l1_ratios=(0.0,), scoring="neg_log_loss", max_iter=2000,
        use_legacy_attributes=False))


def linear_probe(model, store, target: str, task: str = "regression", n_boot: int = 500,
                 seed: int = 0) -> dict:
    """Probe `target` from frozen embeddings: fitted on train, scored on test.

    Returns {"metric": "r2" | "roc_auc", "value", "low", "high", "floor", "gain_low",
    "gain_high", "verdict", "n_train", "n_test"}; "floor" is the training-mean
    (majority-class) predictor's score on test, gain_low/high the paired subject-bootstrap 95 %
    interval of value - floor (the same resamples of test subjects score both), "verdict" its
    BETTER word (better / worse / undecided)."""
    from ..data.windows import prepare_target
    from ..evaluate import bootstrap_ci, metric_fn
    from ..evaluate.intervals import BETTER, paired_bootstrap
    from .embeddings import embed_store

    if task not in ("regression", "classification"):
        raise ConfigError(f"probe task '{task}' must be regression or classification")
    emb = embed_store(model, store)
    rows = store.recordings()
    if target not in rows.columns:
        raise ConfigError(f"{store.path}: no phenotype '{target}' to probe")
    data = emb.merge(rows[["recording_id", target]], on="recording_id", how="left")
    cols = [c for c in data.columns if c.startswith("mean_")]
    split = {}
    for s in ("train", "test"):
        part, y, _ = prepare_target(data[data["split"] == s].reset_index(drop=True), target,
                                    task, str(store.path))
        split[s] = (part, np.asarray(y))
    (tr, y_tr), (te, y_te) = split["train"], split["test"]
    if len(tr) < 3 or len(te) < 2:
        raise ConfigError(f"{store.path}: too few labelled recordings to probe '{target}' "
                          f"({len(tr)} train, {len(te)} test)")
    x_tr, x_te = tr[cols].to_numpy(np.float64), te[cols].to_numpy(np.float64)
    groups = te["subject"].to_numpy()
    if task == "regression":
        fit = _probe_model(task).fit(x_tr, y_tr.astype(np.float64))
        pred, floor_pred = fit.predict(x_te), np.full(len(te), y_tr.astype(np.float64).mean())
        metric, name = metric_fn("regression", "r2"), "r2"
        y_true = y_te.astype(np.float64)
    else:
        classes = sorted(set(y_tr))
        if len(classes) != 2 or not set(y_te) <= set(classes):
            raise ConfigError(f"probe of '{target}': needs two classes seen in training, "
                              f"got {classes}")
        fit = _probe_model(task).fit(x_tr, y_tr)
        pred = fit.predict_proba(x_te)
        share = float(np.mean(y_tr == fit.classes_[1]))
        floor_pred = np.tile([1 - share, share], (len(te), 1))
        metric = metric_fn("classification", "roc_auc", list(fit.classes_))
        name, y_true = "roc_auc", y_te
    ci = bootstrap_ci(metric, y_true, pred, groups, n_boot=n_boot, seed=seed)
    gain = paired_bootstrap(metric, y_true, pred, floor_pred, groups, n_boot=n_boot, seed=seed,
                            words=BETTER)
    return {"metric": name, "value": ci["value"], "low": ci["low"], "high": ci["high"],
            "floor": float(metric(y_true, floor_pred)), "gain_low": gain["low"],
            "gain_high": gain["high"], "verdict": gain["verdict"], "n_train": len(tr),
            "n_test": len(te)}


def network_ari(model, store, truth, k: int | None = None, max_windows: int = 32,
                seed: int = 0) -> dict:
    """ARI of the model's, the flat-input control's and raw FC's parcel clusters against
    `truth` [P] network labels, on validation windows."""
    import torch

    from ..data.store import WindowDataset
    from ..model import window_length
    from .networks import identify_networks

    truth = np.asarray(truth)
    window = window_length(model)
    ds = WindowDataset(store, "val", window=window, mode="sliding", stride=window)
    windows = np.stack([ds[i]["signal"] for i in range(min(len(ds), max_windows))])
    k = int(k or len(np.unique(truth)))
    nets = identify_networks(model, windows, torch.as_tensor(store.coords), k=k, truth=truth,
                             seed=seed)
    return {"model": nets["model"]["ari"], "flat_input": nets["position_only"]["ari"],
            "fc": nets["fc"]["ari"], "k": k}
