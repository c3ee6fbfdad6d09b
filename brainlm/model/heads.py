"""Task heads on a BrainLM encoder and the poolings they read: what fine-tuning trains and
what the predictor, the registry and serving load (never from the trainer).

Poolings of one window [B, P, T] (`pooled`):
- `cls` / `mean`: the CLS token or the mean token, [B, H];
- `connectivity`: the correlation between parcels of their token embeddings (every time patch
  and channel of a parcel, centred over the window's time patches), Fisher z, upper triangle:
  [B, P (P - 1) / 2]. Why: subject traits in resting fMRI live in the coupling between
  parcels (functional connectivity), which averaging tokens throws away; this readout keeps
  the parcel-by-parcel structure of the encoder's representation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

POOLINGS = ("cls", "mean", "connectivity")


class Head(nn.Module):
    """A linear head (dropout first) on one pooled vector per window: [B, width] -> [B, out]."""

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


def token_connectivity(tokens: torch.Tensor, n_parcels: int) -> torch.Tensor:
    """[B, P * N, H] parcel-major tokens -> [B, P (P - 1) / 2] Fisher-z correlations between
    parcels of their token embeddings centred over the N time patches (float32)."""
    b, length, h = tokens.shape
    e = tokens.float().reshape(b, n_parcels, length // n_parcels, h)
    e = (e - e.mean(2, keepdim=True)).reshape(b, n_parcels, -1)
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    corr = e @ e.transpose(1, 2)
    iu = torch.triu_indices(n_parcels, n_parcels, 1, device=tokens.device)
    return torch.atanh(corr[:, iu[0], iu[1]].clamp(-0.999999, 0.999999))


def pooled(model, x: torch.Tensor, coords, pooling: str) -> torch.Tensor:
    """One vector per window [B, width] of either model family (ours takes the coordinates)."""
    from . import is_released

    if pooling not in POOLINGS:
        raise ConfigError(f"pooling '{pooling}' must be one of {', '.join(POOLINGS)}")
    if pooling == "connectivity":
        if is_released(model):
            raise ConfigError("pooling 'connectivity' needs our token model; released ViTMAE "
                              "weights see image patches, not parcels (use cls or mean)")
        hidden = model.encode(x, coords)
        return token_connectivity(hidden[:, 1:], x.shape[1])
    return (model.embed(x) if is_released(model) else model.embed(x, coords))[pooling]


def pooled_width(model, pooling: str, n_parcels: int) -> int:
    """Width of `pooled`'s vectors."""
    from . import is_released

    if pooling == "connectivity":
        return n_parcels * (n_parcels - 1) // 2
    return model.hidden_size if is_released(model) else model.config.hidden_size


def context_ids(n_parcels: int, window: int, patch_size: int, horizon: int) -> torch.Tensor:
    """[1, P * n_ctx]: the tokens a forecast sees, every parcel's patches before the horizon
    (tokens are parcel-major)."""
    n_ctx = window // patch_size - horizon // patch_size
    return (torch.arange(n_parcels)[:, None] * (window // patch_size)
            + torch.arange(n_ctx)[None]).reshape(1, -1)


def average_outputs(batches, n_recordings: int, n_out: int, classes) -> np.ndarray:
    """Per recording: the head's outputs over its windows averaged [n, n_out] (class
    probabilities when `classes`, else the standardized target). `batches`: (outputs, owner)."""
    sums, counts = np.zeros((n_recordings, n_out)), np.zeros(n_recordings)
    for out, owner in batches:
        out = out.float().softmax(-1) if classes else out.float()
        np.add.at(sums, owner, out.cpu().numpy())
        np.add.at(counts, owner, 1)
    return sums / np.maximum(counts, 1)[:, None]
