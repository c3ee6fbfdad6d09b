"""Headroom above the linear ceiling: what predictors that see one window could add over the
conditional-Gaussian and space-time rungs, before any transformer is trained.

    python benchmarks/reconstruction_headroom.py --store processed [--mask-ratio 0.75]

On the store's validation windows (windows of 100, the demo's), under one random token mask,
beside the ladder (`brainlm.train.reconstruction`, `linear_rungs`):
- per_parcel_ridge_*: the space-time stack with one weight matrix per parcel (penalty x);
- in_context_*: the conditional Gaussian under the training covariance updated with the
  window's own (masked values filled by the rung), shrunk towards the population (lam);
- lowrank_*: the same update restricted to the population's top-k eigenvectors;
- other_half_*: the subject's own covariance from the rest of its recording (the timepoints
  outside this window: no answers seen), alone (1) or averaged with the training one (0.5);
- leaky_subject_cov: the subject's covariance from its whole recording, this window's masked
  values included. It has seen the answers: shown only to say how misleading such an
  "oracle" is, never as headroom.
Choice and report are on validation only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW, PATCH = 100, 20


def same_recording(store, xv, m, gauss, starts) -> dict:
    """Conditional Gaussians under the subject's own covariance (Ledoit-Wolf) from the rest of
    its recording (other_half_1, other_half_0.5 averaged with the training covariance) and,
    for contrast, from the whole recording with the answers in it (leaky_subject_cov)."""
    from sklearn.covariance import LedoitWolf

    from brainlm.model.prior import conditional_gaussian

    out = {k: torch.zeros_like(xv) for k in ("other_half_1", "other_half_0.5",
                                             "leaky_subject_cov")}
    pop = gauss.cov.numpy()
    for i, (row, start) in enumerate(starts):
        rec = np.asarray(store.load(row))
        outside = np.ones(rec.shape[1], bool)
        outside[start:start + WINDOW] = False
        own = LedoitWolf().fit(rec[:, outside].T).covariance_
        whole = LedoitWolf().fit(rec.T)
        for name, mean, cov in (("other_half_1", gauss.mean, own),
                                ("other_half_0.5", gauss.mean, (own + pop) / 2),
                                ("leaky_subject_cov", whole.location_, whole.covariance_)):
            out[name][i:i + 1] = conditional_gaussian(xv[i:i + 1], m[i:i + 1],
                                                      torch.as_tensor(mean), torch.tensor(cov))
    return out


def main() -> None:
    from brainlm.data.store import BrainStore, WindowDataset
    from brainlm.model.prior import conditional_gaussian
    from brainlm.train.linear_rungs import GaussianRung, SpaceTimeRung
    from brainlm.train.reconstruction import R2Meter, predict_baselines, time_mask, token_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="processed")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    args = ap.parse_args()
    store, ratio = BrainStore(args.store), args.mask_ratio
    p, n = store.n_parcels, WINDOW // PATCH

    def windows(split):
        ds = WindowDataset(store, split, window=WINDOW, mode="sliding", stride=WINDOW)
        return (torch.stack([torch.from_numpy(ds[i]["signal"]) for i in range(len(ds))]),
                [str(ds.rows.at[ds.index[i][0], "subject"]) for i in range(len(ds))])

    ds_val = WindowDataset(store, "val", window=WINDOW, mode="sliding", stride=WINDOW)
    starts = [(ds_val.rows.loc[ds_val.index[i][0]], int(ds_val.index[i][1]))
              for i in range(len(ds_val))]

    def mask(b, seed):
        noise = torch.rand(b, p * n, generator=torch.Generator().manual_seed(seed))
        k = int(round(ratio * p * n))
        return token_mask(p, n, noise.argsort(1)[:, p * n - k:])

    rows = store.recordings("train")
    gauss = GaussianRung.fit(np.asarray(store.load(r)) for _, r in rows.iterrows())
    xt, _ = windows("train")
    rung = SpaceTimeRung(gauss)
    f_dim = 4 * PATCH + 2
    xtx = torch.zeros(p, f_dim, f_dim, dtype=torch.float64)
    xty = torch.zeros(p, f_dim, PATCH, dtype=torch.float64)
    for rep in range(3):  # three mask draws of the training windows
        m = mask(len(xt), 100 + rep)
        preds = predict_baselines(xt, m, gaussian=gauss)
        rung.partial_fit(xt, m, preds)
        f = rung.features(xt, m, preds).double() * m[..., None]
        y = xt.double().reshape(len(xt), p, n, PATCH)
        xtx += torch.einsum("bpnf,bpng->pfg", f, f)
        xty += torch.einsum("bpnf,bpng->pfg", f, y)
    rung.fit()
    xv, subs = windows("val")
    m = mask(len(xv), 7)
    preds = predict_baselines(xv, m, gaussian=gauss, space_time=rung)
    f = rung.features(xv, m, preds).double()
    res = {}
    eye = torch.eye(f_dim, dtype=torch.float64)
    for lam in (1e-2, 1e-1, 1.0):
        reg = lam * torch.diagonal(xtx, dim1=1, dim2=2).mean(1)[:, None, None] * eye
        w = torch.linalg.solve(xtx + reg, xty)
        res[f"per_parcel_ridge_{lam:g}"] = torch.einsum("bpnf,pfg->bpng", f, w).reshape(
            xv.shape).float()
    cov, mu = gauss.cov.numpy(), gauss.mean.numpy()
    ev, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, ::-1]
    tm = time_mask(m, PATCH)
    filled = torch.where(tm, preds["cond_gaussian"], xv).double().numpy() - mu[:, None]
    variants = {f"in_context_{lam:g}": (None, lam) for lam in (0.2, 0.5)}
    variants.update({f"lowrank_k{k}_{lam:g}": (k, lam) for k in (5, 20) for lam in (0.5, 1.0)})
    for name, (k, lam) in variants.items():
        out = torch.zeros_like(xv)
        for i in range(len(xv)):
            if k is None:
                c = (1 - lam) * cov + lam * np.cov(filled[i])
            else:
                u = vecs[:, :k]
                proj = u.T @ filled[i]
                c = cov + lam * u @ (proj @ proj.T / proj.shape[1] - u.T @ cov @ u) @ u.T
                w_, v_ = np.linalg.eigh((c + c.T) / 2)
                c = v_ @ np.diag(np.maximum(w_, 1e-3)) @ v_.T
            out[i:i + 1] = conditional_gaussian(xv[i:i + 1], m[i:i + 1], gauss.mean,
                                                torch.tensor(c))
        res[name] = out
    res.update(same_recording(store, xv, m, gauss, starts))
    labels = sorted(set(subs))
    meter = R2Meter(p, len(labels))
    groups = [labels.index(s) for s in subs]
    meter.add_targets(xv, tm, groups)
    for name, pred in {**preds, **res}.items():
        meter.add(name, xv, pred, tm, groups)
    print(f"store {args.store}, mask {ratio:g}, {len(xv)} validation windows of {WINDOW}\n")
    print("| predictor | val R^2 |\n|---|---|")
    for name in meter.sse:
        print(f"| {name} | {meter.r2(name):.4f} |")


if __name__ == "__main__":
    main()
