"""Fine-tuning on subject variables and forecasting, on the store's subject-level splits.

- `probe`: the pretrained encoder is frozen; its embeddings of every sliding window are computed
  once and a linear head is trained on them (fast, and the honest "what did pretraining learn").
- `full`: encoder and head train together, layer-wise learning-rate decay (deeper = larger lr).
- `forecast`: observe the first T - m timepoints of a window, predict the next m of every parcel
  with a per-parcel head on the encoder's context tokens.
Early stopping watches the validation split (one loop, `early_stopping`, for every task); the
test split is only predicted, never fitted. Predictions are written per recording (windows
averaged) for `brainlm evaluate`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.windows import prepare_target, random_windows, window_batches
from ..errors import ConfigError
from ..model import is_released
from ..model.heads import (ForecastHead, Head, average_outputs, context_ids, pooled,
                           pooled_width)
from .config import FinetuneConfig
from .run_folder import check_run_folder, save_weights, sources, write_run

__all__ = ["FinetuneConfig", "ForecastHead", "Head", "early_stopping", "embed", "finetune",
           "layer_groups"]  # the heads live in brainlm.model.heads; named here as before

# ---------------------------------------------------------------------------- model pieces


def embed(model, x: torch.Tensor, coords: torch.Tensor, pooling: str) -> torch.Tensor:
    return pooled(model, x, coords, pooling)


def layer_groups(model, head: nn.Module, lr: float, decay: float, weight_decay: float):
    """Parameter groups with lr * decay^(depth - layer): embeddings lowest, head highest.
    Layers are found by name (`blocks.N` ours, `layer(s).N` ViTMAE); decoders are left out."""
    pattern = re.compile(r"(?:blocks|layers?)\.(\d+)\.")
    named = [(n, p) for n, p in model.named_parameters() if "decoder" not in n]
    depth = 1 + max((int(m.group(1)) for n, _ in named if (m := pattern.search(n))), default=0)
    groups: dict = {}
    for name, p in named:
        m = pattern.search(name)
        layer = int(m.group(1)) + 1 if m else (0 if "embed" in name or "token" in name
                                               else depth + 1)
        scale = decay ** (depth + 1 - layer)
        wd = 0.0 if p.ndim < 2 else weight_decay
        groups.setdefault((scale, wd), []).append(p)
    out = [{"params": ps, "lr": lr * s, "weight_decay": wd} for (s, wd), ps in groups.items()]
    out.append({"params": list(head.parameters()), "lr": lr, "weight_decay": weight_decay})
    return out


# ---------------------------------------------------------------------------- early stopping


class Diverged(ConfigError):
    """The validation loss became NaN or infinite (a search records such a trial as failed)."""


def check_inputs(cfg: FinetuneConfig) -> None:
    """What every run of `cfg` (every trial of a search) would find wrong with the store, the
    encoder and the target, found once before any training."""
    import warnings

    cfg.validate()
    run = _open(cfg, np.random.default_rng(cfg.seed))
    if cfg.task != "forecast":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real runs say it
            _subject_targets(cfg, dict(run.splits))


def early_stopping(epochs: int, patience: int, train_epoch, val_loss, modules,
                   on_epoch=None) -> tuple[float, list[dict]]:
    """Run `train_epoch()` then `val_loss()` up to `epochs` times; stop after `patience`
    epochs without an improvement of more than 1e-6, and leave `modules` in the state of the
    best epoch. `on_epoch(epoch, val_loss)` is called after every epoch, before the stopping
    decision (hyper-parameter search prunes through it by raising).
    Returns (best validation loss, [{"epoch", "val_loss"}, ...])."""
    history, best, best_state, bad_epochs = [], None, None, 0
    for epoch in range(epochs):
        train_epoch()
        loss = val_loss()
        history.append({"epoch": epoch + 1, "val_loss": loss})
        if not math.isfinite(loss):  # NaN never compares: it would be "best" or pass unsaid
            raise Diverged(f"the validation loss became {loss} at epoch {epoch + 1}: lower "
                              "--lr, or look for huge or missing values in the data and target")
        if on_epoch is not None:
            on_epoch(epoch + 1, loss)
        if best is None or loss < best - 1e-6:
            best, bad_epochs = loss, 0
            best_state = [{k: v.detach().clone() for k, v in m.state_dict().items()}
                          for m in modules]
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                break
    for module, state in zip(modules, best_state):
        module.load_state_dict(state)
    return best, history


# ---------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What every task trains on: the loaded encoder, the store and its three splits."""

    cfg: FinetuneConfig
    model: nn.Module
    store: object
    splits: dict
    window: int
    coords: torch.Tensor
    device: torch.device
    rng: np.random.Generator


