"""Splits, scaler, store and windows: the leakage and orientation guarantees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainlm.data.parcellate import ParcellationSettings, clean
from brainlm.data.pipeline import PreprocessConfig, run_preprocess
from brainlm.data.scale import RobustScaler
from brainlm.data.split import assign_splits
from brainlm.data.store import BrainStore, WindowDataset
from brainlm.errors import ConfigError, OrientationError, check_orientation


def test_splits_are_by_subject_deterministic_and_order_free():
    subjects = [f"sub-{i:03d}" for i in range(50)]
    a = assign_splits(subjects, seed=1)
    b = assign_splits(list(reversed(subjects)), seed=1)
    assert a == b
    counts = pd.Series(a).value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (40, 5, 5)
    assert assign_splits(subjects, seed=2) != a
    # adding subjects moves few of the existing ones
    c = assign_splits(subjects + [f"sub-{i:03d}" for i in range(50, 55)], seed=1)
    moved = sum(a[s] != c[s] for s in subjects)
    assert moved <= 6


def test_small_cohorts_still_get_every_split_and_fixed_splits_win():
    a = assign_splits(["sub-1", "sub-2", "sub-3"], seed=0)
    assert sorted(a.values()) == ["test", "train", "val"]
    fixed = assign_splits([f"sub-{i}" for i in range(10)], fixed={"sub-0": "test"})
    assert fixed["sub-0"] == "test"
    with pytest.raises(ConfigError, match="summing to 1"):
        assign_splits(["sub-1"], fractions=(0.5, 0.5, 0.5))


def test_scaler_statistics_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = [rng.normal(5.0, 2.0, size=(6, 400)).astype(np.float32) for _ in range(3)]
    cov = [np.ones(6, bool) for _ in x]
    cov[0][2] = False
    scaler = RobustScaler.fit(x, cov, atlas_hash="abc", tr=0.735)
    pooled = np.concatenate(x, axis=1)
    full = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(scaler.median[full], np.median(pooled, axis=1)[full], rtol=1e-5)
    q = np.percentile(pooled, [25, 75], axis=1)
    np.testing.assert_allclose(scaler.iqr[full], (q[1] - q[0])[full], rtol=1e-5)
    # parcel 2 is pooled over the two recordings where it was covered only
    np.testing.assert_allclose(scaler.median[2], np.median(np.concatenate([x[1][2], x[2][2]])),
                               rtol=1e-5)
    y = scaler.transform(x[1])
    assert abs(float(np.median(y))) < 0.1
    np.testing.assert_allclose(scaler.inverse_transform(y), x[1], rtol=1e-5)
    scaler.save(tmp_path / "s.safetensors")
    back = RobustScaler.load(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(back.median, scaler.median)
    assert back.meta["atlas_hash"] == "abc" and back.meta["tr"] == 0.735
    # the same scaler gives the same bytes on every save (DVC hashes the store)
    first = (tmp_path / "s.safetensors").read_bytes()
    for i in range(5):
        scaler.save(tmp_path / f"again{i}.safetensors")
        assert (tmp_path / f"again{i}.safetensors").read_bytes() == first
    # files from before the single metadata entry still load
    from safetensors.numpy import save_file

    save_file({"median": scaler.median, "iqr": scaler.iqr,
               "has_data": np.ones(6, np.uint8)}, str(tmp_path / "old.safetensors"),
              metadata={"atlas_hash": '"abc"', "tr": "0.735"})
    assert RobustScaler.load(tmp_path / "old.safetensors").meta == {"atlas_hash": "abc",
                                                                     "tr": 0.735}
    with pytest.raises(ConfigError, match="atlas"):
        back.check_compatible(atlas_hash="other")
    with pytest.raises(ConfigError, match="TR"):
        back.check_compatible(tr=2.0)
    with pytest.raises(OrientationError, match="transposed"):
        scaler.transform(x[1].T)


def test_orientation_check_names_the_place():
    check_orientation(np.zeros((4, 10)), 4, "here")
    with pytest.raises(OrientationError, match="somewhere.*transposed"):
        check_orientation(np.zeros((10, 4)), 4, "somewhere")
    with pytest.raises(OrientationError, match="2-D"):
        check_orientation(np.zeros(4), 4, "x")


def _write_tables(root, atlas, n_subjects, n_t=80, sessions=1, seed=0, shift=None):
    """Already-parcellated tables (time x parcels), with subject-specific offsets so a scaler
    fitted on the wrong subjects would show."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        sub = f"sub-{i:03d}"
        level = 100.0 + (shift(i) if shift else 0.0)
        for ses in range(sessions):
            folder = root / sub / f"ses-{ses}" / "func"
            folder.mkdir(parents=True, exist_ok=True)
            x = level + rng.standard_normal((n_t, atlas.n_parcels))
            np.save(folder / f"{sub}_ses-{ses}_task-rest_timeseries.npy", x.astype(np.float32))
        rows.append({"participant_id": sub, "age": 20 + i})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)


