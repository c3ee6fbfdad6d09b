"""Masked-reconstruction scoring: the R^2 every pretraining run reports, and the baselines it
must beat on the same windows and the same masks.

Why: a reconstruction loss means nothing alone. Resting-state fMRI carries a strong global
signal, so "the mean of the visible parcels at the same time" already explains a quarter to a
third of the variance of masked patches. A model below that has learned the global signal, or
less. Every predictor here sees exactly what the model sees (the visible patches of the window)
and is scored by one `R2Meter` with the model's R^2 definition. The strongest rungs, linear
predictors from the training covariance, are in `linear_rungs`; the paired subject-bootstrap
interval of the model's gain over the best rung (`gain_interval`) is computed here from the
meter's per-subject sums.

Shapes: windows x [B, P, T] (scaled), token masks m [B, P, N] (True = masked, N = T / patch);
every predictor returns [B, P, T] (only its masked entries are scored). The per-step mask noise
and the reconstruction plot (model beside its best baseline) live here too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import save_figure

# every rung of the ladder, weakest first (cond_gaussian and space_time: `linear_rungs`)
MIN_GAIN = 0.005  # R^2 the interval's lower bound must clear for `learned` (gain_interval)

BASELINES = ("zero", "parcel_mean", "parcel_interp", "same_time", "ridge", "cond_gaussian",
             "space_time")


class R2Meter:
    """Per-parcel R^2 over masked values, accumulated over batches, averaged over parcels.

    R^2 = 1 - SSE / SST per parcel, SST about that parcel's mean masked value; parcels without
    variance are left out; not clipped at 0, so worse than the mean shows as negative. Several
    predictors share the targets, so only their SSE is kept separately. Every sum is kept per
    group (a subject: `groups` [B] indices in 0..n_groups-1) as [n_groups, P], so the same R^2
    can be computed per subject and for any resample of subjects (`r2_from_sums`)."""

    def __init__(self, n_parcels: int, n_groups: int = 1):
        z = lambda: torch.zeros(n_groups, n_parcels, dtype=torch.float64)  # noqa: E731
        self.sum_y, self.sum_y2, self.count = z(), z(), z()
        self.sse: dict[str, torch.Tensor] = {}
        self._zero = z

    @staticmethod
    def _groups(x: torch.Tensor, groups) -> torch.Tensor:
        if groups is None:
            return torch.zeros(len(x), dtype=torch.long)
        return torch.as_tensor(groups, dtype=torch.long).cpu()

    def add_targets(self, x: torch.Tensor, mask: torch.Tensor, groups=None) -> None:
        """x [B, P, T], mask [B, P, T] bool (True where predicted), groups [B] or None."""
        g = self._groups(x, groups)
        y = x.double() * mask
        self.sum_y.index_add_(0, g, y.sum(2).cpu())
        self.sum_y2.index_add_(0, g, (y ** 2).sum(2).cpu())
        self.count.index_add_(0, g, mask.double().sum(2).cpu())

    def add(self, name: str, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
            groups=None) -> None:
        err = ((pred.double() - x.double()) ** 2) * mask
        sse = self.sse.setdefault(name, self._zero())
        sse.index_add_(0, self._groups(x, groups), err.sum(2).cpu())

    def sums(self, name: str) -> tuple[np.ndarray, ...]:
        """(sum_y, sum_y2, count, sse) of predictor `name`, each [n_groups, P]."""
        return tuple(v.numpy() for v in (self.sum_y, self.sum_y2, self.count, self.sse[name]))

    def r2(self, name: str) -> float:
        return float(r2_from_sums(*(v.sum(0) for v in self.sums(name))))

    def r2_by_group(self, name: str) -> np.ndarray:
        """[n_groups]: the R^2 of each group's own masked values (nan for an empty group)."""
        return r2_from_sums(*self.sums(name))

    def mse(self, name: str) -> float:
        return float(self.sse[name].sum() / self.count.sum().clamp(min=1))


