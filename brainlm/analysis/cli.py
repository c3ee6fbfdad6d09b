"""What `brainlm analyze` and `brainlm perturb` do with a model folder and a store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError


def _load(model_path, store_path, window=None, out=None):
    """The model and store, once `out` (when given) passed the one rule for outputs."""
    from ..fileio import check_output
    from .embeddings import load_for_store

    if out is not None:
        check_output(out, inputs=[model_path, store_path])
    return load_for_store(model_path, store_path, window)


def analyze(args) -> str:
    """Networks from representations vs raw FC, and one recording reconstructed."""
    import torch

    from ..data.store import WindowDataset
    from ..fileio import write_bytes_atomic
    from ..model import window_length
    from .networks import identify_networks, network_labels
    from .reconstruction import plot_reconstruction, reconstruct_recording

    model, store = _load(args.model, args.data, args.window, args.out)
    if args.networks > store.n_parcels:
        raise ConfigError(f"--networks {args.networks}: more networks than the store's "
                          f"{store.n_parcels} parcels")
    window = window_length(model)
    ds = WindowDataset(store, args.split, window=window, mode="sliding", stride=window)
    truth = network_labels(args.truth, store)  # checked before any model work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = min(len(ds), args.max_windows)
    windows = np.stack([ds[i]["signal"] for i in range(n)])
    coords = torch.as_tensor(store.coords)
    nets = identify_networks(model, windows, coords, k=args.networks, truth=truth, seed=args.seed)
    row = store.recordings(args.split).iloc[0]
    rec = reconstruct_recording(model, np.asarray(store.load(row)), coords, seed=args.seed)
    names = store.parcels["name"].tolist()
    plot_reconstruction(np.asarray(store.load(row)), rec.recon, out / "reconstruction.png",
                        names=names)
    summary = {"networks": {"k": nets["k"], "n_windows": nets["n_windows"],
                            "ari_model": nets["model"]["ari"], "ari_fc": nets["fc"]["ari"],
                            "ari_position_only": nets["position_only"]["ari"],
                            "labels_model": nets["model"]["labels"].tolist(),
                            "labels_fc": nets["fc"]["labels"].tolist()},
               "reconstruction": {"recording_id": row["recording_id"],
                                  "r2_mean": float(np.nanmean(rec.r2))}}
    write_bytes_atomic(out / "analysis.json", json.dumps(summary, indent=2).encode())
    ari = ("" if truth is None else f", ARI model {nets['model']['ari']:.3f} (flat-input control "
           f"{nets['position_only']['ari']:.3f}) vs raw FC {nets['fc']['ari']:.3f}")
    return (f"brainlm analyze: {nets['k']} networks from {n} windows{ari}; "
            f"{row['recording_id']} reconstructed with rotating masks, mean R^2 "
            f"{summary['reconstruction']['r2_mean']:.3f} -> {out}")


def perturb(args) -> str:
    import torch

    from .perturbation import effect_summary, perturb_recording, save_effect

    model, store = _load(args.model, args.data, args.window, args.out)
    rows = store.recordings()
    match = rows[rows["recording_id"] == args.recording]
    if match.empty:
        raise ConfigError(f"{args.data}: no kept recording '{args.recording}' (e.g. "
                          f"{', '.join(rows['recording_id'].head(3))})")
    x = np.asarray(store.load(match.iloc[0]))
    labels = [str(v) for v in store.parcels["label"]]
    names = store.parcels["name"].astype(str).tolist()
    parcels = []
    for item in (p.strip() for p in args.parcels.split(",") if p.strip()):
        if item in labels:
            parcels.append(labels.index(item))
        elif item in names:
            parcels.append(names.index(item))
        else:
            raise ConfigError(f"parcel '{item}' is neither an atlas label nor a parcel name")
    stop = x.shape[1] if args.stop is None else args.stop
    result = perturb_recording(model, x, torch.as_tensor(store.coords), parcels, args.mode,
                               args.value, args.start, stop, seed=args.seed)
    out = save_effect(result["effect"], args.out, parcels, names=names,
                      time_range=(args.start, stop))
    summary = effect_summary(result["effect"], parcels, time_range=(args.start, stop))
    return (f"brainlm perturb: {args.mode} {args.value:g} on {len(parcels)} parcels over "
            f"[{args.start}, {stop}); mean |effect| elsewhere {summary['others']:.4f} -> {out}")