@pytest.fixture
def table_store(tmp_path, atlas, atlas_spec):
    raw = tmp_path / "raw"
    _write_tables(raw, atlas, 20, sessions=2)
    cfg = PreprocessConfig(inputs=[raw], out=tmp_path / "store", atlas=atlas_spec,
                           input_tr=0.735, progress=False, cache_dir=tmp_path / "cache")
    cfg.settings = ParcellationSettings(min_timepoints=50, standardize="none")
    summary = run_preprocess(cfg)
    return BrainStore(tmp_path / "store"), summary, raw


def test_no_subject_on_two_sides_and_sessions_stay_together(table_store):
    store, summary, _ = table_store
    kept = store.recordings()
    assert len(kept) == 40
    sides = kept.groupby("subject")["split"].nunique()
    assert (sides == 1).all()
    assert summary.per_split["train"] == (16, 32)
    assert set(kept["split"]) == {"train", "val", "test"}
    assert kept["age"].notna().all()


def test_store_roundtrip_matches_scaled_input(table_store):
    store, _, raw = table_store
    scaler = store.scaler()
    row = store.recordings("val").iloc[0]
    source = np.load(row["source_path"]).T  # time x parcels on disk
    expected = clean(source, np.ones(store.n_parcels, bool), 0.735,
                     ParcellationSettings(standardize="none"))
    np.testing.assert_allclose(store.load(row), scaler.transform(expected), atol=1e-4)
    assert store.coords.shape == (store.n_parcels, 3)
    assert store.tr == pytest.approx(0.735)


def test_scaler_sees_only_training_subjects(tmp_path, atlas, atlas_spec):
    """Subjects sit at very different levels (no detrending here), so statistics that had
    seen a validation or test subject would differ from a fit on the training rows alone."""
    raw = tmp_path / "raw"
    _write_tables(raw, atlas, 10, shift=lambda i: 50.0 * i)
    cfg = PreprocessConfig(inputs=[raw], out=tmp_path / "store", atlas=atlas_spec,
                           input_tr=0.735, progress=False, cache_dir=tmp_path / "cache")
    cfg.settings = ParcellationSettings(min_timepoints=50, standardize="none", detrend=False)
    run_preprocess(cfg)
    store = BrainStore(tmp_path / "store")
    scaler = store.scaler()
    train = store.recordings("train")
    assert scaler.meta["n_subjects"] == train["subject"].nunique() == 8
    raw_train = [np.load(p).T for p in train["source_path"]]
    refit = RobustScaler.fit(raw_train)
    np.testing.assert_allclose(scaler.median, refit.median, rtol=1e-5)
    np.testing.assert_allclose(scaler.iqr, refit.iqr, rtol=1e-5)
    everyone = RobustScaler.fit([np.load(p).T for p in store.recordings()["source_path"]])
    assert np.abs(scaler.median - everyone.median).min() > 5.0


def test_windows_random_reproducible_and_sliding_complete(table_store):
    store, _, _ = table_store
    ds = WindowDataset(store, "train", window=50, mode="random", seed=3)
    assert len(ds) == len(store.recordings("train"))
    a, b = ds[0], ds[0]
    assert a["signal"].shape == (store.n_parcels, 50) and a["signal"].dtype == np.float32
    assert a["start"] == b["start"]
    starts = {ds[i]["start"] for i in range(len(ds))}
    assert len(starts) > 1
    ds.set_epoch(1)
    assert [ds[i]["start"] for i in range(len(ds))] != [WindowDataset(
        store, "train", window=50, seed=3)[i]["start"] for i in range(len(ds))]
    full = store.load(store.recordings("train").iloc[a["recording"]])
    np.testing.assert_array_equal(a["signal"], full[:, a["start"]:a["start"] + 50])

    ev = WindowDataset(store, "test", window=20, mode="sliding", stride=20)
    per_rec = 80 // 20
    assert len(ev) == len(store.recordings("test")) * per_rec
    assert [ev[i]["start"] for i in range(per_rec)] == [0, 20, 40, 60]
    with pytest.raises(ConfigError, match="shorter than the window"):
        WindowDataset(store, "train", window=500)


def test_windows_feed_a_torch_dataloader(table_store):
    import torch
    from torch.utils.data import DataLoader

    store, _, _ = table_store
    ds = WindowDataset(store, "train", window=40, mode="random", windows_per_recording=2)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)))
    assert batch["signal"].shape == (4, store.n_parcels, 40)
    assert batch["signal"].dtype == torch.float32
    assert torch.isfinite(batch["signal"]).all()