def finetune(cfg: FinetuneConfig, on_epoch=None) -> dict:
    """Fine-tune and write predictions; `on_epoch(epoch, val_loss)` is called after every
    epoch (hyper-parameter search prunes through it by raising)."""
    cfg.validate()
    check_run_folder(cfg.out)
    torch.manual_seed(cfg.seed)
    run = _open(cfg, np.random.default_rng(cfg.seed))
    if cfg.task == "forecast":
        return _finetune_forecast(run, on_epoch)
    return _finetune_subjects(run, on_epoch)


def _open(cfg: FinetuneConfig, rng) -> _Run:
    """Load the store and the encoder and check they fit each other and the splits."""
    from ..data.store import BrainStore
    from ..model import load_model, window_length

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    store = BrainStore(cfg.data)
    model = load_model(cfg.model, coords=store.coords, n_time=cfg.window).to(device)
    model_hash = getattr(getattr(model, "config", None), "atlas_hash", None)
    if model_hash and model_hash != store.meta.get("atlas_hash"):
        raise ConfigError(f"{cfg.model} was pretrained on atlas {model_hash}; the store uses "
                          f"{store.meta.get('atlas_hash')}")
    window = window_length(model)
    if cfg.window is not None and not is_released(model) and cfg.window != window:
        raise ConfigError(f"--window {cfg.window}: {cfg.model} was pretrained on windows of "
                          f"{window} timepoints (--window is for released ViTMAE weights)")
    coords = torch.as_tensor(store.coords, device=device)
    splits = {s: store.recordings(s) for s in ("train", "val", "test")}
    for name, rows in splits.items():
        if not len(rows):
            raise ConfigError(f"{cfg.data}: the {name} split is empty; fine-tuning needs train, "
                              "val (early stopping) and test (evaluation) subjects")
        short = rows[rows["n_timepoints"] < window]
        if len(short):
            raise ConfigError(f"{cfg.data}: {len(short)} {name} recordings are shorter than the "
                              f"model's window of {window} (e.g. {short.iloc[0]['recording_id']})")
    return _Run(cfg, model, store, splits, window, coords, device, rng)


def _subject_targets(cfg: FinetuneConfig, splits: dict):
    """Drop unlabelled recordings from `splits` (in place) and encode the target:
    -> (targets per split, classes or None, mean, sd); regression targets are standardized."""
    for s in splits:
        before = len(splits[s])
        splits[s], _, _ = prepare_target(splits[s], cfg.target, cfg.task, str(cfg.data))
        if len(splits[s]) < before:  # said, never dropped unsaid
            import warnings

            warnings.warn(f"{cfg.data}: {before - len(splits[s])} of {before} {s} recordings "
                          f"have no '{cfg.target}' and are left out", stacklevel=2)
    empty = [s for s in ("train", "val", "test") if len(splits[s]) == 0]
    if empty:
        raise ConfigError(f"{cfg.data}: target '{cfg.target}' needs labelled recordings in "
                          f"train, val and test; none in {', '.join(empty)}")
    y = {s: splits[s][cfg.target].to_numpy() for s in splits}
    if cfg.task != "classification":
        yt = y["train"].astype(np.float64)
        mu, sd = float(yt.mean()), float(yt.std() or 1.0)
        return {s: (y[s].astype(np.float64) - mu) / sd for s in y}, None, mu, sd
    classes = sorted(set(map(str, y["train"])))
    if len(classes) < 2:
        raise ConfigError(f"target '{cfg.target}' has one class in training: {classes}")
    unseen = sorted(set(map(str, np.concatenate([y["val"], y["test"]]))) - set(classes))
    if unseen:
        raise ConfigError(f"target '{cfg.target}' has classes not seen in training: {unseen}")
    index = {c: i for i, c in enumerate(classes)}
    return {s: np.array([index[str(v)] for v in y[s]]) for s in y}, classes, 0.0, 1.0


