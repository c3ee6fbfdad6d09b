"""Fine-tuning on subject variables and forecasting, on the store's subject-level splits.

- `probe`: the pretrained encoder is frozen; its embeddings of every sliding window are computed
  once and a linear head is trained on them (fast, and the honest "what did pretraining learn").
- `full`: encoder and head train together, layer-wise learning-rate decay (deeper = larger lr).
- `forecast`: observe the first T - m timepoints of a window, predict the next m of every parcel
  with a per-parcel head on the encoder's context tokens.
Early stopping watches the validation split; the test split is only predicted, never fitted.
Predictions are written per recording (windows averaged) for `brainlm evaluate`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..model import embed_windows, is_released
from .config import FinetuneConfig

# ---------------------------------------------------------------------------- targets


def prepare_target(rows, target: str, task: str, where: str):
    """Values of `target` per recording (NaN rows dropped) -> (rows, y, classes)."""
    import pandas as pd

    if target not in rows.columns:
        raise ConfigError(f"{where}: no column '{target}' in the manifest (phenotypes come from "
                          f"participants.tsv); have: {', '.join(map(str, rows.columns))}")
    rows = rows[rows[target].notna()].reset_index(drop=True)
    if task == "regression":
        y = pd.to_numeric(rows[target], errors="coerce")
        if y.isna().any():
            raise ConfigError(f"{where}: target '{target}' is not numeric (e.g. "
                              f"{rows[target][y.isna()].iloc[0]!r}); use --task classification")
        return rows, y.to_numpy(np.float64), None
    return rows, rows[target].astype(str).to_numpy(), None


# ---------------------------------------------------------------------------- model pieces


class Head(nn.Module):
    def __init__(self, width: int, out: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(width, out)

    def forward(self, h):
        return self.linear(self.drop(h))


class ForecastHead(nn.Module):
    """Per-parcel future from that parcel's context tokens: [B, P, 2H] -> [B, P, horizon]."""

    def __init__(self, width: int, horizon: int):
        super().__init__()
        self.linear = nn.Linear(2 * width, horizon)

    def forward(self, tokens: torch.Tensor, n_parcels: int) -> torch.Tensor:
        """tokens: [B, P * n_ctx, H] (parcel-major) -> [B, P, horizon]."""
        b, length, h = tokens.shape
        per = tokens.view(b, n_parcels, length // n_parcels, h)
        return self.linear(torch.cat([per.mean(2), per[:, :, -1]], dim=-1))


def embed(model, x: torch.Tensor, coords: torch.Tensor, pooling: str) -> torch.Tensor:
    return embed_windows(model, x, coords)[pooling]


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


# ---------------------------------------------------------------------------- data


def window_batches(store, rows, window: int, stride: int, batch_size: int):
    """Sliding windows of the given recordings: yields (x [b, P, window] float32, rec_index)."""
    batch, owners = [], []
    for i, (_, row) in enumerate(rows.iterrows()):
        x = store.load(row)
        starts = list(range(0, x.shape[1] - window + 1, stride))
        if starts[-1] != x.shape[1] - window:
            starts.append(x.shape[1] - window)
        for s in starts:
            batch.append(np.asarray(x[:, s:s + window], dtype=np.float32))
            owners.append(i)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch)), np.array(owners)
                batch, owners = [], []
    if batch:
        yield torch.from_numpy(np.stack(batch)), np.array(owners)


