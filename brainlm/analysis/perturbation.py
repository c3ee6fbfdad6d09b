"""In-silico perturbation: change some parcels' signal and read the model's predicted response.

Why: the reconstruction of a masked autoencoder is a prediction of every value from its
context, so feeding an edited recording (some parcels scaled, shifted or clamped for a time
range) and reconstructing it with the SAME rotating masks as the original gives, as the
difference, the change the model expects elsewhere. Because every value is predicted while
masked, no value echoes its own edit: the effect map is what the model infers from the edit.

Arrays are [parcels, time]. Works with either model family (it only needs reconstruction).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_path, save_figure
from .reconstruction import reconstruct_recording

__all__ = ["MODES", "apply_perturbation", "perturb_recording", "effect_summary", "save_effect"]

MODES = ("scale", "shift", "clamp")


def _check_parcels(parcels, n_parcels: int) -> list[int]:
    try:
        out = [int(p) for p in np.atleast_1d(parcels)]
    except (TypeError, ValueError):
        raise ConfigError(f"parcels must be integer indices, got {parcels!r}") from None
    if not out:
        raise ConfigError("choose at least one parcel to perturb")
    bad = [p for p in out if not 0 <= p < n_parcels]
    if bad:
        raise ConfigError(f"parcel indices {bad} are outside 0..{n_parcels - 1}")
    if len(set(out)) != len(out):
        raise ConfigError(f"parcels {out} contain duplicates")
    return out


def _check_range(t_start: int, t_stop: int, n_time: int) -> tuple[int, int]:
    t_start, t_stop = int(t_start), int(t_stop)
    if not 0 <= t_start < t_stop <= n_time:
        raise ConfigError(f"time range [{t_start}, {t_stop}) must satisfy 0 <= start < stop <= "
                          f"{n_time} (the recording length)")
    return t_start, t_stop


def apply_perturbation(x, parcels, mode: str, value: float, t_start: int,
                       t_stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(edited copy of x [P, T] float32, mask [P, T] bool of the edited values).

    scale: x * value; shift: x + value; clamp: the values set to `value`.
    """
    x = np.array(x, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"expected one [parcels, time] recording, got shape {x.shape}")
    if mode not in MODES:
        raise ConfigError(f"perturbation mode {mode!r} must be one of {', '.join(MODES)}")
    if not np.isfinite(value):
        raise ConfigError(f"perturbation value must be finite, got {value}")
    parcels = _check_parcels(parcels, x.shape[0])
    t_start, t_stop = _check_range(t_start, t_stop, x.shape[1])
    mask = np.zeros(x.shape, bool)
    mask[parcels, t_start:t_stop] = True
    region = x[parcels, t_start:t_stop]
    if mode == "scale":
        region = region * np.float32(value)
    elif mode == "shift":
        region = region + np.float32(value)
    else:
        region = np.full_like(region, value)
    x[parcels, t_start:t_stop] = region
    return x, mask


def perturb_recording(model, x, coords, parcels, mode: str, value: float, t_start: int,
                      t_stop: int | None, n_passes: int = 4, seed: int = 0,
                      batch_size: int = 8) -> dict:
    """Predicted response of the whole recording x [P, T] to editing `parcels` over
    [t_start, t_stop) (t_stop None: the end). `coords` [P, 3] MNI mm, or None for the atlas
    saved with the model.

    Returns {"effect": [P, T] float32, recon(edited) - recon(original), both from the same
    rotating masks; "perturbed_mask": [P, T] bool; "original" / "perturbed": the two
    reconstructions [P, T]; "parcels", "time_range", "mode", "value"}. Only windows that
    overlap the time range can change; the effect is exactly 0 elsewhere.
    """
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"expected one [parcels, time] recording, got shape {x.shape}")
    t_stop = x.shape[1] if t_stop is None else t_stop
    edited, mask = apply_perturbation(x, parcels, mode, value, t_start, t_stop)
    kw = dict(n_passes=n_passes, seed=seed, batch_size=batch_size)
    base = reconstruct_recording(model, x, coords, **kw).recon
    moved = reconstruct_recording(model, edited, coords, **kw).recon
    return {"effect": (moved - base).astype(np.float32), "perturbed_mask": mask,
            "original": base, "perturbed": moved, "parcels": _check_parcels(parcels, len(x)),
            "time_range": (int(t_start), int(t_stop)), "mode": mode, "value": float(value)}


