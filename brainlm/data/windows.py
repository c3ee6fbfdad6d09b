"""Targets and windows of the store's recordings, shared by fine-tuning and evaluation.

Fine-tuning writes predictions and `brainlm evaluate` checks them against the store: both must
drop the same unlabelled recordings and cut the same windows, or a baseline would be scored on
rows the model never saw. One definition here keeps the two in step. Recordings are
[parcels, time]; batches of windows are [batch, parcels, window]. torch is imported only by the
functions that build tensors.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


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
        y = y.to_numpy(np.float64)
        huge = ~(np.abs(y) < 1e12)  # inf, or so large its spread overflows
        if huge.any():
            raise ConfigError(f"{where}: target '{target}' holds {y[huge][0]!r} "
                              f"({rows['recording_id'].iloc[int(np.flatnonzero(huge)[0])]}); "
                              "give finite values in the target's unit")
        return rows, y, None
    return rows, rows[target].astype(str).to_numpy(), None


def window_batches(store, rows, window: int, stride: int, batch_size: int):
    """Sliding windows of the given recordings of a store: yields (x [b, P, window] float32,
    rec_index). The last window of a recording ends at its last timepoint, whatever the
    stride."""
    return sliding_batches((store.load(row) for _, row in rows.iterrows()), window, stride,
                           batch_size)


def window_starts(n_time: int, window: int, stride: int | None = None) -> list[int]:
    """Where BrainLM's windows of a recording of `n_time` timepoints start: every `stride`
    (default: the window) from 0, and one more ending at the last timepoint when the stride
    does not reach it. The one rule for serving, evaluation baselines and reconstruction."""
    stride = int(stride or window)
    if n_time < window or stride < 1:
        raise ConfigError(f"a recording of {n_time} timepoints has no window of {window} "
                          f"(stride {stride}): it is shorter than the model's window")
    starts = list(range(0, n_time - window + 1, stride))
    if starts[-1] != n_time - window:
        starts.append(n_time - window)
    return starts


def sliding_batches(recordings, window: int, stride: int, batch_size: int):
    """`window_batches` over [P, T] arrays (what a served model is given)."""
    import torch

    batch, owners = [], []
    for i, x in enumerate(recordings):
        for s in window_starts(x.shape[1], window, stride):
            batch.append(np.asarray(x[:, s:s + window], dtype=np.float32))
            owners.append(i)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch)), np.array(owners)
                batch, owners = [], []
    if batch:
        yield torch.from_numpy(np.stack(batch)), np.array(owners)


def random_windows(store, rows, window: int, per_recording: int, batch_size: int, rng):
    """`per_recording` windows at random starts from every recording, in a random order:
    yields (x [b, P, window] float32, rec_index). Draws from `rng` (a numpy Generator)."""
    import torch

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
