"""Signal cleaning and TR resampling of parcel time series ([parcels, time] arrays).

`clean` runs nilearn's signal cleaning (detrend, standardize, filters, confounds) on the
covered parcels; `resample_tr` moves a series to the target TR on the same time span (cubic
spline, low-passed first when the TR grows); `expected_length` is the length it will have.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .parcellate import ParcellationSettings


def expected_length(n: int, tr_source: float, tr_target: float) -> int:
    if abs(tr_source - tr_target) < 1e-6:
        return n
    return int(math.floor((n - 1) * tr_source / tr_target + 1e-9)) + 1


def resample_tr(signals: np.ndarray, tr_source: float, tr_target: float) -> np.ndarray:
    """[P, T] at tr_source -> [P, T'] at tr_target on the same time span.

    Cubic-spline interpolation; when going to a longer TR the series is first low-passed below
    the new Nyquist frequency so fast fluctuations do not alias.
    """
    from scipy.interpolate import make_interp_spline
    from scipy.signal import butter, sosfiltfilt

    if abs(tr_source - tr_target) < 1e-6:
        return signals.astype(np.float32, copy=False)
    n = signals.shape[1]
    x = signals.astype(np.float64)
    if tr_target > tr_source and n > 15:
        nyquist_new = 0.5 / tr_target
        sos = butter(5, 0.9 * nyquist_new, fs=1.0 / tr_source, output="sos")
        x = sosfiltfilt(sos, x, axis=1)
    t_src = np.arange(n) * tr_source
    t_new = np.arange(expected_length(n, tr_source, tr_target)) * tr_target
    spline = make_interp_spline(t_src, x, k=3 if n > 3 else 1, axis=1)
    return spline(t_new).astype(np.float32)


def clean(signals: np.ndarray, coverage: np.ndarray, tr: float, settings: ParcellationSettings,
          confounds: np.ndarray | None = None) -> np.ndarray:
    """nilearn's signal cleaning on covered parcels; uncovered stay 0."""
    from nilearn.signal import clean as nl_clean

    out = np.zeros_like(signals, dtype=np.float32)
    if not coverage.any():
        return out
    nyquist = 0.5 / tr
    for name, f in (("high_pass", settings.high_pass), ("low_pass", settings.low_pass)):
        if f is not None and f >= nyquist:
            raise ValueError(f"{name} {f:g} Hz is not below the Nyquist frequency {nyquist:.3f} Hz "
                             f"of this recording's TR ({tr:g} s)")
    standardize = {"psc": "psc", "zscore": "zscore_sample", "none": None}[settings.standardize]
    x = signals[coverage].T.astype(np.float64)  # nilearn wants [time, features]
    if not (settings.detrend or standardize or settings.high_pass or settings.low_pass
            or confounds is not None):
        return signals.astype(np.float32)
    if standardize == "psc" and np.any(np.abs(x.mean(axis=0)) < 1e-6):
        raise ValueError("percent signal change needs a non-zero baseline; the data look "
                         "already centred (use standardize='zscore' or 'none')")
    y = nl_clean(x, detrend=settings.detrend, standardize=standardize, confounds=confounds,
                 high_pass=settings.high_pass, low_pass=settings.low_pass, t_r=tr,
                 standardize_confounds=True)
    out[coverage] = y.T
    return out