def _nan_to_none(v):
    return None if v is None or not np.isfinite(v) else float(v)


def effect_summary(effect, parcels, groups=None, time_range=None) -> dict:
    """Where the effect [P, T] lands, as mean |effect| over the time range (default: all).

    per_parcel [P] (nan on the perturbed parcels, which are left out of every mean);
    others: mean over the non-perturbed parcels; perturbed: mean over the perturbed ones.
    With `groups` [P] (e.g. module labels): same_group (non-perturbed parcels sharing a group
    with a perturbed parcel), other_group (the rest) and ratio = same_group / other_group
    (nan when either side is empty or other_group is 0).
    """
    e = np.asarray(effect, np.float64)
    if e.ndim != 2:
        raise ConfigError(f"effect must be [parcels, time], got shape {e.shape}")
    parcels = _check_parcels(parcels, e.shape[0])
    t0, t1 = (0, e.shape[1]) if time_range is None else _check_range(*time_range, e.shape[1])
    mag = np.abs(e[:, t0:t1]).mean(1)
    hit = np.zeros(e.shape[0], bool)
    hit[parcels] = True
    per_parcel = np.where(hit, np.nan, mag)
    out = {"time_range": (t0, t1), "parcels": parcels, "per_parcel": per_parcel,
           "perturbed": float(mag[hit].mean()),
           "others": float(mag[~hit].mean()) if (~hit).any() else float("nan")}
    if groups is not None:
        g = np.asarray(groups).ravel()
        if g.size != e.shape[0]:
            raise ConfigError(f"groups label {g.size} parcels, effect has {e.shape[0]}")
        same = np.isin(g, g[parcels]) & ~hit
        other = ~np.isin(g, g[parcels])
        s = float(mag[same].mean()) if same.any() else float("nan")
        o = float(mag[other].mean()) if other.any() else float("nan")
        out.update(same_group=s, other_group=o, n_same=int(same.sum()), n_other=int(other.sum()),
                   ratio=s / o if np.isfinite(s) and np.isfinite(o) and o > 0 else float("nan"),
                   perturbed_groups=sorted({v.item() for v in g[parcels]}))
    return out


def save_effect(effect, out_dir, parcels, names=None, time_range=None, groups=None) -> Path:
    """Write effect.npy ([P, T] float32), effect.png (heatmap, perturbed parcels and time range
    marked) and summary.json (`effect_summary`) into `out_dir`; returns the folder."""
    e = np.asarray(effect, np.float32)
    summary = effect_summary(e, parcels, groups, time_range)
    if names is not None and len(names) != e.shape[0]:
        raise ConfigError(f"{len(names)} names for {e.shape[0]} parcels")
    out = Path(out_dir)
    if out.is_file():
        raise ConfigError(f"{out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "effect.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, e, allow_pickle=False)  # through a handle: np.save(path) would add ".npy"
    _plot_effect(e, summary, out / "effect.png", names)
    doc = {**summary, "shape": list(e.shape),
           "per_parcel": [_nan_to_none(v) for v in summary["per_parcel"]],
           "perturbed_names": None if names is None else [str(names[p]) for p in
                                                           summary["parcels"]]}
    for key in ("perturbed", "others", "same_group", "other_group", "ratio"):
        if key in doc:
            doc[key] = _nan_to_none(doc[key])
    doc["time_range"] = list(doc["time_range"])
    with atomic_path(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _plot_effect(e: np.ndarray, summary: dict, path: Path, names=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = float(np.abs(e).max()) or 1.0
    fig, ax = plt.subplots(figsize=(10, max(3.0, min(10.0, 0.12 * e.shape[0] + 1.5))))
    im = ax.imshow(e, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                   interpolation="nearest")
    t0, t1 = summary["time_range"]
    for t in (t0 - 0.5, t1 - 0.5):
        ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.plot(np.full(len(summary["parcels"]), -0.5), summary["parcels"], ">", color="k",
            ms=5, clip_on=False)
    if names is not None and e.shape[0] <= 60:
        ax.set_yticks(range(e.shape[0]), [str(n) for n in names], fontsize=6)
    ax.set_xlabel("timepoint (perturbed range dashed)")
    ax.set_ylabel("parcel (perturbed marked >)")
    fig.colorbar(im, ax=ax, label="predicted change")
    save_figure(fig, path)
