"""Whole-recording reconstruction from a masked autoencoder, every value predicted exactly once.

Why: a masked autoencoder only predicts what it cannot see, so one forward pass reconstructs
a random quarter of a window. Rotating masks split the tokens of a window into `n_passes`
disjoint groups (a seeded random partition) and mask one group per pass: after the passes
every patch has been predicted exactly once, from context only, so the reconstruction is a
genuine out-of-sight prediction of the whole recording (R^2 against the input is then an
honest fit measure, and a perturbation's effect map compares like with like).

Works for our BrainLM token model (Family A: tokens are parcel x time patches) and for the
released ViTMAE wrapper (`ReleasedBrainLM`, Family B: tokens are canvas patches; the patches
made of padding only are never masked).

Arrays are [parcels, time]; batches [batch, parcels, time]. Inputs must already be scaled
the way the model was trained (the store's robust scaler).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..data.windows import window_starts
from ..model import is_released, window_length
from ..errors import ConfigError, check_orientation
from ..train.reconstruction import plot_reconstruction, r2_per_parcel

__all__ = ["RotatingMasks", "Reconstruction", "rotating_masks", "window_starts",
           "reconstruct_recording", "plot_reconstruction"]


# ----------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class RotatingMasks:
    """A seeded partition of a window's tokens into masking passes.

    groups: LongTensor [L], the pass in which each token is masked (-1: never masked, only
        the canvas padding of Family B). noise: FloatTensor [n_passes, L] in [0, 1), the
        `noise` row that masks exactly group g (largest values are masked). ratios: mask ratio
        of each pass, chosen so the model's own rounding masks exactly that group's size.
    """

    groups: torch.Tensor
    noise: torch.Tensor
    ratios: tuple[float, ...]

    @property
    def n_passes(self) -> int:
        return len(self.ratios)

    def sizes(self) -> list[int]:
        return [int((self.groups == g).sum()) for g in range(self.n_passes)]


def _partition(n_tokens: int, n_passes: int, seed: int, eligible: np.ndarray | None = None,
               rule: str = "brainlm") -> RotatingMasks:
    """Split the eligible tokens into `n_passes` groups whose sizes differ by at most one.

    Noise for pass g: distinct random values in [0, 0.5) for every token, +0.5 on group g, so
    the argsort puts exactly group g last (masked) with no ties. The ratio must survive the
    model's rounding: BrainLM masks round(ratio * L) tokens, ViTMAE keeps int(L * (1 - ratio)).
    """
    if not isinstance(n_passes, (int, np.integer)) or n_passes < 2:
        raise ConfigError(f"n_passes must be an integer >= 2 (one pass would mask everything), "
                          f"got {n_passes!r}")
    eligible = np.ones(n_tokens, bool) if eligible is None else np.asarray(eligible, bool)
    n_eligible = int(eligible.sum())
    if n_passes > n_eligible:
        raise ConfigError(f"n_passes {n_passes} is more than the {n_eligible} maskable tokens of "
                          "a window")
    rng = np.random.default_rng(seed)
    groups = np.full(n_tokens, -1, dtype=np.int64)
    order = rng.permutation(np.flatnonzero(eligible))
    groups[order] = np.arange(n_eligible) % n_passes
    base = rng.permutation(n_tokens).astype(np.float64) / n_tokens * 0.5
    noise = np.stack([base + 0.5 * (groups == g) for g in range(n_passes)])
    ratios = []
    for g in range(n_passes):
        size = int((groups == g).sum())
        if rule == "brainlm":
            ratio = size / n_tokens
            masked = int(round(ratio * n_tokens))
        else:  # ViTMAE: the half step makes int(L * (1 - ratio)) exactly L - size
            ratio = (size - 0.5) / n_tokens
            masked = n_tokens - int(n_tokens * (1 - ratio))
        if masked != size:  # float rounding must not move a token between groups
            raise RuntimeError(f"mask ratio {ratio} masks {masked} tokens, not {size}")
        ratios.append(ratio)
    return RotatingMasks(torch.from_numpy(groups), torch.from_numpy(noise).float(), tuple(ratios))


def rotating_masks(n_parcels: int, n_patches: int, n_passes: int = 4,
                   seed: int = 0) -> RotatingMasks:
    """Masks for a BrainLM window of `n_parcels` x `n_patches` time patches (L = P * N tokens,
    token p * N + n): pass g masks group g; the groups cover every token exactly once.

    Equal groups when L is divisible by `n_passes`, else sizes differ by one and each pass
    gets its own ratio (size / L), checked against the model's round(ratio * L).
    """
    if n_parcels < 1 or n_patches < 1:
        raise ConfigError(f"empty window: {n_parcels} parcels x {n_patches} patches")
    return _partition(n_parcels * n_patches, n_passes, seed)


# ----------------------------------------------------------------------------- model access


@contextmanager
def inference(model):
    """eval() + no_grad for the block, restoring the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _param(model) -> torch.Tensor:
    return next(model.parameters())


