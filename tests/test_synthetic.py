"""Synthetic cohort: BOLD-like statistics, determinism, real phenotype effects, BIDS output."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import signal as sps
from scipy.stats import spearmanr

from brainlm.data.synthetic import (SimParams, SyntheticCohort, canonical_hrf, coarse_grid,
                                    make_modules, signal_statistics, simulate_cohort, write_bids)
from brainlm.errors import ConfigError

RANGES = {"lag1": (0.55, 0.85), "mean_fc": (0.15, 0.45), "band_power": (0.4, 0.8)}
# single subjects spread wider in mean FC: the planted age effect moves global coupling
# (x0.25 at 20 to x1.75 at 80 years), so the oldest and youngest sit near the cohort's edges
SUBJECT_RANGES = {**RANGES, "mean_fc": (0.1, 0.5)}


@pytest.fixture(scope="module")
def cohort40(atlas) -> SyntheticCohort:
    return simulate_cohort(atlas.coords, 40, 500, tr=0.735, seed=2)


# ----------------------------------------------------------------------------- statistics


def _assert_in_ranges(stats: dict, where: str, ranges=RANGES):
    for key, (lo, hi) in ranges.items():
        assert lo <= stats[key] <= hi, f"{where}: {key}={stats[key]:.3f} not in [{lo}, {hi}]"


def test_statistics_in_range_each_subject(cohort40):
    for i, x in enumerate(cohort40.signals[:10]):
        _assert_in_ranges(signal_statistics(x, 0.735), f"subject {i}", SUBJECT_RANGES)


@pytest.mark.parametrize("tr,n_time", [(2.0, 500), (2.0, 200), (0.735, 200), (0.735, 1200)])
def test_statistics_hold_at_other_lengths_and_tr(atlas, tr, n_time):
    cohort = simulate_cohort(atlas.coords, 5, n_time, tr=tr, seed=5)
    stats = [signal_statistics(x, tr) for x in cohort.signals]
    _assert_in_ranges({k: float(np.mean([s[k] for s in stats])) for k in RANGES},
                      f"mean of 5 at TR {tr}, T {n_time}")
    if n_time >= 500:
        for i, s in enumerate(stats):
            _assert_in_ranges(s, f"subject {i} at TR {tr}, T {n_time}", SUBJECT_RANGES)


def test_signal_statistics_on_known_series():
    rng = np.random.default_rng(0)
    white = rng.standard_normal((20, 4000))
    s = signal_statistics(white, 0.735)
    assert abs(s["lag1"]) < 0.03 and abs(s["mean_fc"]) < 0.01
    assert s["band_power"] == pytest.approx(0.09 / (0.5 / 0.735), abs=0.02)  # flat spectrum
    common = rng.standard_normal(4000)
    s = signal_statistics(white + 3 * common, 0.735)
    assert s["mean_fc"] == pytest.approx(0.9, abs=0.02)
    t = np.arange(4000) * 0.735
    slow = np.sin(2 * np.pi * 0.05 * t)[None, :] + 0.01 * white  # in band, smooth
    s = signal_statistics(slow, 0.735)
    assert s["band_power"] > 0.95 and s["lag1"] > 0.95


# ----------------------------------------------------------------------------- determinism


def test_deterministic_and_independent_of_cohort_size(atlas):
    c = atlas.coords
    a = simulate_cohort(c, 3, 60, seed=4)
    b = simulate_cohort(c, 3, 60, seed=4)
    np.testing.assert_array_equal(a.signals, b.signals)
    pd.testing.assert_frame_equal(a.participants, b.participants)
    other = simulate_cohort(c, 3, 60, seed=5)
    assert not np.allclose(a.signals, other.signals)
    bigger = simulate_cohort(c, 5, 60, seed=4)
    np.testing.assert_array_equal(bigger.signals[:3], a.signals)
    pd.testing.assert_frame_equal(bigger.participants.iloc[:3], a.participants)
    assert not np.allclose(bigger.signals[3], bigger.signals[4])


def test_participants_table(cohort40):
    ph = cohort40.participants
    assert list(ph.columns[:4]) == ["participant_id", "age", "sex", "symptom"]
    assert ph.participant_id.tolist()[:3] == ["sub-001", "sub-002", "sub-003"]
    assert ph.participant_id.is_unique
    assert ph.age.between(20, 80).all() and ph.age.std() > 10
    assert set(ph.sex) == {"F", "M"}
    assert abs(ph.symptom.mean()) < 0.6 and 0.5 < ph.symptom.std() < 1.5
    json.dumps(cohort40.effects)  # must serialise as is
    assert len(cohort40.truth) == 40


def test_raw_intensities_look_like_bold(cohort40):
    x = cohort40.signals
    assert x.dtype == np.float32 and x.shape == (40, len(cohort40.modules), 500)
    assert np.all(np.isfinite(x))
    assert 9000 < np.median(x) < 11000
    baseline = x.mean(axis=2)
    fluct = sps.detrend(x[:8].astype(np.float64), axis=2).std(axis=2) / baseline[:8]
    assert 0.001 < np.median(fluct) < 0.01
    assert 0.002 < np.median(fluct) < 0.004  # ~0.3 %


def test_hrf_shape():
    h = canonical_hrf(0.735)
    t = np.arange(len(h)) * 0.735
    assert h.sum() == pytest.approx(1.0)
    assert 4.0 < t[h.argmax()] < 6.5  # peak ~5 s
    assert h[t > 10].min() < 0  # undershoot
    assert len(canonical_hrf(2.0)) == 17


# ----------------------------------------------------------------------------- structure


def test_modules_are_bilateral_long_range_and_visible_in_fc(atlas, cohort40):
    coords = atlas.coords
    mods = cohort40.modules
    np.testing.assert_array_equal(mods, make_modules(coords, 7))  # depends on coords only
    assert set(mods.tolist()) == set(range(7))
    for k in range(7):
        xyz = coords[mods == k]
        assert (xyz[:, 0] < 0).any() and (xyz[:, 0] > 0).any(), f"module {k} not bilateral"
        assert np.ptp(xyz[:, 1]) > 50, f"module {k} does not span distant regions"
    d = sps.detrend(cohort40.signals[0].astype(np.float64), axis=1)
    fc = np.corrcoef(d)
    same = mods[:, None] == mods[None, :]
    off = ~np.eye(len(mods), dtype=bool)
    assert fc[same & off].mean() > fc[~same].mean() + 0.1


def test_any_coordinates_and_module_count():
    rng = np.random.default_rng(1)
    coords = rng.uniform(-60, 60, size=(40, 3))
    c = simulate_cohort(coords, 2, 100, tr=1.5, seed=0, n_modules=3)
    assert c.signals.shape == (2, 40, 100)
    assert set(c.modules.tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError):
        simulate_cohort(coords[:5], 1, 100, n_modules=3)
    with pytest.raises(ConfigError):
        simulate_cohort(coords.T, 1, 100)


# ----------------------------------------------------------------------------- effects


def _features(cohort: SyntheticCohort, tr: float) -> dict[str, np.ndarray]:
    """Per-subject features computed from the signals only (no internal parameters)."""
    mods = cohort.modules
    eff = cohort.effects
    same = mods[:, None] == mods[None, :]
    off = ~np.eye(len(mods), dtype=bool)
    in_sex = mods == eff["sex"]["module"]
    in_sym = mods == eff["symptom"]["module"]
    lag = int(round(3.0 / tr))
    out = {"age": [], "sex": [], "symptom": []}
    for x in cohort.signals:
        d = sps.detrend(x.astype(np.float64), axis=1)
        sd = d.std(axis=1)
        fc = np.corrcoef(d)
        out["age"].append(fc[same & off].mean() - fc[~same].mean())
        out["sex"].append(np.log(sd[in_sex]).mean() - np.log(sd[~in_sex]).mean())
        z = d / sd[:, None]
        m, g = z[in_sym].mean(0), z.mean(0)
        r = m - g * (m @ g) / (g @ g)  # the module's own signal, global mean removed
        out["symptom"].append((r[lag:] * r[:-lag]).sum() / (r @ r))
    return {k: np.asarray(v) for k, v in out.items()}


def _effect_correlations(cohort):
    f = _features(cohort, cohort.tr)
    ph = cohort.participants
    return {"age": spearmanr(ph.age, f["age"])[0],
            "sex": spearmanr((ph.sex == "M").astype(float), f["sex"])[0],
            "symptom": spearmanr(ph.symptom, f["symptom"])[0]}


def test_phenotype_effects_are_real(cohort40):
    r = _effect_correlations(cohort40)
    assert cohort40.effects["age"]["sign"] == -1
    assert r["age"] < -0.4, r  # older -> weaker within-module coupling
    assert r["sex"] > 0.4, r  # M -> larger amplitude in the sex module
    assert r["symptom"] > 0.35, r  # higher score -> slower dynamics in the symptom module


def test_effects_vanish_when_switched_off(atlas):
    null = SimParams(age_coupling_per_decade=0.0, age_global_per_decade=0.0,
                     sex_amplitude_ratio=1.0, sex_between_coupling=0.0, symptom_log_tau=0.0)
    cohort = simulate_cohort(atlas.coords, 40, 300, tr=0.735, seed=2, params=null)
    r = _effect_correlations(cohort)
    assert all(abs(v) < 0.45 for v in r.values()), r  # chance level for 40 subjects
    assert cohort.effects["sex"]["ratio_M_over_F"] == 1.0


# ----------------------------------------------------------------------------- BIDS


def test_write_bids_4mm(atlas, tmp_path):
    cohort = simulate_cohort(atlas.coords, 2, 20, tr=0.735, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # A424's one-voxel parcel has no 4 mm voxel
        paths = write_bids(cohort, atlas, tmp_path / "bids", tr=0.735)
    root = tmp_path / "bids"
    assert [p.name for p in paths] == ["sub-001_task-rest_bold.nii.gz",
                                       "sub-002_task-rest_bold.nii.gz"]
    assert paths[0] == root / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz"
    expected_shape = tuple(-(-n // 2) for n in atlas.shape) + (20,)
    affine = atlas.affine.copy()
    affine[:3, :3] *= 2
    for p in paths:
        img = nib.load(p)
        assert img.shape == expected_shape
        assert img.header.get_zooms()[3] == pytest.approx(0.735)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        assert img.get_data_dtype() == np.int16 and img.dataobj.slope == 1.0
        assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-4)
        data = np.asarray(img.dataobj)
        labels, _ = coarse_grid(atlas, 4.0)
        assert np.all(data[labels == 0] == 0)
        assert 9000 < np.median(data[labels > 0]) < 11000
        sidecar = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["RepetitionTime"] == pytest.approx(0.735)
    tsv = pd.read_csv(root / "participants.tsv", sep="\t")
    assert tsv.columns[0] == "participant_id"
    assert tsv.participant_id.tolist() == cohort.participants.participant_id.tolist()
    np.testing.assert_allclose(tsv.age, cohort.participants.age)
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.9.0" and desc["DatasetType"] == "raw" and desc["Name"]
    truth = json.loads((root / "ground_truth.json").read_text())
    assert truth["modules"] == cohort.modules.tolist()
    assert truth["atlas"] == {"name": atlas.name, "hash": atlas.hash}
    assert truth["tr"] == 0.735 and truth["seed"] == 3
    assert truth["effects"]["sex"]["module"] == cohort.effects["sex"]["module"]
    # planted sizes and the controls they promise, stated in plain numbers
    eff = truth["effects"]
    assert "x1.75 at 20 and x0.25 at 80" in eff["age"]["size"]
    assert eff["sex"]["source_correlation"] == pytest.approx(np.sqrt(0.4))
    assert eff["sex"]["pairs_coupled_in_M"] == [[0, 6], [1, 3]]
    assert eff["positive_controls"]["age"]["metric"] == "r2"
    assert eff["positive_controls"]["age"]["threshold"] == 0.5
    assert eff["positive_controls"]["sex"]["threshold"] == 0.8
    assert eff["positive_controls"]["symptom"] is None
    assert not list(root.rglob("*.part"))  # atomic writes leave no temporaries


def test_write_bids_2mm_recovers_parcel_signals(atlas, tmp_path):
    cohort = simulate_cohort(atlas.coords, 2, 30, tr=0.735, seed=6)
    paths = write_bids(cohort, atlas, tmp_path, tr=0.735, voxel_size=2.0)
    labels = atlas.labels
    inside = labels > 0
    index = np.searchsorted(atlas.label_values, labels[inside])
    counts = np.bincount(index, minlength=atlas.n_parcels)
    for i, p in enumerate(paths):
        img = nib.load(p)
        np.testing.assert_allclose(img.affine, atlas.affine)
        vox = np.asarray(img.dataobj)[inside].astype(np.float64)  # [V, T]
        sums = np.stack([np.bincount(index, weights=vox[:, t], minlength=len(counts))
                         for t in range(vox.shape[1])], axis=1)
        means = sums / counts[:, None]
        sig = cohort.signals[i].astype(np.float64)
        mc = means - means.mean(1, keepdims=True)
        sc = sig - sig.mean(1, keepdims=True)
        r = (mc * sc).sum(1) / np.sqrt((mc ** 2).sum(1) * (sc ** 2).sum(1))
        assert r.min() > 0.99, f"subject {i}: worst parcel r={r.min():.4f}"
        assert np.abs(means - sig).max() < 5  # rounding + small voxel noise only


def test_write_bids_float32_and_bad_voxel_size(atlas, tmp_path):
    cohort = simulate_cohort(atlas.coords, 1, 5, tr=2.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (path,) = write_bids(cohort, atlas, tmp_path, tr=2.0, voxel_size=6.0,
                             dtype="float32")
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    assert img.header.get_zooms() == pytest.approx((6.0, 6.0, 6.0, 2.0))
    with pytest.raises(ConfigError):
        write_bids(cohort, atlas, tmp_path / "x", tr=2.0, voxel_size=3.0)


def test_written_dataset_is_byte_identical_across_runs(atlas, tmp_path):
    """DVC and the parcellation cache key on file hashes: the same cohort must give the same
    bytes wherever and whenever it is written (no time stamp or temp name in the gzip)."""
    cohort = simulate_cohort(atlas.coords, 2, 12, tr=0.735, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = write_bids(cohort, atlas, tmp_path / "a", voxel_size=8.0)
        b = write_bids(cohort, atlas, tmp_path / "elsewhere" / "b", voxel_size=8.0)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    for name in ("participants.tsv", "ground_truth.json", "dataset_description.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "elsewhere" / "b" /
                                                        name).read_bytes()


# ----------------------------------------------------------------------------- positive controls


def test_positive_controls_pass_on_the_demo_cohort(atlas):
    """The demo profile's cohort as params.yaml sets it (80 x 200 TRs, seed 0, split
    0.5/0.2/0.3 by subject, seed 0): FC + linear must find the planted age and sex effects on
    the 24 test subjects, decided on the interval (lower bound above chance), and the age
    interval is at most 0.5 wide (benchmarks/control_sweep.py sweeps seeds 0-9)."""
    from pathlib import Path

    import yaml

    from brainlm.evaluate import synthetic_control_scores

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    synth, pre = demo["demo"]["synth"], demo["demo"]["preprocess"]
    cohort = simulate_cohort(atlas.coords, synth["subjects"], synth["timepoints"],
                             tr=pre["tr"], seed=synth["seed"])
    scores = synthetic_control_scores(cohort, tuple(pre["split"]), pre["seed"], n_boot=500)
    assert scores["age"]["n_train"] == 40 and scores["age"]["n_test"] == 24
    assert scores["age"]["value"] >= 0.5 and scores["age"]["low"] > 0, scores
    assert scores["age"]["passed"] and scores["age"]["width"] <= 0.5, scores
    assert scores["sex"]["value"] >= 0.8 and scores["sex"]["low"] > 0.5, scores
    assert scores["sex"]["passed"], scores
    assert scores["age"]["floor"] < 0.1 and scores["sex"]["floor"] == pytest.approx(0.5)


def test_positive_controls_fail_without_planted_effects(atlas):
    """A cohort with the effects switched off (40 x 300, split 0.6/0.2/0.2: smaller than the
    demo's, so quicker): the control must not pass (it measures the planted effect, not
    something any cohort gives)."""
    from brainlm.evaluate import synthetic_control_scores

    null = SimParams(age_coupling_per_decade=0.0, age_global_per_decade=0.0,
                     sex_amplitude_ratio=1.0, sex_between_coupling=0.0)
    scores = synthetic_control_scores(simulate_cohort(atlas.coords, 40, 300, tr=0.735, seed=0,
                                                      params=null), n_boot=200)
    assert scores["age"]["value"] < 0.3 and not scores["age"]["passed"], scores
    assert not scores["sex"]["passed"], scores


def test_realism_statistics_in_published_ranges(atlas):
    """benchmarks/synthetic_realism.py: the demo-shaped cohort's lag-1, FC distribution, global
    signal share and band power sit inside the typical resting-state ranges it cites."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_realism.py"
    spec = importlib.util.spec_from_file_location("synthetic_realism", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cohort = simulate_cohort(atlas.coords, 12, 300, tr=0.735, seed=7)
    stats = [signal_statistics(x, 0.735) for x in cohort.signals]
    for key, ((lo, hi), _) in mod.REFERENCE.items():
        mean = float(np.mean([s[key] for s in stats]))
        assert lo <= mean <= hi, (key, mean)
    white = signal_statistics(np.random.default_rng(0).normal(size=(50, 2000)), 0.735)
    assert abs(white["lag1"]) < 0.05 and white["gs_share"] < 0.05  # the measures measure