def _finetune_subjects(run: _Run, on_epoch=None) -> dict:
    """Regression or classification of a subject variable (probe or full)."""
    cfg, model, device = run.cfg, run.model, run.device
    targets, classes, mu, sd = _subject_targets(cfg, run.splits)
    width = pooled_width(model, cfg.pooling, run.store.n_parcels)
    head = Head(width, len(classes) if classes else 1, cfg.head_dropout).to(device)
    loss_fn = nn.CrossEntropyLoss() if classes else nn.MSELoss()

    def head_loss(out, t):
        t = torch.as_tensor(t, device=device)
        return loss_fn(out, t.long()) if classes else loss_fn(out[:, 0], t.float())

    feats = {}
    if cfg.mode == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
        feats = {s: _window_features(run, rows) for s, rows in run.splits.items()}
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(layer_groups(model, head, cfg.lr, cfg.layer_decay,
                                             cfg.weight_decay))

    def train_epoch():
        head.train()
        model.train(cfg.mode == "full")
        step = _probe_epoch if cfg.mode == "probe" else _full_epoch
        step(run, head, opt, lambda out, owner: head_loss(out, targets["train"][owner]),
             feats.get("train"))

    def val_loss():
        val = _predict(run, head, run.splits["val"], feats.get("val"), classes)
        return _val_loss(val, targets["val"], classes)

    if cfg.pooling == "connectivity":  # the FC baseline's head, in closed form
        best, history = _closed_form(run, head, feats["train"], targets["train"], classes,
                                     val_loss)
    else:
        best, history = early_stopping(cfg.epochs, cfg.patience, train_epoch, val_loss,
                                       [head, model] if cfg.mode == "full" else [head], on_epoch)
    preds = {s: _predict(run, head, run.splits[s], feats.get(s), classes)
             for s in ("val", "test")}
    meta = {"config": _config_json(cfg),
            "classes": classes, "target_mean": mu, "target_std": sd, "window": run.window,
            "patch_size": None if is_released(model) else int(model.config.patch_size),
            "best_val_loss": best, "epochs_run": len(history), "history": history,
            "store": str(Path(cfg.data).resolve()), "model": str(Path(cfg.model).resolve()),
            **sources(cfg)}
    _write_outputs(cfg, model, head, run.splits, preds, classes, mu, sd, meta)
    return meta


def _closed_form(run: _Run, head, feats, targets, classes, val_loss):
    """Fit the head on the training recordings' window-averaged features (inner CV over
    subjects picks the penalty); one "epoch", its validation loss recorded."""
    from .closed_form import fit_head

    f, owner = feats
    n = len(run.splits["train"])
    sums = np.zeros((n, f.shape[1]))
    np.add.at(sums, owner, f.double().numpy())
    x = sums / np.maximum(np.bincount(owner, minlength=n), 1)[:, None]
    penalty = fit_head(head, x, np.asarray(targets), run.splits["train"]["subject"].to_numpy(),
                       "classification" if classes else "regression",
                       len(classes) if classes else 1, run.cfg.seed)
    loss = val_loss()
    return loss, [{"epoch": 1, "val_loss": loss, **penalty}]


