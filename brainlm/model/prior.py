"""The linear prior a BrainLM decoder can start from: the space-time rung of the ladder, fitted
on the training split and carried in the model's weights.

Why: the strongest simple predictor of a masked patch is linear algebra on the training split's
parcel covariance (the conditional Gaussian at the same moment) stacked with the parcel's own
time course around the patch (`brainlm.train.linear_rungs`). A transformer that has to
rediscover that from scratch spends its whole budget there (the demo's 100 steps reach 0.45
where the rung has 0.61). With the prior, the decoder is told the rung's prediction and its
features for every masked token and learns only the residual: its last layer starts at zero,
so an untrained model is the rung, and what training adds beyond it is what the model learned.
It is honest only because the prior is fitted on training windows (never validation or test)
and saved with the weights, and the evaluation reports the rung beside the model.

Shapes: windows x [B, P, T] (scaled), token masks m [B, P, N] (True = masked); features
[B, P, N, 4 * patch + 2]; predictions [B, P, T].
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def conditional_gaussian(x: torch.Tensor, m: torch.Tensor, mean: torch.Tensor,
                         cov: torch.Tensor) -> torch.Tensor:
    """[B, P, T]: masked entries E[x | visible parcels of their time patch] under N(mean, cov);
    visible entries the leave-one-out prediction from the other visible parcels.

    Batched over every (window, time patch): with v the visible indicator, A = D_v S D_v +
    D_(1-v) is S_VV on the visible block and the identity elsewhere, so A^-1 restricted to V
    is S_VV^-1 = K: the masked prediction is S_MV K z_V and the visible one z_v - (K z_V)_v /
    K_vv. One Cholesky per group, in float32 or float64 as the covariance is."""
    b, p, t = x.shape
    n = m.shape[-1]
    ps = t // n
    dtype = cov.dtype
    mu = mean.to(dtype)[:, None]
    z = (x.to(dtype) - mu).reshape(b, p, n, ps).permute(0, 2, 1, 3).reshape(b * n, p, ps)
    vis = (~m).permute(0, 2, 1).reshape(b * n, p).to(dtype)  # [G, P]
    a = cov[None] * (vis[:, :, None] * vis[:, None, :]) + torch.diag_embed(1 - vis)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(a))  # [G, P, P]
    y = inv @ (z * vis[..., None])  # K z_V on V, 0 on M
    loo = z - y / torch.diagonal(inv, dim1=-2, dim2=-1)[..., None]
    out = torch.where(vis[..., None] > 0, loo, cov @ y)
    out = out.reshape(b, n, p, ps).permute(0, 2, 1, 3).reshape(b, p, t) + mu
    return out.to(x.dtype)


class LinearPrior(nn.Module):
    """The space-time rung as buffers: the training split's parcel mean [P] and shrunk
    covariance [P, P] (the conditional Gaussian) and the ridge stack's weight [F, patch] over
    `linear_rungs.space_time_features`. Zeros until `load_fitted` (or a saved model) fills them;
    `fitted` says which."""

    def __init__(self, n_parcels: int, patch_size: int):
        super().__init__()
        self.n_parcels, self.patch_size = n_parcels, patch_size
        self.register_buffer("mean", torch.zeros(n_parcels))
        self.register_buffer("cov", torch.eye(n_parcels))
        self.register_buffer("weight", torch.zeros(self.n_features, patch_size))
        self.register_buffer("is_fitted", torch.zeros(()))

    @property
    def n_features(self) -> int:
        return 4 * self.patch_size + 2

    @property
    def fitted(self) -> bool:
        return bool(self.is_fitted.item())

    @torch.no_grad()
    def load_fitted(self, mean, cov, weight) -> None:
        """From `GaussianRung` (mean, cov) and a fitted `SpaceTimeRung` (weight)."""
        for name, value in (("mean", mean), ("cov", cov), ("weight", weight)):
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != getattr(self, name).shape:
                raise ConfigError(f"linear prior: {name} {tuple(value.shape)} does not fit "
                                  f"{tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(value)
        self.is_fitted.fill_(1.0)

    @torch.no_grad()
    def features(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """[B, P, N, F] from the visible data only (float32 whatever autocast says)."""
        from ..train.linear_rungs import space_time_features
        from ..train.reconstruction import parcel_interp, parcel_mean, same_time

        if x.shape[1] != self.n_parcels:
            raise ConfigError(f"this model's linear prior was fitted on {self.n_parcels} "
                              f"parcels; the windows have {x.shape[1]}")
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            preds = {"cond_gaussian": conditional_gaussian(x, m, self.mean, self.cov),
                     "parcel_interp": parcel_interp(x, m), "same_time": same_time(x, m),
                     "parcel_mean": parcel_mean(x, m)}
            return space_time_features(x, m, preds)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """[..., F] -> [..., patch]: the rung's prediction of each token's patch."""
        return features @ self.weight.to(features.dtype)
