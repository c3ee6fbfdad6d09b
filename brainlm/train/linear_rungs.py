"""The strongest linear rungs of the reconstruction ladder: what the visible patches of a window
already say about a masked one, without any deep network.

Why: resting-state parcels covary strongly (networks, the global signal), so the masked
parcels of a time patch are largely predictable from the parcels visible at the same moment
under a Gaussian with the training split's covariance; and a parcel's own signal persists over
seconds, so what it did beyond that prediction in the neighbouring visible patches carries
over. A transformer that does not beat these two has learned no more than linear algebra on
the training covariance. Both rungs see exactly what the model sees.

- `GaussianRung` (`cond_gaussian`): E[x_M | x_V] = mu_M + S_MV S_VV^-1 (x_V - mu_V) at every
  timepoint, V the parcels visible in that time patch of that window, mu and S the training
  split's parcel mean and Ledoit-Wolf shrunk covariance (the shrinkage is chosen on the
  training data alone). Masks are per token (parcel x time patch), so each (window, patch) has
  its own visible set: one solve per group, on the smaller of the visible (S_VV) or masked
  (precision Lambda_MM) side. For visible parcels it gives the leave-one-out prediction from
  the other visible parcels (x_v - (K z_V)_v / K_vv, K = S_VV^-1): the parcel's residual
  beyond the spatial prediction where it is seen.
- `SpaceTimeRung` (`space_time`): a ridge stack fitted on training windows under the run's
  masking (like `reconstruction.RidgeBaseline`, one weight matrix for all parcels) of, per
  masked token: the conditional-Gaussian patch, the parcel's own linear interpolation across
  its neighbouring visible patches, that interpolation of its leave-one-out residuals (what it
  did beyond the spatial prediction before and after), the same-time mean, the parcel's
  visible mean and a constant. The conditional-Gaussian patch is one of its features, so on
  the windows it is fitted on it is at least as good as `cond_gaussian` (up to the tiny
  ridge penalty).

Shapes: windows x [B, P, T] (scaled), token masks m [B, P, N] (True = masked, N = T / patch);
predictions [B, P, T] (only masked entries are scored); training series [P, T].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..errors import ConfigError
from .reconstruction import RidgeBaseline, parcel_interp, parcel_mean, same_time

MAX_COV_SAMPLES = 20_000  # training timepoints the covariance is estimated from (evenly spaced)


class GaussianRung:
    """Conditional expectation of masked parcels given the visible ones at the same time.

    mean [P] and cov [P, P] (float64, positive definite) of the scaled training series."""

    def __init__(self, mean, cov, shrinkage: float = float("nan")):
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
        self.cov = torch.as_tensor(np.asarray(cov), dtype=torch.float64)
        p = len(self.mean)
        if self.cov.shape != (p, p):
            raise ConfigError(f"covariance {tuple(self.cov.shape)} does not match {p} parcels")
        self.prec = torch.cholesky_inverse(torch.linalg.cholesky(self.cov))
        self.shrinkage = float(shrinkage)

    @classmethod
    def fit(cls, series: Iterable, max_samples: int = MAX_COV_SAMPLES) -> "GaussianRung":
        """From training series [P, T] (pooled timepoints; at most `max_samples`, evenly
        spaced), with Ledoit-Wolf shrinkage towards a scaled identity."""
        from sklearn.covariance import LedoitWolf

        parts = [np.asarray(s, dtype=np.float64).T for s in series]
        if not parts:
            raise ConfigError("the conditional-Gaussian rung needs training series")
        x = np.concatenate(parts)
        if len(x) > max_samples:
            x = x[np.linspace(0, len(x) - 1, max_samples).astype(int)]
        if len(x) < 2:
            raise ConfigError("the conditional-Gaussian rung needs at least 2 timepoints")
        lw = LedoitWolf().fit(x)
        return cls(lw.location_, lw.covariance_, lw.shrinkage_)

    def condition(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """[B, P, T]: masked entries E[x | visible parcels of their time patch]; visible
        entries the leave-one-out prediction from the other visible parcels. Groups
        (window, patch) with the same visible set share one factorisation."""
        b, p, t = x.shape
        n = m.shape[-1]
        ps = t // n
        mu = self.mean.to(x.device)[:, None]
        z = (x.double() - mu).reshape(b, p, n, ps).permute(0, 2, 1, 3).reshape(b * n, p, ps)
        vis = (~m).permute(0, 2, 1).reshape(b * n, p).cpu()
        out = torch.zeros_like(z)
        keys: dict[bytes, list[int]] = {}
        for g, row in enumerate(vis.numpy()):
            keys.setdefault(np.packbits(row).tobytes(), []).append(g)
        for groups in keys.values():
            zg = z[groups].permute(1, 0, 2).reshape(p, -1)  # [P, groups * ps]
            og = self._solve(zg, vis[groups[0]])
            out[groups] = og.reshape(p, len(groups), ps).permute(1, 0, 2)
        out = out.reshape(b, n, p, ps).permute(0, 2, 1, 3).reshape(b, p, t) + mu
        return out.to(x.dtype)

    def _solve(self, z: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """z [P, r] centred values, vis [P] bool -> [P, r] centred predictions (masked:
        conditional mean; visible: leave-one-out), on the cheaper side of the partition."""
        v_idx, m_idx = vis.nonzero().squeeze(1), (~vis).nonzero().squeeze(1)
        nv, nm = len(v_idx), len(m_idx)
        out = torch.zeros_like(z)
        if nv == 0:
            return out  # nothing visible: the training mean
        cov, prec = self.cov.to(z.device), self.prec.to(z.device)
        zv = z.index_select(0, v_idx)
        if nm == 0:
            a, k_diag = prec @ zv, torch.diagonal(prec)
        elif 2 * nv ** 3 <= nm ** 3 + 3 * nm ** 2 * nv:  # flops: K = S_VV^-1 from its Cholesky
            lower = torch.linalg.cholesky(cov.index_select(0, v_idx).index_select(1, v_idx))
            inv = torch.linalg.solve_triangular(
                lower, torch.eye(nv, dtype=z.dtype, device=z.device), upper=False)
            a, k_diag = inv.T @ (inv @ zv), (inv ** 2).sum(0)  # K = inv^T inv
            out[m_idx] = cov.index_select(0, m_idx).index_select(1, v_idx) @ a
        else:  # S_VV^-1 = L_VV - L_VM L_MM^-1 L_MV (Schur complement of the precision)
            rows = prec.index_select(0, m_idx)
            lmv = rows.index_select(1, v_idx)
            c = torch.cholesky_solve(lmv, torch.linalg.cholesky(rows.index_select(1, m_idx)))
            czv = c @ zv
            out[m_idx] = -czv
            a = prec.index_select(0, v_idx).index_select(1, v_idx) @ zv - lmv.T @ czv
            k_diag = torch.diagonal(prec)[v_idx] - (lmv * c).sum(0)
        out[v_idx] = zv - a / k_diag[:, None]
        return out

    def predict(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.condition(x, m)


def space_time_features(x: torch.Tensor, m: torch.Tensor, preds: dict) -> torch.Tensor:
    """[B, P, N, 4 * patch + 2] per-token features from visible data only (see the module
    docstring). `preds` must hold cond_gaussian, parcel_interp, same_time and parcel_mean."""
    b, p, t = x.shape
    n = m.shape[-1]
    ps = t // n
    cg = preds["cond_gaussian"]
    resid = preds["parcel_interp"] - parcel_interp(cg, m)  # interpolated LOO residuals
    parts = [cg, preds["parcel_interp"], resid, preds["same_time"]]
    parts = [v.reshape(b, p, n, ps) for v in parts]
    pm = preds["parcel_mean"].reshape(b, p, n, ps)[..., :1]
    return torch.cat(parts + [pm, torch.ones_like(pm)], dim=-1)


class SpaceTimeRung(RidgeBaseline):
    """The ridge stack of `space_time_features`, fitted on training windows under the same
    masking as the windows it is scored on (closed form on accumulated normal equations)."""

    def __init__(self, gaussian: GaussianRung, alpha: float = 1e-4):
        super().__init__(alpha)
        self.gaussian = gaussian

    def features(self, x: torch.Tensor, m: torch.Tensor, preds: dict | None = None
                 ) -> torch.Tensor:
        preds = dict(preds or {})
        if "cond_gaussian" not in preds:
            preds["cond_gaussian"] = self.gaussian.condition(x, m)
        for name, fn in (("parcel_interp", parcel_interp), ("same_time", same_time),
                         ("parcel_mean", parcel_mean)):
            if name not in preds:
                preds[name] = fn(x, m)
        return space_time_features(x, m, preds)