def _probe_epoch(run: _Run, head, opt, loss_of, feats) -> None:
    """One pass over the frozen encoder's training-window embeddings, shuffled."""
    f, owner = feats
    order = run.rng.permutation(len(f))
    for start in range(0, len(order), run.cfg.batch_size):
        idx = order[start:start + run.cfg.batch_size]
        loss = loss_of(head(f[idx].to(run.device)), owner[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _full_epoch(run: _Run, head, opt, loss_of, feats=None) -> None:
    """One pass over random training windows through encoder and head (gradients clipped)."""
    cfg, model = run.cfg, run.model
    for x, owner in random_windows(run.store, run.splits["train"], run.window,
                                   cfg.windows_per_recording, cfg.batch_size, run.rng):
        h = embed(model, x.to(run.device), run.coords, cfg.pooling)
        loss = loss_of(head(h), owner)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()


def _window_features(run: _Run, rows):
    """Embeddings of every sliding window of `rows`: (features [n, H] on CPU, rec_index)."""
    feats, owners = [], []
    run.model.eval()
    with torch.no_grad():
        for x, owner in window_batches(run.store, rows, run.window, run.window,
                                       run.cfg.batch_size):
            feats.append(embed(run.model, x.to(run.device), run.coords,
                               run.cfg.pooling).float().cpu())
            owners.append(owner)
    if not feats:
        return torch.zeros(0, 1), np.zeros(0, int)
    return torch.cat(feats), np.concatenate(owners)


def _predict(run: _Run, head, rows, feats, classes):
    """Per-recording outputs: windows averaged (class probabilities or standardized values)."""
    model, cfg = run.model, run.cfg
    head.eval()
    model.eval()
    with torch.no_grad():
        if feats is not None:
            f, owner = feats
            batches = [(head(f.to(run.device)), owner)] if len(f) else []
        else:
            batches = ((head(embed(model, x.to(run.device), run.coords, cfg.pooling)), owner)
                       for x, owner in window_batches(run.store, rows, run.window, run.window,
                                                      cfg.batch_size))
        return average_outputs(batches, len(rows), len(classes) if classes else 1, classes)


def _val_loss(pred, target, classes) -> float:
    if classes:
        p = np.clip(pred[np.arange(len(target)), target], 1e-7, 1)
        return float(-np.log(p).mean())
    return float(((pred[:, 0] - target) ** 2).mean())


# ---------------------------------------------------------------------------- outputs


def _config_json(cfg: FinetuneConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def _write_outputs(cfg, model, head, splits, preds, classes, mu, sd, meta):
    import pandas as pd

    rows = []
    for split in ("val", "test"):
        r = splits[split]
        p = preds[split]
        for i in range(len(r)):
            row = {"recording_id": r.at[i, "recording_id"], "subject": r.at[i, "subject"],
                   "split": split, "y_true": r.at[i, cfg.target]}
            if classes:
                row.update({f"proba_{c}": float(p[i, k]) for k, c in enumerate(classes)})
                row["y_pred"] = classes[int(p[i].argmax())]
            else:
                row["y_pred"] = float(p[i, 0] * sd + mu)
            rows.append(row)

    def write(folder: Path) -> None:
        save_weights(folder, head, model, cfg.mode == "full", cfg.data, pooling=cfg.pooling,
                     classes=classes, target_mean=mu, target_std=sd)
        pd.DataFrame(rows).to_parquet(folder / "predictions.parquet", index=False)
        (folder / "finetune.json").write_text(json.dumps(meta, indent=2, default=str))

    write_run(Path(cfg.out), write)


# ---------------------------------------------------------------------------- forecasting


def _forecast_setup(run: _Run):
    """The forecasting head and the prediction from a window's context tokens:
    -> (head, predict(x [B, P, window]) -> [B, P, horizon])."""
    cfg, model = run.cfg, run.model
    if is_released(model):
        raise ConfigError("the forecasting head needs a BrainLM (Family A) model; released "
                          "ViTMAE weights can forecast through their decoder instead")
    ps = model.config.patch_size
    if cfg.horizon % ps or not ps <= cfg.horizon < run.window:
        raise ConfigError(f"horizon {cfg.horizon} must be a multiple of the patch size {ps} and "
                          f"shorter than the window {run.window}")
    head = ForecastHead(model.config.hidden_size, cfg.horizon).to(run.device)
    n_parcels = run.store.n_parcels
    ids_ctx = context_ids(n_parcels, run.window, ps, cfg.horizon).to(run.device)

    def predict(x):
        hidden = model.encode(x, run.coords, ids_ctx.expand(x.shape[0], -1))
        return head(hidden[:, 1:], n_parcels)

    return head, predict


def _forecast_windows(run: _Run, head, predict, rows):
    """Every window of `rows`: (true futures, predictions [n, P, horizon], subjects), or
    (None, None, None) when there is none."""
    ys, ps, owners = [], [], []
    run.model.eval()
    head.eval()
    with torch.no_grad():
        for x, owner in window_batches(run.store, rows, run.window, run.window,
                                       run.cfg.batch_size):
            x = x.to(run.device)
            ps.append(predict(x).float().cpu().numpy())
            ys.append(x[:, :, -run.cfg.horizon:].cpu().numpy())
            owners.append(rows["subject"].to_numpy()[owner].astype(str))
    if not ys:
        return None, None, None
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(owners)


def _finetune_forecast(run: _Run, on_epoch=None) -> dict:
    """Observe window - horizon timepoints, predict the last `horizon` of every parcel."""
    cfg, model = run.cfg, run.model
    head, predict = _forecast_setup(run)
    params = layer_groups(model, head, cfg.lr, cfg.layer_decay, cfg.weight_decay) \
        if cfg.mode == "full" else [{"params": head.parameters(), "lr": cfg.lr}]
    if cfg.mode == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)

    def train_epoch():
        model.train(cfg.mode == "full")
        head.train()
        for x, _ in random_windows(run.store, run.splits["train"], run.window,
                                   cfg.windows_per_recording, cfg.batch_size, run.rng):
            x = x.to(run.device)
            loss = ((predict(x) - x[:, :, -cfg.horizon:]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def val_loss():
        y, p, _ = _forecast_windows(run, head, predict, run.splits["val"])
        return float(((p - y) ** 2).mean())

    best, history = early_stopping(cfg.epochs, cfg.patience, train_epoch, val_loss,
                                   [head, model], on_epoch)
    meta = {"config": _config_json(cfg),
            "window": run.window, "horizon": cfg.horizon, "best_val_loss": best,
            "epochs_run": len(history), "history": history,
            "store": str(Path(cfg.data).resolve()), "model": str(Path(cfg.model).resolve()),
            **sources(cfg)}
    _write_forecast(run, head, predict, meta)
    return meta


def _write_forecast(run: _Run, head, predict, meta: dict) -> None:
    """forecast.npz (val/test windows: true, predicted, subject), the weights, finetune.json."""
    arrays = {}
    for split in ("val", "test"):
        y, p, subjects = _forecast_windows(run, head, predict, run.splits[split])
        if y is not None:  # [windows, P, horizon] and each window's subject (for bootstrap)
            arrays[f"{split}_true"], arrays[f"{split}_pred"] = y, p
            arrays[f"{split}_subject"] = subjects

    def write(folder: Path) -> None:
        np.savez(folder / "forecast.npz", **arrays)
        save_weights(folder, head, run.model, run.cfg.mode == "full", run.cfg.data,
                     horizon=run.cfg.horizon)
        (folder / "finetune.json").write_text(json.dumps(meta, indent=2, default=str))

    write_run(Path(run.cfg.out), write)
