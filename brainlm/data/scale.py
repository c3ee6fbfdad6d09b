"""Robust scaling per parcel, fitted on training subjects only, saved with its provenance.

x_scaled = (x - median) / IQR, statistics over all training timepoints of every parcel.
Upstream wrote `x - median / IQR` and never published its statistics; ours are a versioned
safetensors file that travels with every model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, check_orientation

SCALER_VERSION = "1"
_META_KEY = "brainlm_scaler"  # the one safetensors metadata entry: the meta dict as JSON


@dataclass
class RobustScaler:
    median: np.ndarray  # float32 [P]
    iqr: np.ndarray  # float32 [P], > 0
    meta: dict = field(default_factory=dict)
    has_data: np.ndarray | None = None  # bool [P]: False where no training data (IQR set to 1)

    @property
    def n_parcels(self) -> int:
        return len(self.median)

    @classmethod
    def fit(cls, recordings, coverages=None, max_values: int = 2_000_000, seed: int = 0,
            **meta) -> "RobustScaler":
        """Fit on an iterable of [P, T] arrays (training recordings only).

        Parcels are pooled over recordings where they are covered. Beyond `max_values`
        timepoints per parcel a seeded subsample of timepoints is used so memory stays bounded.
        """
        recordings = list(recordings)
        if not recordings:
            raise ConfigError("cannot fit the scaler: no training recordings")
        n_parcels = recordings[0].shape[0]
        coverages = coverages or [np.ones(n_parcels, bool)] * len(recordings)
        total = sum(r.shape[1] for r in recordings)
        keep = min(1.0, max_values / max(total, 1))
        rng = np.random.default_rng(seed)
        parts = []
        for i, (x, cov) in enumerate(zip(recordings, coverages)):
            check_orientation(x, n_parcels, f"scaler fit, training recording {i}")
            cols = np.arange(x.shape[1]) if keep >= 1 else np.sort(
                rng.choice(x.shape[1], max(1, int(x.shape[1] * keep)), replace=False))
            block = np.asarray(x[:, cols], dtype=np.float32).copy()
            block[~cov] = np.nan
            parts.append(block)
        pooled = np.concatenate(parts, axis=1)
        with warnings.catch_warnings():  # parcels without any data: handled just below
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, median, q75 = np.nanpercentile(pooled, [25, 50, 75], axis=1)
        iqr = q75 - q25
        dead = ~np.isfinite(iqr) | (iqr <= 1e-12)
        median = np.where(np.isfinite(median), median, 0.0)
        iqr = np.where(dead, 1.0, iqr)
        meta = {"version": SCALER_VERSION, "method": "robust: (x - median) / IQR per parcel",
                "n_recordings": len(recordings), "n_parcels_without_data": int(dead.sum()),
                **meta}
        return cls(median.astype(np.float32), iqr.astype(np.float32), meta, ~dead)

    def transform(self, x: np.ndarray, coverage: np.ndarray | None = None) -> np.ndarray:
        """[P, T] -> scaled [P, T] float32. Parcels without coverage in this recording, or
        without any training data, become 0 (the typical value): no statistics, no signal."""
        check_orientation(x, self.n_parcels, "scaler transform")
        y = (x - self.median[:, None]) / self.iqr[:, None]
        if coverage is not None:
            y[~coverage] = 0.0
        if self.has_data is not None:
            y[~self.has_data] = 0.0
        return y.astype(np.float32, copy=False)

    def inverse_transform(self, y: np.ndarray) -> np.ndarray:
        check_orientation(y, self.n_parcels, "scaler inverse transform")
        return y * self.iqr[:, None] + self.median[:, None]

    def check_compatible(self, atlas_hash: str | None = None, tr: float | None = None,
                         n_parcels: int | None = None) -> None:
        """Refuse to scale data from another atlas or TR than the statistics came from."""
        if n_parcels is not None and n_parcels != self.n_parcels:
            raise ConfigError(f"scaler has {self.n_parcels} parcels, data have {n_parcels}")
        if atlas_hash and self.meta.get("atlas_hash") and atlas_hash != self.meta["atlas_hash"]:
            raise ConfigError(f"scaler was fitted on atlas {self.meta['atlas_hash']}, data use "
                              f"atlas {atlas_hash}")
        if tr and self.meta.get("tr") and abs(float(tr) - float(self.meta["tr"])) > 1e-6:
            raise ConfigError(f"scaler was fitted at TR {self.meta['tr']} s, data are at {tr} s")

    def save(self, path) -> None:
        from safetensors.numpy import save_file

        from ..fileio import atomic_path

        # one metadata entry: safetensors writes several in hash-map order, so the same scaler
        # would give different bytes (and DVC hashes) on every save
        meta = {_META_KEY: json.dumps(self.meta, sort_keys=True)}
        with atomic_path(path) as tmp:
            has_data = np.ones(self.n_parcels, bool) if self.has_data is None else self.has_data
            save_file({"median": self.median, "iqr": self.iqr,
                       "has_data": has_data.astype(np.uint8)}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path) -> "RobustScaler":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
            meta = json.loads(raw[_META_KEY]) if _META_KEY in raw else \
                {k: json.loads(v) for k, v in raw.items()}  # files written before 0.1.1
            return cls(f.get_tensor("median"), f.get_tensor("iqr"), meta,
                       f.get_tensor("has_data").astype(bool))
