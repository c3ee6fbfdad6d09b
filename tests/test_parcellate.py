"""Parcellation: real nibabel data, painted signals, both engines, TR resampling, caching."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from brainlm.data import parcellate as pc
from brainlm.data.ingest import Recording
from brainlm.data.parcellate import ParcellationSettings

FUNCTIONAL = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "functional.nii")


def test_nibabel_functional_parcellates_to_424_by_20(atlas):
    info = pc.read_nifti_info(FUNCTIONAL)
    assert info.tr == pytest.approx(2.0)
    signals, covered = pc.extract_fast(info, atlas)
    assert signals.shape == (atlas.n_parcels, 20) == (424, 20)
    assert covered.sum() > 60
    assert np.all(signals[~covered] == 0)
    assert np.all(signals[covered].std(axis=1) > 0)


def test_engines_agree_on_real_data(atlas):
    info = pc.read_nifti_info(FUNCTIONAL)
    fast, cov_fast = pc.extract_fast(info, atlas)
    ref, cov_ref = pc.extract_nilearn(info, atlas)
    both = cov_fast & cov_ref
    assert both.sum() > 60
    r = [np.corrcoef(fast[i], ref[i])[0, 1] for i in np.nonzero(both)[0]]
    # nilearn averages zero-filled voxels outside the field of view and uses cubic splines;
    # the time courses still agree closely.
    assert np.median(r) > 0.98


@pytest.mark.parametrize("step", [1, 2])
def test_painted_signals_come_back(atlas, painter, tmp_path, step):
    rng = np.random.default_rng(step)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 24))).astype(np.float32)
    path = painter(atlas, signals, tmp_path / "painted.nii.gz", step=step)
    got, covered = pc.extract_fast(pc.read_nifti_info(path), atlas)
    assert got.shape == signals.shape
    r = np.array([np.corrcoef(got[i], signals[i])[0, 1] for i in np.nonzero(covered)[0]])
    if step == 1:
        assert covered.all()
        assert np.all(r > 0.999)
        np.testing.assert_allclose(got, signals, rtol=1e-5)
    else:  # a coarser grid: parcels blur into neighbours but most still come back
        assert covered.mean() > 0.95
        assert np.median(r) > 0.99


def test_nilearn_engine_recovers_painted_signals(atlas, painter, tmp_path):
    rng = np.random.default_rng(3)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 12))).astype(np.float32)
    path = painter(atlas, signals, tmp_path / "painted.nii.gz")
    got, covered = pc.extract_nilearn(pc.read_nifti_info(path), atlas)
    assert covered.all()
    r = np.array([np.corrcoef(got[i], signals[i])[0, 1] for i in range(atlas.n_parcels)])
    assert np.all(r > 0.99)


def test_int16_with_scaling_and_brain_mask(atlas, painter, tmp_path):
    """Stored as int16 with slope/intercept; voxels that are exactly zero (outside the data's
    brain mask) are left out of the parcel mean instead of dragging it towards zero."""
    rng = np.random.default_rng(4)
    signals = (1 + 0.02 * rng.standard_normal((atlas.n_parcels, 10))).astype(np.float32)
    path = painter(atlas, signals, tmp_path / "int.nii", dtype=np.int16)
    info = pc.read_nifti_info(path)
    assert info.dtype == np.int16 and info.slope != 1.0
    got, covered = pc.extract_fast(info, atlas)
    assert covered.all()
    np.testing.assert_allclose(got, signals, atol=info.slope)


def test_resample_tr_keeps_span_and_slow_signal():
    t_src = np.arange(300) * 2.0
    slow = np.sin(2 * np.pi * 0.02 * t_src)[None, :].astype(np.float32)
    out = pc.resample_tr(slow, 2.0, 0.735)
    assert out.shape == (1, pc.expected_length(300, 2.0, 0.735))
    t_new = np.arange(out.shape[1]) * 0.735
    assert t_new[-1] <= t_src[-1] + 1e-9
    np.testing.assert_allclose(out[0], np.sin(2 * np.pi * 0.02 * t_new), atol=1e-3)
    # to a longer TR a fast component above the new Nyquist is removed, not aliased
    t_fast = np.arange(2000) * 0.5
    x = (np.sin(2 * np.pi * 0.05 * t_fast) + np.sin(2 * np.pi * 0.9 * t_fast))[None, :]
    down = pc.resample_tr(x, 0.5, 0.735)
    t_down = np.arange(down.shape[1]) * 0.735
    err = down[0, 50:-50] - np.sin(2 * np.pi * 0.05 * t_down)[50:-50]
    assert np.abs(err).max() < 0.05
    np.testing.assert_array_equal(pc.resample_tr(slow, 0.735, 0.735), slow)


def test_cleaning_psc_and_confounds(atlas):
    rng = np.random.default_rng(0)
    n_t = 200
    drift = np.linspace(0, 50, n_t)
    motion = rng.standard_normal(n_t)
    x = 10000 + drift + 30 * rng.standard_normal((atlas.n_parcels, n_t)) + 40 * motion
    cov = np.ones(atlas.n_parcels, bool)
    cov[:3] = False
    settings = ParcellationSettings()
    y = pc.clean(x.astype(np.float32), cov, 0.735, settings, confounds=motion[:, None])
    assert np.all(y[~cov] == 0)
    assert np.abs(y[cov].mean(axis=1)).max() < 1e-3  # detrended
    assert 0.2 < np.median(y[cov].std(axis=1)) < 0.4  # ~0.3 % signal change
    assert abs(np.corrcoef(y[5], motion)[0, 1]) < 0.05  # confound regressed out


def test_parcellate_recording_caches_by_input_hash(atlas, painter, tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 40))).astype(np.float32)
    path = painter(atlas, signals, tmp_path / "sub-01_bold.nii.gz", step=2)
    rec = Recording(path=path, subject="sub-01")
    settings = ParcellationSettings(min_timepoints=30)
    calls = []
    real = pc.extract_fast
    monkeypatch.setattr(pc, "extract_fast", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = pc.parcellate_recording(rec, atlas, settings, cache_dir=tmp_path / "cache")
    second = pc.parcellate_recording(rec, atlas, settings, cache_dir=tmp_path / "cache")
    assert len(calls) == 1
    np.testing.assert_array_equal(first.signals, second.signals)
    assert first.source_hash == second.source_hash
    # other settings, other key
    pc.parcellate_recording(rec, atlas, ParcellationSettings(min_timepoints=30, detrend=False,
                                                             standardize="none"),
                            cache_dir=tmp_path / "cache")
    assert len(calls) == 2
    # a changed file is a new input
    painter(atlas, signals + 1, path, step=2)
    pc.parcellate_recording(rec, atlas, settings, cache_dir=tmp_path / "cache")
    assert len(calls) == 3


def test_a_small_signal_on_a_large_offset_keeps_its_digits(atlas, painter, tmp_path):
    """float64 recordings in raw scanner units: extraction accumulates in float64, so the
    signal survives until cleaning removes the offset (in float32 it kept r ~ 0.7)."""
    rng = np.random.default_rng(6)
    small = 0.01 * rng.standard_normal((atlas.n_parcels, 30))
    path = painter(atlas, 1e6 + small, tmp_path / "big.nii.gz", dtype=np.float64)
    got, covered = pc.extract_fast(pc.read_nifti_info(path), atlas)
    assert covered.all() and got.dtype == np.float64
    r = [np.corrcoef(got[i] - got[i].mean(), small[i])[0, 1] for i in range(atlas.n_parcels)]
    assert np.min(r) > 0.999
    result = pc.parcellate_recording(Recording(path=path, subject="sub-01"), atlas,
                                     ParcellationSettings(min_timepoints=20, detrend=False))
    r = [np.corrcoef(result.signals[i], small[i])[0, 1] for i in range(atlas.n_parcels)]
    assert np.median(r) > 0.999


def test_a_parcel_zeroed_or_constant_in_a_recording_is_not_covered(atlas, painter, tmp_path):
    """A parcel whose voxels are all zero is not filled from the neighbours its border
    interpolates from, and one constant in time carries no signal: both are reported as not
    covered (the scaler and the store treat them as missing), the others are unchanged."""
    rng = np.random.default_rng(7)
    signals = 10000 + 30 * rng.standard_normal((atlas.n_parcels, 40))
    zeroed, flat = 5, 9
    signals[zeroed] = 0.0
    signals[flat] = 10000.0
    path = painter(atlas, signals, tmp_path / "sub-01_bold.nii.gz", step=2)
    got, covered = pc.extract_fast(pc.read_nifti_info(path), atlas)
    assert not covered[zeroed] and np.all(got[zeroed] == 0)
    result = pc.parcellate_recording(Recording(path=path, subject="sub-01"), atlas,
                                     ParcellationSettings(min_timepoints=30),
                                     cache_dir=tmp_path / "cache")
    assert not result.coverage[zeroed] and not result.coverage[flat]
    assert result.coverage.sum() >= atlas.n_parcels * 0.95 - 2
    # already parcellated tables: a constant column is not covered either
    table = tmp_path / "sub-02_timeseries.npy"
    np.save(table, signals.T.astype(np.float32))
    tabled = pc.parcellate_recording(Recording(path=table, subject="sub-02", kind="timeseries",
                                               tr=0.735), atlas,
                                     ParcellationSettings(min_timepoints=30))
    assert not tabled.coverage[flat] and not tabled.coverage[zeroed]
    assert tabled.coverage.sum() == atlas.n_parcels - 2
    again = pc.parcellate_recording(Recording(path=path, subject="sub-01"), atlas,
                                    ParcellationSettings(min_timepoints=30),
                                    cache_dir=tmp_path / "cache")  # from the cache: the same
    np.testing.assert_array_equal(again.coverage, result.coverage)
