"""Discovery of recordings and phenotypes, other pipelines' tables, TR harmonisation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from brainlm.cli import main
from brainlm.data.ingest import attach_phenotypes, discover
from brainlm.data.store import BrainStore


def _touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bids_discovery_entities_sidecars_and_confounds(tmp_path):
    root = tmp_path / "bids"
    bold = _touch(root / "sub-01/ses-a/func/sub-01_ses-a_task-rest_run-2_bold.nii.gz")
    _touch(root / "sub-01/ses-a/func/sub-01_ses-a_task-rest_run-2_bold.json",
           json.dumps({"RepetitionTime": 0.8}))
    _touch(root / "sub-01/ses-a/func/sub-01_ses-a_task-rest_run-2_desc-confounds_timeseries.tsv")
    _touch(root / "sub-01/anat/sub-01_T1w.nii.gz")  # not functional: skipped
    _touch(root / "sub-02/func/sub-02_task-rest_bold.nii")
    _touch(root / "sub-02/func/sub-02_task-rest_bold.nii.gz")  # the same run twice
    _touch(root / "derivatives/fmriprep/sub-03/func/sub-03_task-rest_bold.nii.gz")
    recs = discover(root)
    assert [r.recording_id for r in recs] == ["sub-01_ses-a_task-rest_run-2",
                                              "sub-02_task-rest", "sub-02_task-rest"]
    first = recs[0]
    assert (first.subject, first.session, first.run, first.tr) == ("sub-01", "a", "2", 0.8)
    assert first.confounds.name.endswith("desc-confounds_timeseries.tsv")
    assert recs[1].problem is None and "duplicate recording" in recs[2].problem
    # an explicit file, and a TR given by the user beats the sidecar
    assert discover([bold], input_tr=2.0)[0].tr == 2.0


def test_participants_join_accepts_bare_ids_and_flags_unknown(tmp_path):
    root = tmp_path / "d"
    _touch(root / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    _touch(root / "sub-02/func/sub-02_task-rest_bold.nii.gz")
    pd.DataFrame({"participant_id": ["01"], "age": [33]}).to_csv(root / "participants.tsv",
                                                                 sep="\t", index=False)
    recs = discover(root)
    warnings = attach_phenotypes(recs, root / "participants.tsv")
    assert recs[0].phenotypes == {"age": 33}
    assert recs[1].phenotypes == {}
    assert len(warnings) == 2 and "sub-02 is not in" in warnings[1]
    assert "1 participant_id without the 'sub-' prefix read with it (01 as sub-01)" in warnings[0]


def test_xcpd_tables_with_own_coordinates_and_empty_parcels(tmp_path):
    """Another pipeline's output: 100 parcels, a header row, one parcel all NaN."""
    raw = tmp_path / "xcpd"
    raw.mkdir()
    rng = np.random.default_rng(0)
    names = [f"7Networks_{i}" for i in range(100)]
    for i in range(5):
        x = 100 + rng.standard_normal((300, 100))
        x[:, 7] = np.nan
        pd.DataFrame(x, columns=names).to_csv(
            raw / f"sub-{i}_task-rest_space-MNI_seg-Schaefer100_timeseries.tsv", sep="\t",
            index=False, na_rep="n/a")
        (raw / f"sub-{i}_task-rest_space-MNI_seg-Schaefer100_timeseries.json").write_text(
            json.dumps({"RepetitionTime": 2.0}))
    coords = rng.uniform(-60, 60, size=(100, 3)).round(1)
    pd.DataFrame(coords, columns=["x", "y", "z"]).to_csv(tmp_path / "coords.tsv", sep="\t",
                                                         index=False)
    out = tmp_path / "store"
    assert main(["preprocess", "--input", str(raw), "--out", str(out), "--coords",
                 str(tmp_path / "coords.tsv"), "--window", "200", "--no-progress"]) == 0
    store = BrainStore(out)
    assert store.n_parcels == 100
    np.testing.assert_allclose(store.coords, coords, atol=1e-4)
    rows = store.recordings()
    assert len(rows) == 5
    assert (rows["tr_source"] == 2.0).all() and (rows["tr"] == 0.735).all()
    # 300 volumes at 2 s span 598 s -> 814 samples at 0.735 s
    assert (rows["n_timepoints"] == 814).all()
    assert all(list(u) == [8] for u in rows["uncovered"])  # label 8 = the NaN column
    assert not store.parcels["has_data"].iloc[7] and store.parcels["has_data"].sum() == 99
    x = store.load(rows.iloc[0])
    assert np.all(x[7] == 0) and np.isfinite(x).all()


def test_confounds_are_found_and_regressed_in_the_pipeline(tmp_path, atlas, painter, atlas_spec,
                                                          capsys):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(1)
    motion = rng.standard_normal(60)
    for i in range(3):
        sig = 10000 + 30 * rng.standard_normal((atlas.n_parcels, 60)) + 200 * motion
        func = raw / f"sub-{i}" / "func"
        func.mkdir(parents=True)
        painter(atlas, sig.astype(np.float32), func / f"sub-{i}_task-rest_bold.nii.gz", step=4)
        pd.DataFrame({"trans_x": motion, "rot_z": rng.standard_normal(60)}).to_csv(
            func / f"sub-{i}_task-rest_desc-confounds_timeseries.tsv", sep="\t", index=False)
    args = ["preprocess", "--input", str(raw), "--atlas", atlas_spec, "--window", "50",
            "--no-progress", "--split", "1,0,0"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--out", str(tmp_path / "clean"), "--confounds", "trans_x"]) == 0

    def motion_r(folder):
        store = BrainStore(folder)
        x = store.load(store.recordings().iloc[0])
        return np.median([abs(np.corrcoef(row, motion)[0, 1]) for row in x if row.std() > 0])

    assert motion_r(tmp_path / "plain") > 0.8
    assert motion_r(tmp_path / "clean") < 0.05
    # asking for a column that is not there quarantines with the file named
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "bad"), "--confounds", "nope"]) == 2
    err = capsys.readouterr().err
    assert ("sub-0_task-rest_bold.nii.gz: confounds table "
            "sub-0_task-rest_desc-confounds_timeseries.tsv lacks columns: nope") in err
