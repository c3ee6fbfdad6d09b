"""Scoring a pretraining run: reconstruction R^2 of the model beside the ladder of
`reconstruction` and `linear_rungs` on the same deterministic windows and masks (at the run's
own mask ratio and at one common ratio every run shares), the paired subject-bootstrap
interval of its gain over the best rung with the three-valued verdict, and the frozen
encoder's probe and network checks."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from .config import PretrainConfig
from .reconstruction import step_noise

COMMON_MASK_RATIO = 0.75  # every run is also scored at this ratio, with the same masks
COMMON_MASK_SEED = 7919  # ... drawn from this seed, whatever the run's own seed
EVAL_SEED_OFFSET = 7919  # a run's own-ratio masks are drawn from its seed + this
RIDGE_WINDOWS = 64  # training windows the ridge and space-time rungs are fitted on
GAIN_BOOT, GAIN_SEED = 1000, 0  # subject resamples of every reconstruction gain (same draws)


def _eval_windows(store, split: str, cfg: PretrainConfig, limit: int):
    """(start, windows [b, P, T], subjects [b]) batches of `limit` sliding windows spread evenly
    over the split (all of them when there are no more): the first `limit` alone would come
    from the first few subjects of a large cohort."""
    from ..data.store import WindowDataset

    ds = WindowDataset(store, split, window=cfg.window, mode="sliding", stride=cfg.window)
    picked = (np.linspace(0, len(ds) - 1, limit).round().astype(int) if len(ds) > limit
              else np.arange(len(ds)))
    subjects = [str(ds.rows.at[ds.index[i][0], "subject"]) for i in picked]
    for start in range(0, len(picked), 16):
        chunk = picked[start:start + 16]
        yield start, torch.stack([torch.from_numpy(ds[int(i)]["signal"]) for i in chunk]), \
            subjects[start:start + 16]


def _fit_gaussian(store):
    """The conditional-Gaussian rung from every training recording (scaled), each read at a
    stride that keeps the pooled timepoints near MAX_COV_SAMPLES (memory stays bounded)."""
    from .linear_rungs import MAX_COV_SAMPLES, GaussianRung

    rows = store.recordings("train")
    step = max(1, math.ceil(int(rows["n_timepoints"].sum()) / MAX_COV_SAMPLES))
    return GaussianRung.fit(np.asarray(store.load(row)[:, ::step]) for _, row in rows.iterrows())


def _fit_rungs(store, cfg: PretrainConfig, ratio: float, seed: int, model, gaussian,
               strategy: str) -> dict:
    """The rungs fitted for one masking distribution on training windows only:
    {"ridge", "space_time"}."""
    from .linear_rungs import SpaceTimeRung
    from .reconstruction import RidgeBaseline, predict_baselines, token_mask

    ridge, space_time = RidgeBaseline(), SpaceTimeRung(gaussian)
    n_patches = cfg.window // cfg.patch_size
    for start, x, _ in _eval_windows(store, "train", cfg, RIDGE_WINDOWS):
        noise = step_noise(seed + 104729, start, 0, len(x), store.n_parcels * n_patches, 0, 1)
        _, ids_mask = model.masking(len(x), store.n_parcels, n_patches, ratio, strategy,
                                    cfg.future_patches, noise, "cpu")
        m = token_mask(store.n_parcels, n_patches, ids_mask)
        preds = predict_baselines(x, m, gaussian=gaussian)
        ridge.partial_fit(x, m, preds)
        space_time.partial_fit(x, m, preds)
    return {"ridge": ridge.fit(), "space_time": space_time.fit()}


def fitted_rungs(fitted: dict, store, cfg: PretrainConfig, ratio: float, seed: int,
                 model, strategy: str | None = None) -> dict:
    """The rungs fitted on training data for `ratio` under `strategy`'s masks (default: the
    run's), cached in `fitted` for the whole run: the Gaussian once ("gaussian"), the ridge
    and space-time stacks once per ratio and strategy."""
    strategy = strategy or cfg.mask_strategy
    if "gaussian" not in fitted:
        fitted["gaussian"] = _fit_gaussian(store)
    if (ratio, strategy) not in fitted:
        fitted[ratio, strategy] = _fit_rungs(store, cfg, ratio, seed, model,
                                             fitted["gaussian"], strategy)
    return {"gaussian": fitted["gaussian"], **fitted[ratio, strategy]}


def fit_prior(model, store, cfg: PretrainConfig, fitted: dict) -> None:
    """Fill the model's linear prior (`model.prior`) with the ladder's space-time rung at the
    run's own mask ratio: the very rung, fitted on training windows only, that the evaluation
    then scores the model against (cached in `fitted`)."""
    rungs = fitted_rungs(fitted, store, cfg, cfg.mask_ratio, cfg.seed + EVAL_SEED_OFFSET, model)
    model.prior.load_fitted(rungs["gaussian"].mean, rungs["gaussian"].cov,
                            rungs["space_time"].weight)


def _by_subject(labels, values) -> dict:
    return {s: (float(v) if math.isfinite(v) else None) for s, v in zip(labels, values)}


@torch.no_grad()
def score_masks(model, store, cfg: PretrainConfig, device, autocast, ratio: float, seed: int,
                rungs: dict | None = None, split: str = "val", strategy: str | None = None) -> dict:
    """The model and every rung on the same deterministic windows of `split` under the same
    masks (ratio, seed, strategy: default the model's). `rungs`: fitted_rungs' dict (None:
    the fixed rungs only). Returns
    {"r2": {name: R^2}, "mse": model MSE, "windows": n, "best": best rung, "gain": the paired
    subject-bootstrap interval of the gain over the best rung (`gain_interval`),
    "by_subject" / "best_by_subject": {subject: R^2 of the model / best rung},
    "example": (x, model recon, best-rung recon, mask) of the first window}."""
    from .reconstruction import (R2Meter, gain_interval, predict_baselines, time_mask,
                                 token_mask)

    coords = torch.as_tensor(store.coords, device=device)
    p, n_patches = store.n_parcels, cfg.window // cfg.patch_size
    batches = list(_eval_windows(store, split, cfg, cfg.eval_windows))
    labels = sorted({s for _, _, subjects in batches for s in subjects})
    meter, example, n = R2Meter(p, len(labels)), None, 0
    for start, x, subjects in batches:
        groups = [labels.index(s) for s in subjects]
        noise = step_noise(seed, start, 0, len(x), p * n_patches, 0, 1)
        with autocast():
            out = model(x.to(device), coords, noise=noise.to(device), mask_ratio=ratio,
                        mask_strategy=strategy)
        recon, _ = model.reconstruct(x.to(device), out)
        m = token_mask(p, n_patches, out.ids_mask.cpu())
        mask = time_mask(m, cfg.patch_size)
        meter.add_targets(x, mask, groups)
        meter.add("model", x, recon.float().cpu(), mask, groups)
        baselines = predict_baselines(x, m, **(rungs or {}))
        for name, pred in baselines.items():
            meter.add(name, x, pred, mask, groups)
        if example is None:
            example = (x[0].numpy(), recon[0].float().cpu().numpy(), baselines, mask[0].numpy())
        n += len(x)
    r2 = {name: meter.r2(name) for name in meter.sse}
    rung_names = [k for k in r2 if k != "model"]
    best = max(rung_names, key=lambda k: r2[k] if math.isfinite(r2[k]) else -math.inf)
    x0, r0, baselines, m0 = example
    return {"r2": r2, "mse": meter.mse("model"), "windows": n, "best": best,
            "gain": gain_interval(meter, "model", rung_names, GAIN_BOOT, GAIN_SEED),
            "by_subject": _by_subject(labels, meter.r2_by_group("model")),
            "best_by_subject": _by_subject(labels, meter.r2_by_group(best)),
            "example": (x0, r0, baselines[best][0].numpy(), m0)}


def _plan_metrics(prefix: str, s: dict) -> dict:
    """The metrics of one scored plan (split x mask), named {prefix}_*."""
    r2 = s["r2"]
    out = {f"{prefix}_r2": r2["model"]}
    out.update({f"{prefix}_r2_{name}": r2[name] for name in r2 if name != "model"})
    out.update({f"{prefix}_r2_best_baseline": r2[s["best"]],
                f"{prefix}_r2_gain": r2["model"] - r2[s["best"]],
                f"{prefix}_r2_gain_low": s["gain"]["low"],
                f"{prefix}_r2_gain_high": s["gain"]["high"],
                f"{prefix}_verdict": s["gain"]["verdict"],
                f"{prefix}_best_baseline": s["best"],
                f"{prefix}_r2_by_subject": s["by_subject"],
                f"{prefix}_r2_best_baseline_by_subject": s["best_by_subject"]})
    return out


def evaluate(model, store, cfg: PretrainConfig, device, autocast, fitted: dict,
             split: str = "val") -> dict:
    """Reconstruction on deterministic validation windows, beside the ladder.

    At the run's own mask ratio (val_*) and at the common ratio every run shares
    (val_common_*, same masks for every run): the model's R^2 (per parcel over masked values,
    averaged; not clipped, so worse than the mean is negative), each rung's R^2 on the same
    windows and masks, the gain over the best rung (> 0: the model has learned more than that
    rung knows) with its paired subject-bootstrap 95 % interval (_r2_gain_low, _r2_gain_high)
    and verdict (_verdict: learned / not learned / undecided), and per-subject R^2 of the
    model and the best rung (_r2_by_subject, _r2_best_baseline_by_subject: {subject: R^2},
    for paired comparisons between runs). `fitted` caches the rungs fitted on training data
    (`fitted_rungs`) for the run. With split="test" the same numbers are named test_* and
    test_common_*: the held-out check of the finished run (the recipe was chosen on
    validation).
    """
    was_training = model.training
    model.eval()
    metrics, example = {}, None
    plans = [(split, cfg.mask_ratio, cfg.seed + EVAL_SEED_OFFSET, cfg.mask_strategy)]
    if cfg.mask_strategy != "future":  # the common yardstick: random masks, whatever trained
        plans.append((f"{split}_common", COMMON_MASK_RATIO, COMMON_MASK_SEED, "random"))
    for prefix, ratio, seed, strategy in plans:
        rungs = fitted_rungs(fitted, store, cfg, ratio, seed, model, strategy)
        s = score_masks(model, store, cfg, device, autocast, ratio, seed, rungs, split,
                        strategy)
        metrics.update(_plan_metrics(prefix, s))
        if prefix == split:
            metrics[f"{split}_mse"], metrics[f"{split}_windows"] = s["mse"], s["windows"]
            example = s["example"]
    model.train(was_training)
    return {**metrics, "example": example}


def numeric_metrics(ev: dict) -> dict:
    """The numbers of an evaluation (for history, MLflow and the stage's metrics file); the
    strings (verdicts, the best rung's name) and the per-subject dicts stay out."""
    return {k: v for k, v in ev.items() if k.startswith(("val_", "test_", "probe_", "ari_"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def encoder_yardstick(model, store, cfg: PretrainConfig) -> dict:
    """Linear probe and zero-shot network ARI of the finished encoder (`analysis.yardstick`),
    as metrics named the same in every run; a check that cannot run is skipped with the
    reason printed, never at the cost of the trained model."""
    from ..analysis.yardstick import linear_probe, network_ari

    out = {}
    was_training = model.training
    model.eval()
    try:
        if cfg.probe_target:
            try:
                pr = linear_probe(model, store, cfg.probe_target, cfg.probe_task, seed=cfg.seed)
                name = f"probe_{pr['metric']}"
                out.update({name: pr["value"], f"{name}_low": pr["low"],
                            f"{name}_high": pr["high"], f"{name}_floor": pr["floor"],
                            # one column name whatever the probe's metric (MLflow's compare)
                            "probe_score": pr["value"],
                            "probe_gain": pr["value"] - pr["floor"],
                            # paired subject-bootstrap interval of the gain over the floor
                            "probe_gain_low": pr["gain_low"], "probe_gain_high": pr["gain_high"],
                            "probe_verdict": pr["verdict"]})
            except ConfigError as exc:
                print(f"linear probe skipped: {exc}")
        if cfg.networks_truth is not None:
            from ..analysis.networks import network_labels

            try:
                ari = network_ari(model, store, network_labels(cfg.networks_truth, store),
                                  seed=cfg.seed)
                out.update({"ari_model": ari["model"], "ari_flat_input": ari["flat_input"],
                            "ari_fc": ari["fc"]})
            except ConfigError as exc:
                print(f"network identification skipped: {exc}")
    finally:
        model.train(was_training)
    return out