# ---------------------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig, on_epoch=None) -> dict:
    """Fine-tune and write predictions; `on_epoch(epoch, val_loss)` is called after every
    epoch (hyper-parameter search prunes through it by raising)."""
    from ..data.store import BrainStore
    from ..model import load_model, window_length

    cfg.validate()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
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
    if cfg.task == "forecast":
        return _finetune_forecast(cfg, model, store, splits, window, coords, device, rng,
                                  on_epoch)
    for s in splits:
        splits[s], _, _ = prepare_target(splits[s], cfg.target, cfg.task, str(cfg.data))
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise ConfigError(f"{cfg.data}: target '{cfg.target}' needs labelled recordings in "
                          "train and val")
    y = {s: splits[s][cfg.target].to_numpy() for s in splits}
    if cfg.task == "classification":
        classes = sorted(set(map(str, y["train"])))
        if len(classes) < 2:
            raise ConfigError(f"target '{cfg.target}' has one class in training: {classes}")
        unseen = sorted(set(map(str, np.concatenate([y["val"], y["test"]]))) - set(classes))
        if unseen:
            raise ConfigError(f"target '{cfg.target}' has classes not seen in training: {unseen}")
        index = {c: i for i, c in enumerate(classes)}
        targets = {s: np.array([index[str(v)] for v in y[s]]) for s in y}
        n_out, mu, sd = len(classes), 0.0, 1.0
    else:
        classes = None
        yt = y["train"].astype(np.float64)
        mu, sd = float(yt.mean()), float(yt.std() or 1.0)
        targets = {s: (y[s].astype(np.float64) - mu) / sd for s in y}
        n_out = 1
    width = model.hidden_size if is_released(model) else model.config.hidden_size
    head = Head(width, n_out, cfg.head_dropout).to(device)
    loss_fn = nn.CrossEntropyLoss() if classes else nn.MSELoss()

    def head_loss(out, t):
        t = torch.as_tensor(t, device=device)
        return loss_fn(out, t.long()) if classes else loss_fn(out[:, 0], t.float())

    stride = window
    if cfg.mode == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
        feats = {s: _window_features(model, store, splits[s], window, stride, coords,
                                     cfg.pooling, cfg.batch_size, device) for s in splits}
        params = head.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(layer_groups(model, head, cfg.lr, cfg.layer_decay,
                                             cfg.weight_decay))
    history, best, best_state, bad_epochs = [], None, None, 0
    for epoch in range(cfg.epochs):
        head.train()
        model.train(cfg.mode == "full")
        if cfg.mode == "probe":
            f, owner = feats["train"]
            order = rng.permutation(len(f))
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                loss = head_loss(head(f[idx].to(device)), targets["train"][owner[idx]])
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            for x, owner in _random_windows(store, splits["train"], window,
                                            cfg.windows_per_recording, cfg.batch_size, rng):
                h = embed(model, x.to(device), coords, cfg.pooling)
                loss = head_loss(head(h), targets["train"][owner])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()),
                                               1.0)
                opt.step()
        val = _predict(model, head, store, splits["val"], window, stride, coords, cfg,
                       device, feats.get("val") if cfg.mode == "probe" else None, classes)
        val_loss = _val_loss(val, targets["val"], classes)
        history.append({"epoch": epoch + 1, "val_loss": val_loss})
        if on_epoch is not None:
            on_epoch(epoch + 1, val_loss)
        if best is None or val_loss < best - 1e-6:
            best, bad_epochs = val_loss, 0
            best_state = ({k: v.detach().clone() for k, v in head.state_dict().items()},
                          {k: v.detach().clone() for k, v in model.state_dict().items()}
                          if cfg.mode == "full" else None)
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    head.load_state_dict(best_state[0])
    if best_state[1] is not None:
        model.load_state_dict(best_state[1])
    preds = {s: _predict(model, head, store, splits[s], window, stride, coords, cfg, device,
                         feats.get(s) if cfg.mode == "probe" else None, classes)
             for s in ("val", "test")}
    meta = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "classes": classes, "target_mean": mu, "target_std": sd, "window": window,
            "patch_size": None if is_released(model) else int(model.config.patch_size),
            "best_val_loss": best, "epochs_run": len(history), "history": history,
            "store": str(Path(cfg.data).resolve()), "model": str(Path(cfg.model).resolve())}
    _write_outputs(cfg, model, head, splits, preds, classes, mu, sd, meta)
    return meta


def _window_features(model, store, rows, window, stride, coords, pooling, batch_size, device):
    feats, owners = [], []
    model.eval()
    with torch.no_grad():
        for x, owner in window_batches(store, rows, window, stride, batch_size):
            feats.append(embed(model, x.to(device), coords, pooling).float().cpu())
            owners.append(owner)
    if not feats:
        return torch.zeros(0, 1), np.zeros(0, int)
    return torch.cat(feats), np.concatenate(owners)


def _random_windows(store, rows, window, per_recording, batch_size, rng):
    items = [(i, None) for i in range(len(rows)) for _ in range(per_recording)]
    order = rng.permutation(len(items))
    for start in range(0, len(order), batch_size):
        xs, owners = [], []
        for k in order[start:start + batch_size]:
            i = items[k][0]
            x = store.load(rows.iloc[i])
            s = int(rng.integers(0, x.shape[1] - window + 1))
            xs.append(np.asarray(x[:, s:s + window], dtype=np.float32))
            owners.append(i)
        yield torch.from_numpy(np.stack(xs)), np.array(owners)


def _predict(model, head, store, rows, window, stride, coords, cfg, device, feats, classes):
    """Per-recording outputs: windows averaged (class probabilities or standardized values)."""
    head.eval()
    model.eval()
    n_out = len(classes) if classes else 1
    sums = np.zeros((len(rows), n_out))
    counts = np.zeros(len(rows))
    with torch.no_grad():
        if feats is not None:
            f, owner = feats
            batches = [(head(f.to(device)), owner)] if len(f) else []
        else:
            batches = ((head(embed(model, x.to(device), coords, cfg.pooling)), owner)
                       for x, owner in window_batches(store, rows, window, stride,
                                                      cfg.batch_size))
        for out, owner in batches:
            out = out.float().softmax(-1) if classes else out.float()
            np.add.at(sums, owner, out.cpu().numpy())
            np.add.at(counts, owner, 1)
    return sums / np.maximum(counts, 1)[:, None]