def r2_from_sums(sum_y, sum_y2, count, sse) -> np.ndarray:
    """R^2 per parcel from its sums, averaged over the parcels with variance: arrays
    [..., P] -> [...] (nan where no parcel has any)."""
    sum_y, sum_y2, count, sse = (np.asarray(v, dtype=np.float64)
                                 for v in (sum_y, sum_y2, count, sse))
    sst = sum_y2 - sum_y ** 2 / np.maximum(count, 1)
    ok = (count > 1) & (sst > 1e-12)
    r2 = np.where(ok, 1 - sse / np.where(ok, sst, 1.0), 0.0)
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, r2.sum(-1) / np.maximum(n, 1), np.nan)


def gain_interval(meter: R2Meter, model: str, rungs, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> dict:
    """Paired bootstrap over the meter's groups (subjects) of R^2(model) - max R^2(rungs).

    Each resample draws subjects with replacement and pools the drawn subjects' sums (weights
    = how often each is drawn, [n_boot, S] @ [S, P]); model and every rung are scored on the
    same resamples, and the best rung is chosen again in each (the statistic is the gain over
    the best rung, selection included). Groups without masked values are left out; with fewer
    than 2 subjects there is no interval (nan) and the verdict is undecided. `learned` needs the
    lower bound above MIN_GAIN, not just above 0: a model built on a rung (the linear prior)
    differs from it almost without noise, so a negligible gain would otherwise decide.
    -> percentile_interval's dict with "verdict" (LEARNED words)."""
    from ..evaluate.intervals import (LEARNED, UNDECIDED, draw_counts, percentile_interval,
                                      subject_draws, verdict)

    keep = meter.count.sum(1).numpy() > 0
    point = meter.r2(model) - max(meter.r2(r) for r in rungs)
    if keep.sum() < 2:  # one subject resampled is that subject: no interval
        out = percentile_interval([], point, alpha)
    else:
        w = draw_counts(subject_draws(int(keep.sum()), n_boot, seed), int(keep.sum()))
        sy, sy2, cnt, _ = (w @ v[keep] for v in meter.sums(model))

        def scored(name):
            return r2_from_sums(sy, sy2, cnt, w @ meter.sums(name)[3][keep])

        best = np.max(np.stack([scored(r) for r in rungs]), axis=0)
        out = percentile_interval(scored(model) - best, point, alpha, int(keep.sum()))
    out["verdict"] = verdict(out["low"], out["high"], LEARNED)
    if out["verdict"] == LEARNED[0] and not out["low"] > MIN_GAIN:
        out["verdict"] = UNDECIDED  # above the rung, but not by enough to call it learned
    return out


def token_mask(n_parcels: int, n_patches: int, ids_mask: torch.Tensor) -> torch.Tensor:
    """ids_mask [B, n_mask] token indices (p * N + n) -> [B, P, N] bool, True where masked."""
    b = ids_mask.shape[0]
    m = torch.zeros(b, n_parcels * n_patches, dtype=torch.bool, device=ids_mask.device)
    m.scatter_(1, ids_mask, True)
    return m.view(b, n_parcels, n_patches)


def time_mask(m: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, P, N] token mask -> [B, P, N * patch] per-timepoint mask."""
    return m.repeat_interleave(patch, dim=-1)


def parcel_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each parcel's masked patches = the mean of its own visible values (0 if none)."""
    vis = ~time_mask(m, x.shape[-1] // m.shape[-1])
    total = (x * vis).sum(-1, keepdim=True)
    n = vis.sum(-1, keepdim=True)
    return (total / n.clamp(min=1)).expand_as(x)


def parcel_interp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Linear interpolation in time between the parcel's nearest visible timepoints; the
    nearest visible value beyond the ends; 0 for a parcel with nothing visible."""
    vis = ~time_mask(m, x.shape[-1] // m.shape[-1])
    t = x.shape[-1]
    idx = torch.arange(t, device=x.device).expand_as(x)
    prev = torch.where(vis, idx, -1).cummax(dim=-1).values  # last visible at or before t
    nxt = torch.where(vis, idx, t).flip(-1).cummin(dim=-1).values.flip(-1)  # first at/after
    has_prev, has_next = prev >= 0, nxt < t
    x_prev = x.gather(-1, prev.clamp(min=0))
    x_next = x.gather(-1, nxt.clamp(max=t - 1))
    span = (nxt - prev).clamp(min=1).to(x.dtype)
    w = (idx - prev).to(x.dtype) / span
    both = x_prev + w * (x_next - x_prev)
    out = torch.where(has_prev & has_next, both,
                      torch.where(has_prev, x_prev, torch.where(has_next, x_next,
                                                                torch.zeros_like(x))))
    return torch.where(vis, x, out)


def same_time(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each masked patch = the mean over the visible parcels of the same time patch (0 if
    none): the global signal, the floor a model has to clear."""
    b, p, t = x.shape
    n = m.shape[-1]
    xp = x.view(b, p, n, t // n)
    vis = (~m)[..., None].to(x.dtype)
    mean = (xp * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True).clamp(min=1)
    return mean.expand_as(xp).reshape(b, p, t)


def ridge_features(x: torch.Tensor, m: torch.Tensor, preds: dict | None = None) -> torch.Tensor:
    """[B, P, N, F] per-token features from visible data only: the same-time mean patch, the
    parcel's interpolated patch, the parcel's visible mean, and a constant. `preds`: those
    baselines' predictions when already computed."""
    b, p, t = x.shape
    n = m.shape[-1]
    ps = t // n
    if preds is None:
        preds = {"same_time": same_time(x, m), "parcel_interp": parcel_interp(x, m),
                 "parcel_mean": parcel_mean(x, m)}
    st = preds["same_time"].reshape(b, p, n, ps)
    it = preds["parcel_interp"].reshape(b, p, n, ps)
    pm = preds["parcel_mean"].reshape(b, p, n, ps)[..., :1]
    return torch.cat([st, it, pm, torch.ones_like(pm)], dim=-1)


class RidgeBaseline:
    """Linear prediction of a masked patch from the visible tokens (`ridge_features`), one
    weight matrix shared by all parcels, fitted on training windows under the same masking
    distribution as the windows it is scored on. Closed form on accumulated normal equations.
    Subclasses change `features` ([B, P, N, F] from visible data only)."""

    def __init__(self, alpha: float = 1e-3):
        self.alpha = alpha
        self.xtx = self.xty = self.weight = None

    def features(self, x: torch.Tensor, m: torch.Tensor, preds: dict | None = None
                 ) -> torch.Tensor:
        return ridge_features(x, m, preds)

    def partial_fit(self, x: torch.Tensor, m: torch.Tensor, preds: dict | None = None) -> None:
        f = self.features(x, m, preds).double()
        y = x.double().reshape(*m.shape, x.shape[-1] // m.shape[-1])
        f, y = f[m], y[m]  # masked tokens only: [n, F], [n, patch]
        xtx, xty = f.T @ f, f.T @ y
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty

    def fit(self):
        k = self.xtx.shape[0]
        reg = self.alpha * torch.diagonal(self.xtx).mean() * torch.eye(k, dtype=self.xtx.dtype)
        reg[-1, -1] = 0  # the intercept is not shrunk
        self.weight = torch.linalg.solve(self.xtx + reg, self.xty)
        return self

    def predict(self, x: torch.Tensor, m: torch.Tensor, preds: dict | None = None
                ) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__}.predict before fit")
        f = self.features(x, m, preds)
        out = f.double() @ self.weight.to(f.device)
        return out.to(x.dtype).reshape(x.shape)


def predict_baselines(x: torch.Tensor, m: torch.Tensor, ridge: RidgeBaseline | None = None,
                      gaussian=None, space_time: RidgeBaseline | None = None
                      ) -> dict[str, torch.Tensor]:
    """Every rung's [B, P, T] prediction for windows x under token mask m: the fixed ones,
    then those fitted on training data that are given (ridge; `linear_rungs`' GaussianRung
    as cond_gaussian and SpaceTimeRung as space_time, which needs the Gaussian)."""
    preds = {"zero": torch.zeros_like(x),  # the training median: 0 after robust scaling
             "parcel_mean": parcel_mean(x, m), "parcel_interp": parcel_interp(x, m),
             "same_time": same_time(x, m)}
    if ridge is not None:
        preds["ridge"] = ridge.predict(x, m, preds)
    if gaussian is not None:
        preds["cond_gaussian"] = gaussian.condition(x, m)
    if space_time is not None:
        preds["space_time"] = space_time.predict(x, m, preds)
    return preds


def step_noise(seed: int, step: int, micro: int, batch: int, length: int, rank: int, world: int):
    """Mask noise for this rank's share of the global batch [batch, length] at a step."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro])
                                          .generate_state(1)[0]))
    noise = torch.rand(batch * world, length, generator=g)
    return noise[rank::world]


# ---------------------------------------------------------------------------- plots


def r2_per_parcel(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """[P]: 1 - SSE / SST around each parcel's mean (nan where the parcel is constant)."""
    x = np.asarray(x, np.float64)
    sse = ((x - recon) ** 2).sum(1)
    sst = ((x - x.mean(1, keepdims=True)) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


def plot_reconstruction(x, recon, path, parcels=(0, 1, 2, 3), names=None, mask=None,
                        baseline=None, baseline_name: str = "baseline") -> Path:
    """PNG of input vs reconstruction for a few parcels. With `mask` [P, T] (True where the
    value was predicted) only predicted spans are drawn and they are shaded; `baseline` [P, T]
    draws a baseline's prediction of the same patches beside the model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, recon = np.asarray(x), np.asarray(recon)
    if x.shape != recon.shape or x.ndim != 2:
        raise ConfigError(f"x {x.shape} and recon {recon.shape} must be the same [parcels, time]")
    parcels = [int(p) for p in parcels]
    if not parcels or not all(0 <= p < x.shape[0] for p in parcels):
        raise ConfigError(f"parcels {parcels} must be between 0 and {x.shape[0] - 1}")
    r2 = r2_per_parcel(x, recon)
    r2_base = None if baseline is None else r2_per_parcel(x, np.asarray(baseline))
    t = np.arange(x.shape[1])
    fig, axes = plt.subplots(len(parcels), 1, figsize=(10, 1.8 * len(parcels)), sharex=True,
                             squeeze=False)
    for ax, p in zip(axes[:, 0], parcels):
        ax.plot(t, x[p], color="0.3", lw=1, label="input")
        shown = recon[p] if mask is None else np.where(mask[p], recon[p], np.nan)
        ax.plot(t, shown, color="C3", lw=1.1, label="reconstruction")
        if baseline is not None:
            base = baseline[p] if mask is None else np.where(mask[p], baseline[p], np.nan)
            ax.plot(t, base, color="C0", lw=0.9, ls="--", label=baseline_name)
        if mask is not None:
            ax.fill_between(t, x[p].min(), x[p].max(), where=mask[p], color="C3", alpha=0.08)
        label = names[p] if names is not None else f"parcel {p}"
        score = f"R2 {r2[p]:.2f}" if r2_base is None else f"R2 {r2[p]:.2f} / {r2_base[p]:.2f}"
        ax.set_ylabel(f"{label}\n{score}", fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("timepoint (every value predicted while masked)" if mask is None
                           else "timepoint (masked patches shaded)")
    return save_figure(fig, path)
