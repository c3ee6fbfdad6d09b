"""Scoring a pretraining run: reconstruction R^2 of the model beside the baselines of
`reconstruction` on the same deterministic windows and masks (at the run's own mask ratio and
at one common ratio every run shares), and the frozen encoder's probe and network checks."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .config import PretrainConfig
from .reconstruction import step_noise

COMMON_MASK_RATIO = 0.75  # every run is also scored at this ratio, with the same masks
COMMON_MASK_SEED = 7919  # ... drawn from this seed, whatever the run's own seed
RIDGE_WINDOWS = 64  # training windows the ridge baseline is fitted on


def _eval_windows(store, split: str, cfg: PretrainConfig, limit: int):
    from ..data.store import WindowDataset

    ds = WindowDataset(store, split, window=cfg.window, mode="sliding", stride=cfg.window)
    n = min(len(ds), limit)
    for start in range(0, n, 16):
        yield start, torch.stack([torch.from_numpy(ds[i]["signal"])
                                  for i in range(start, min(n, start + 16))])


def _fit_ridge(store, cfg: PretrainConfig, ratio: float, seed: int, model):
    """The ridge baseline for one masking distribution, fitted on training windows only."""
    from .reconstruction import RidgeBaseline, token_mask

    ridge, n_patches = RidgeBaseline(), cfg.window // cfg.patch_size
    for start, x in _eval_windows(store, "train", cfg, RIDGE_WINDOWS):
        noise = step_noise(seed + 104729, start, 0, len(x), store.n_parcels * n_patches, 0, 1)
        _, ids_mask = model.masking(len(x), store.n_parcels, n_patches, ratio,
                                    cfg.mask_strategy, cfg.future_patches, noise, "cpu")
        ridge.partial_fit(x, token_mask(store.n_parcels, n_patches, ids_mask))
    return ridge.fit()


@torch.no_grad()
def score_masks(model, store, cfg: PretrainConfig, device, autocast, ratio: float, seed: int,
                ridge=None, split: str = "val") -> dict:
    """The model and every baseline of `reconstruction` on the same deterministic windows of
    `split` under the same masks (ratio, seed). Returns {"r2": {name: R^2}, "mse": model MSE,
    "windows": n, "example": (x, model recon, best-baseline recon, mask) of the first window}.
    """
    from .reconstruction import R2Meter, predict_baselines, time_mask, token_mask

    coords = torch.as_tensor(store.coords, device=device)
    p, n_patches = store.n_parcels, cfg.window // cfg.patch_size
    meter, example, n = R2Meter(p), None, 0
    for start, x in _eval_windows(store, split, cfg, cfg.eval_windows):
        noise = step_noise(seed, start, 0, len(x), p * n_patches, 0, 1)
        with autocast():
            out = model(x.to(device), coords, noise=noise.to(device), mask_ratio=ratio)
        recon, _ = model.reconstruct(x.to(device), out)
        m = token_mask(p, n_patches, out.ids_mask.cpu())
        mask = time_mask(m, cfg.patch_size)
        meter.add_targets(x, mask)
        meter.add("model", x, recon.float().cpu(), mask)
        baselines = predict_baselines(x, m, ridge)
        for name, pred in baselines.items():
            meter.add(name, x, pred, mask)
        if example is None:
            example = (x[0].numpy(), recon[0].float().cpu().numpy(), baselines, mask[0].numpy())
        n += len(x)
    r2 = {name: meter.r2(name) for name in meter.sse}
    best = max((k for k in r2 if k != "model"), key=lambda k: r2[k])
    x0, r0, baselines, m0 = example
    return {"r2": r2, "mse": meter.mse("model"), "windows": n, "best": best,
            "example": (x0, r0, baselines[best][0].numpy(), m0)}


def evaluate(model, store, cfg: PretrainConfig, device, autocast, ridges: dict,
             split: str = "val") -> dict:
    """Reconstruction on deterministic validation windows, beside the baselines.

    At the run's own mask ratio (val_*) and at the common ratio every run shares
    (val_common_*, same masks for every run): the model's R^2 (per parcel over masked values,
    averaged; not clipped, so worse than the mean is negative), each baseline's R^2 on the
    same windows and masks, and the gain over the best baseline (> 0: the model has learned
    more than the baseline knows). `ridges` caches the fitted ridge baselines per ratio.
    With split="test" the same numbers are named test_* and test_common_*: the held-out check
    of the finished run (the recipe was chosen on validation).
    """
    was_training = model.training
    model.eval()
    metrics, example = {}, None
    plans = [(split, cfg.mask_ratio, cfg.seed + 7919)]
    if cfg.mask_strategy == "random":
        plans.append((f"{split}_common", COMMON_MASK_RATIO, COMMON_MASK_SEED))
    for prefix, ratio, seed in plans:
        if ratio not in ridges:
            ridges[ratio] = _fit_ridge(store, cfg, ratio, seed, model)
        s = score_masks(model, store, cfg, device, autocast, ratio, seed, ridges[ratio], split)
        r2 = s["r2"]
        metrics[f"{prefix}_r2"] = r2["model"]
        if prefix == split:
            metrics[f"{split}_mse"], metrics[f"{split}_windows"] = s["mse"], s["windows"]
            example = s["example"]
        for name in (k for k in r2 if k != "model"):
            metrics[f"{prefix}_r2_{name}"] = r2[name]
        metrics[f"{prefix}_r2_best_baseline"] = r2[s["best"]]
        metrics[f"{prefix}_r2_gain"] = r2["model"] - r2[s["best"]]
        metrics[f"{prefix}_best_baseline"] = s["best"]
    model.train(was_training)
    return {**metrics, "example": example}


def numeric_metrics(ev: dict) -> dict:
    """The numbers of an evaluation (for history, MLflow and metrics.json)."""
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
                            "probe_gain": pr["value"] - pr["floor"]})
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