def _val_loss(pred, target, classes) -> float:
    if classes:
        p = np.clip(pred[np.arange(len(target)), target], 1e-7, 1)
        return float(-np.log(p).mean())
    return float(((pred[:, 0] - target) ** 2).mean())


def _write_outputs(cfg, model, head, splits, preds, classes, mu, sd, meta):
    import pandas as pd
    from safetensors.torch import save_file

    from ..fileio import atomic_path, write_bytes_atomic

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    if cfg.mode == "full":
        state.update({f"encoder.{k}": v.contiguous() for k, v in model.state_dict().items()})
    with atomic_path(out / "finetuned.safetensors") as tmp:
        save_file(state, str(tmp))
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
    with atomic_path(out / "predictions.parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    write_bytes_atomic(out / "finetune.json", json.dumps(meta, indent=2, default=str).encode())


def _finetune_forecast(cfg, model, store, splits, window, coords, device, rng,
                       on_epoch=None) -> dict:
    """Observe window - horizon timepoints, predict the last `horizon` of every parcel."""
    if is_released(model):
        raise ConfigError("the forecasting head needs a BrainLM (Family A) model; released "
                          "ViTMAE weights can forecast through their decoder instead")
    ps = model.config.patch_size
    if cfg.horizon % ps or not ps <= cfg.horizon < window:
        raise ConfigError(f"horizon {cfg.horizon} must be a multiple of the patch size {ps} and "
                          f"shorter than the window {window}")
    k = cfg.horizon // ps
    n_ctx = window // ps - k
    head = ForecastHead(model.config.hidden_size, cfg.horizon).to(device)
    n_parcels = store.n_parcels
    ids_ctx = (torch.arange(n_parcels)[:, None] * (window // ps)
               + torch.arange(n_ctx)[None]).reshape(1, -1).to(device)

    def predict(x):
        hidden = model.encode(x, coords, ids_ctx.expand(x.shape[0], -1))
        return head(hidden[:, 1:], n_parcels)

    params = layer_groups(model, head, cfg.lr, cfg.layer_decay, cfg.weight_decay) \
        if cfg.mode == "full" else [{"params": head.parameters(), "lr": cfg.lr}]
    if cfg.mode == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)

    def evaluate(rows):
        ys, ps_, owners = [], [], []
        model.eval()
        head.eval()
        with torch.no_grad():
            for x, owner in window_batches(store, rows, window, window, cfg.batch_size):
                x = x.to(device)
                ps_.append(predict(x).float().cpu().numpy())
                ys.append(x[:, :, -cfg.horizon:].cpu().numpy())
                owners.append(rows["subject"].to_numpy()[owner].astype(str))
        if not ys:
            return None, None, None
        return np.concatenate(ys), np.concatenate(ps_), np.concatenate(owners)

    history, best, best_state, bad = [], None, None, 0
    for epoch in range(cfg.epochs):
        model.train(cfg.mode == "full")
        head.train()
        for x, _ in _random_windows(store, splits["train"], window, cfg.windows_per_recording,
                                    cfg.batch_size, rng):
            x = x.to(device)
            loss = ((predict(x) - x[:, :, -cfg.horizon:]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        y, p, _ = evaluate(splits["val"])
        val_loss = float(((p - y) ** 2).mean())
        history.append({"epoch": epoch + 1, "val_loss": val_loss})
        if on_epoch is not None:
            on_epoch(epoch + 1, val_loss)
        if best is None or val_loss < best - 1e-6:
            best, bad = val_loss, 0
            best_state = ({k2: v.clone() for k2, v in head.state_dict().items()},
                          {k2: v.clone() for k2, v in model.state_dict().items()})
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    head.load_state_dict(best_state[0])
    model.load_state_dict(best_state[1])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    from ..fileio import atomic_path, write_bytes_atomic

    arrays = {}
    for split in ("val", "test"):
        y, p, subjects = evaluate(splits[split])
        if y is not None:  # [windows, P, horizon] and each window's subject (for bootstrap)
            arrays[f"{split}_true"], arrays[f"{split}_pred"] = y, p
            arrays[f"{split}_subject"] = subjects
    with atomic_path(out / "forecast.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    state = {f"head.{k2}": v.contiguous() for k2, v in head.state_dict().items()}
    if cfg.mode == "full":
        state.update({f"encoder.{k2}": v.contiguous() for k2, v in model.state_dict().items()})
    with atomic_path(out / "finetuned.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {"config": {k2: str(v) if isinstance(v, Path) else v for k2, v in asdict(cfg).items()},
            "window": window, "horizon": cfg.horizon, "best_val_loss": best,
            "epochs_run": len(history), "history": history,
            "store": str(Path(cfg.data).resolve()), "model": str(Path(cfg.model).resolve())}
    write_bytes_atomic(out / "finetune.json", json.dumps(meta, indent=2, default=str).encode())
    return meta
