"""Recording-level embeddings (CLS and mean-pooled) of a store, for probes and analysis."""

from __future__ import annotations

from pathlib import Path



def embed_store(model, store, split: str | None = None, batch_size: int = 16, device="cpu"):
    """One row per recording: its windows (sliding, stride = window) embedded without masking
    and averaged. Returns a DataFrame: recording_id, subject, split, n_windows, cls_*, mean_*."""
    import pandas as pd
    import torch

    from ..data.store import WindowDataset
    from ..model import embed_windows, window_length

    window = window_length(model)
    coords = torch.as_tensor(store.coords, device=device)
    splits = [split] if split else [s for s in ("train", "val", "test")
                                    if len(store.recordings(s))]
    rows = []
    model = model.to(device).eval()
    for name in splits:
        ds = WindowDataset(store, name, window=window, mode="sliding", stride=window)
        sums: dict[int, list] = {}
        with torch.no_grad():
            for start in range(0, len(ds), batch_size):
                items = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
                x = torch.stack([torch.from_numpy(it["signal"]) for it in items]).to(device)
                emb = embed_windows(model, x, coords)
                for j, it in enumerate(items):
                    acc = sums.setdefault(it["recording"], [0, 0.0, 0.0])
                    acc[0] += 1
                    acc[1] = acc[1] + emb["cls"][j].float().cpu().numpy()
                    acc[2] = acc[2] + emb["mean"][j].float().cpu().numpy()
        for rec, (n, cls, mean) in sorted(sums.items()):
            meta = ds.rows.iloc[rec]
            row = {"recording_id": meta["recording_id"], "subject": meta["subject"],
                   "split": name, "n_windows": n}
            row.update({f"cls_{k}": v for k, v in enumerate(cls / n)})
            row.update({f"mean_{k}": v for k, v in enumerate(mean / n)})
            rows.append(row)
    return pd.DataFrame(rows)


def load_for_store(model_path, store_path, window=None):
    """(model, store): the model must have been trained on the store's atlas; `window` is for
    released ViTMAE weights only (ours know theirs, and saying otherwise is refused)."""
    from ..data.store import BrainStore
    from ..errors import ConfigError
    from ..model import is_released, load_model, window_length

    store = BrainStore(store_path)
    model = load_model(model_path, coords=store.coords, n_time=window)
    model_hash = getattr(getattr(model, "config", None), "atlas_hash", None)
    if model_hash and model_hash != store.meta.get("atlas_hash"):
        raise ConfigError(f"{model_path} was trained on atlas {model_hash}, the store {store_path} "
                          f"uses {store.meta.get('atlas_hash')}")
    if window is not None and not is_released(model) and window != window_length(model):
        raise ConfigError(f"--window {window}: {model_path} was trained on windows of "
                          f"{window_length(model)} timepoints (--window is for released ViTMAE "
                          "weights)")
    return model, store


def export_embeddings(model_path, store_path, out_path, split: str | None = None,
                      batch_size: int = 16, window: int | None = None) -> Path:
    """Embed every recording of a store with a pretrained folder (either family) to parquet."""
    import torch

    from ..fileio import atomic_path

    model, store = load_for_store(model_path, store_path, window)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = embed_store(model, store, split, batch_size, device)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        table.to_parquet(tmp, index=False)
    return out