def _plan(model, n_parcels: int, n_passes: int, seed: int) -> RotatingMasks:
    if is_released(model):
        lay = model.layout
        grid = torch.arange(lay.num_patches)
        rows, cols = grid // lay.grid, grid % lay.grid
        r, c = lay.data_patch_rows(), lay.data_patch_columns()
        inside = ((rows >= r.start) & (rows < r.stop) & (cols >= c.start) & (cols < c.stop))
        return _partition(lay.num_patches, n_passes, seed, inside.numpy(), rule="vitmae")
    return rotating_masks(n_parcels, window_length(model) // model.config.patch_size, n_passes,
                          seed)


def _masked_pass(model, windows: torch.Tensor, coords, plan: RotatingMasks, g: int):
    """One pass on a batch: (recon [B, P, T], mask [B, P, T] bool, True where predicted)."""
    noise = plan.noise[g].to(windows.device).expand(windows.shape[0], -1)
    if is_released(model):
        out = model(windows, mask_ratio=plan.ratios[g], noise=noise)
        return out["reconstruction"], out["mask"]
    out = model(windows, coords, mask_ratio=plan.ratios[g], mask_strategy="random", noise=noise)
    return model.reconstruct(windows, out)


# ----------------------------------------------------------------------------- recordings



class Reconstruction(NamedTuple):
    """recon [P, T] float32: every value predicted while masked (averaged where the end-aligned
    tail window overlaps); r2 [P]: per-parcel R^2 of recon vs the input (nan for a constant
    parcel); coverage [P, T] int: windows that predicted each value (1, or 2 in the overlap)."""

    recon: np.ndarray
    r2: np.ndarray
    coverage: np.ndarray


def _as_recording(model, x, coords) -> tuple[np.ndarray, int]:
    x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)
    if is_released(model):
        n_parcels = model.layout.n_parcels
    elif coords is not None:
        n_parcels = int(np.shape(coords)[0])
    else:
        n_parcels = int(x.shape[0]) if x.ndim == 2 else -1
    check_orientation(x, n_parcels, "reconstruction input")
    if not np.all(np.isfinite(x)):
        raise ConfigError("the recording contains NaN or inf; fill or drop those values first")
    return x.astype(np.float32), n_parcels


def reconstruct_recording(model, x, coords=None, n_passes: int = 4, seed: int = 0,
                          batch_size: int = 8) -> Reconstruction:
    """Reconstruct a whole recording x [P, T] (T >= the model's window) from masked passes.

    The recording is cut into windows of the model's length (`window_starts`); each window
    gets the same `n_passes` rotating masks, and each prediction is written where it was
    masked. Raises RuntimeError if any value of a window was not masked exactly once (the
    model masked something else than asked). `coords` [P, 3] MNI mm (Family A; default: the
    atlas saved with the model; ignored by Family B, whose layout fixes them).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    x, n_parcels = _as_recording(model, x, coords)
    window = window_length(model)
    starts = window_starts(x.shape[1], window)
    plan = _plan(model, n_parcels, n_passes, seed)
    param = _param(model)
    total = np.zeros(x.shape, np.float64)
    coverage = np.zeros(x.shape, np.int64)
    with inference(model):
        for b0 in range(0, len(starts), batch_size):
            chunk = starts[b0:b0 + batch_size]
            w = torch.from_numpy(np.stack([x[:, s:s + window] for s in chunk]))
            w = w.to(device=param.device, dtype=param.dtype)
            pred = torch.zeros(w.shape, dtype=torch.float64)
            count = torch.zeros(w.shape, dtype=torch.int64)
            for g in range(plan.n_passes):
                recon, mask = _masked_pass(model, w, coords, plan, g)
                mask = mask.cpu()
                pred[mask] = recon.detach().cpu().double()[mask]
                count += mask.long()
            if not bool((count == 1).all()):
                raise RuntimeError(f"rotating masks did not mask every value exactly once "
                                   f"(counts {int(count.min())}..{int(count.max())})")
            for j, s in enumerate(chunk):
                total[:, s:s + window] += pred[j].numpy()
                coverage[:, s:s + window] += 1
    recon = (total / coverage).astype(np.float32)
    return Reconstruction(recon, r2_per_parcel(x, recon), coverage)
