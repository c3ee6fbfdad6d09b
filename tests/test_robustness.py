"""Inputs from real pipelines and the ways they go wrong (found in review)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainlm.cli import main
from brainlm.data import parcellate as pc
from brainlm.data.ingest import discover
from brainlm.data.scale import RobustScaler
from brainlm.data.split import assign_splits
from brainlm.data.store import BrainStore

T = 60


def _sig(atlas, seed, n_t=T):
    rng = np.random.default_rng(seed)
    return (10000 + 30 * rng.standard_normal((atlas.n_parcels, n_t))).astype(np.float32)


def _args(raw, out, atlas_spec, *extra):
    return ["preprocess", "--input", str(raw), "--out", str(out), "--window", "50",
            "--atlas", atlas_spec, "--no-progress", *extra]


def test_fmriprep_layout_keeps_the_mni_preproc_bold_only(tmp_path, atlas, painter, atlas_spec):
    func = tmp_path / "fmriprep" / "sub-01" / "func"
    func.mkdir(parents=True)
    stem = "sub-01_task-rest"
    painter(atlas, _sig(atlas, 0), func / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz", step=4)
    painter(atlas, _sig(atlas, 1)[:, :1], func / f"{stem}_space-MNI152NLin2009cAsym_boldref.nii.gz", step=4)
    painter(atlas, _sig(atlas, 2), func / f"{stem}_space-T1w_desc-preproc_bold.nii.gz", step=4)
    recs = discover(tmp_path / "fmriprep")
    assert len(recs) == 2  # the boldref is not a time series
    ok = [r for r in recs if r.problem is None]
    assert len(ok) == 1 and ok[0].entities["space"] == "MNI152NLin2009cAsym"
    bad = next(r for r in recs if r.problem)
    assert "space-T1w is not an MNI space" in bad.problem


def test_out_folder_is_never_someone_elses(tmp_path, atlas, painter, atlas_spec, capsys):
    raw = tmp_path / "raw" / "sub-1" / "func"
    raw.mkdir(parents=True)
    painter(atlas, _sig(atlas, 0), raw / "sub-1_task-rest_bold.nii.gz", step=4)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    assert main(_args(tmp_path / "raw", notes, atlas_spec)) == 2
    assert "is not a brainlm store (no store.json); refusing" in capsys.readouterr().err
    assert (notes / "keep.txt").read_text() == "precious"
    assert main(_args(tmp_path / "raw", tmp_path / "raw" / "store", atlas_spec)) == 2
    assert "overlaps the input" in capsys.readouterr().err
    # a previous store is replaced
    assert main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec, "--split", "1,0,0")) == 0
    assert main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec, "--split", "1,0,0")) == 0


def test_scanner_space_header_and_tr_mismatch_are_warned(tmp_path, atlas, painter, atlas_spec,
                                                         capsys):
    func = tmp_path / "raw" / "sub-1" / "func"
    func.mkdir(parents=True)
    path = painter(atlas, _sig(atlas, 0), func / "sub-1_task-rest_bold.nii.gz", step=4)
    img = nib.load(str(path))
    img.header.set_sform(img.affine, code=1)
    img.header.set_qform(img.affine, code=1)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(path))
    (func / "sub-1_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 0.8}))
    assert main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec, "--split", "1,0,0")) == 0
    out = capsys.readouterr().out
    assert "scanner space (sform/qform code 1)" in out
    assert "sidecar TR 0.8 s differs from header TR 0.735 s" in out
    row = BrainStore(tmp_path / "s").recordings().iloc[0]
    assert row["tr_source"] == pytest.approx(0.8)


def test_unusable_sidecar_tr_is_quarantined(tmp_path, atlas, painter, atlas_spec, capsys):
    for i, sidecar in enumerate(['{"RepetitionTime": "0.735"}', "{not json"]):
        func = tmp_path / "raw" / f"sub-{i}" / "func"
        func.mkdir(parents=True)
        painter(atlas, _sig(atlas, i), func / f"sub-{i}_task-rest_bold.nii.gz", step=4)
        (func / f"sub-{i}_task-rest_bold.json").write_text(sidecar)
    func = tmp_path / "raw" / "sub-ok" / "func"
    func.mkdir(parents=True)
    painter(atlas, _sig(atlas, 5), func / "sub-ok_task-rest_bold.nii.gz", step=4)
    assert main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec)) == 0
    out = capsys.readouterr().out
    assert "RepetitionTime '0.735' in sub-0_task-rest_bold.json is not a positive number" in out
    assert "unreadable JSON sidecar sub-1_task-rest_bold.json" in out


def test_header_tr_in_milliseconds_is_converted(tmp_path, atlas, painter):
    path = painter(atlas, _sig(atlas, 0, 10), tmp_path / "ms.nii.gz", step=4)
    img = nib.load(str(path))
    hdr = img.header.copy()
    hdr.set_xyzt_units("mm", "msec")
    hdr.set_zooms(hdr.get_zooms()[:3] + (735.0,))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, hdr), str(path))
    assert pc.read_nifti_info(path).tr == pytest.approx(0.735)


def test_nan_background_is_outside_the_brain_but_later_nan_is_not(tmp_path, atlas, painter):
    path = painter(atlas, _sig(atlas, 0, 12), tmp_path / "nanbg.nii.gz", step=4,
                   background=np.nan)
    signals, covered = pc.extract_fast(pc.read_nifti_info(path), atlas)
    assert np.isfinite(signals).all() and covered.mean() > 0.95
    with pytest.raises(Exception, match="NaN/Inf voxel values"):
        pc.extract_nilearn(pc.read_nifti_info(path), atlas)  # the reference engine refuses


def test_tables_with_numeric_header_and_text_cells(tmp_path):
    good = tmp_path / "sub-1_timeseries.tsv"
    pd.DataFrame(np.arange(15.0).reshape(3, 5) + 0.5, columns=[1, 2, 3, 4, 5]).to_csv(
        good, sep="\t", index=False)
    x, cov = pc.read_timeseries_table(good, 5)
    assert x.shape == (5, 3) and x[0, 0] == 0.5  # the header row is not a timepoint
    bad = tmp_path / "sub-2_timeseries.tsv"
    bad.write_text("a\tb\n1\t2\n3\toops\n")
    with pytest.raises(Exception, match="non-numeric value 'oops' in row 3, column 2"):
        pc.read_timeseries_table(bad, 2)
    (tmp_path / "sub-1_scans.tsv").write_text("filename\tacq_time\n")
    assert [r.path.name for r in discover(tmp_path)] == ["sub-1_timeseries.tsv",
                                                        "sub-2_timeseries.tsv"]


def test_a_dead_worker_quarantines_its_recording_only(tmp_path, atlas, painter, atlas_spec,
                                                      monkeypatch, capsys):
    from brainlm.data import pipeline

    for i in range(4):
        func = tmp_path / "raw" / f"sub-{i}" / "func"
        func.mkdir(parents=True)
        painter(atlas, _sig(atlas, i), func / f"sub-{i}_task-rest_bold.nii.gz", step=4)
    real = pipeline.parcellate_recording

    def crash_on_sub2(rec, *a, **k):
        if rec.subject == "sub-2":
            os._exit(137)  # what the kernel's OOM killer leaves behind
        return real(rec, *a, **k)

    monkeypatch.setattr(pipeline, "parcellate_recording", crash_on_sub2)
    code = main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec, "--workers", "2",
                      "--cache-dir", str(tmp_path / "c")))
    assert code == 0
    manifest = BrainStore(tmp_path / "s").manifest.set_index("subject")
    assert "worker process died" in manifest.loc["sub-2", "reason"]
    assert (manifest["status"] == "ok").sum() >= 1


def test_scaler_reuse_for_inference_and_its_checks(tmp_path, atlas, painter, atlas_spec, capsys):
    for i in range(5):
        func = tmp_path / "raw" / f"sub-{i}" / "func"
        func.mkdir(parents=True)
        painter(atlas, _sig(atlas, i), func / f"sub-{i}_task-rest_bold.nii.gz", step=4)
    assert main(_args(tmp_path / "raw", tmp_path / "first", atlas_spec)) == 0
    new = tmp_path / "new" / "sub-9" / "func"
    new.mkdir(parents=True)
    painter(atlas, _sig(atlas, 9), new / "sub-9_task-rest_bold.nii.gz", step=4)
    scaler = tmp_path / "first" / "scaler.safetensors"
    assert main(_args(tmp_path / "new", tmp_path / "second", atlas_spec, "--split", "0,0,1",
                      "--scaler", str(scaler))) == 0
    a, b = RobustScaler.load(scaler), BrainStore(tmp_path / "second").scaler()
    np.testing.assert_array_equal(a.median, b.median)
    assert main(_args(tmp_path / "new", tmp_path / "third", atlas_spec, "--tr", "1.0",
                      "--window", "20", "--scaler", str(scaler))) == 2
    assert "fitted at TR 0.735 s, data are at 1.0 s" in capsys.readouterr().err


def test_parcel_without_training_data_is_zero_everywhere():
    x = np.ones((3, 20), np.float32)
    cov = np.array([True, False, True])
    scaler = RobustScaler.fit([x + np.arange(20)], [cov])
    assert not scaler.has_data[1]
    y = scaler.transform(np.full((3, 20), 7.0, np.float32))  # covered in this recording
    assert np.all(y[1] == 0)


def test_split_counts_follow_fractions_even_with_zeros():
    counts = pd.Series(assign_splits(["a", "b", "c"], fractions=(0, 0.5, 0.5))).value_counts()
    assert "train" not in counts and counts.sum() == 3 and counts.min() >= 1
    counts = pd.Series(assign_splits([str(i) for i in range(7)], (0.7, 0.2, 0.1))).value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (5, 1, 1)


def test_phenotype_named_like_a_manifest_column_is_kept(tmp_path, atlas, painter, atlas_spec):
    for i in range(2):
        func = tmp_path / "raw" / f"sub-{i}" / "func"
        func.mkdir(parents=True)
        painter(atlas, _sig(atlas, i), func / f"sub-{i}_task-rest_bold.nii.gz", step=4)
    pd.DataFrame({"participant_id": ["sub-0", "sub-1"], "status": ["patient", "control"]}).to_csv(
        tmp_path / "raw" / "participants.tsv", sep="\t", index=False)
    assert main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec, "--split", "1,0,0")) == 0
    m = BrainStore(tmp_path / "s").manifest.set_index("subject")
    assert m.loc["sub-0", "pheno_status"] == "patient" and m.loc["sub-0", "status"] == "ok"


def test_filters_checked_against_each_recordings_tr(tmp_path, atlas, painter, atlas_spec, capsys):
    func = tmp_path / "raw" / "sub-0" / "func"
    func.mkdir(parents=True)
    painter(atlas, _sig(atlas, 0, 30), func / "sub-0_task-rest_bold.nii.gz", step=4, tr=2.0)
    # 0.3 Hz is fine at the target TR (Nyquist 0.68 Hz) but not at this recording's 2 s
    assert main(_args(tmp_path / "raw", tmp_path / "s", atlas_spec, "--low-pass", "0.3")) == 2
    assert "Nyquist frequency 0.250 Hz of this recording's TR (2 s)" in capsys.readouterr().err


def test_synth_replaces_its_own_output_only(tmp_path, atlas_spec, capsys):
    out = tmp_path / "syn"
    base = ["synth", "--out", str(out), "--timepoints", "20", "--voxel-size", "8",
            "--atlas", atlas_spec]
    assert main(base + ["--subjects", "4"]) == 0
    assert main(base + ["--subjects", "2"]) == 0
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-001", "sub-002"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "mine"), "--subjects", "1"]) == 2
    assert main(["synth", "--out", str(tmp_path / "t"), "--tr", "100"]) == 2
    err = capsys.readouterr().err
    assert "not a brainlm synthetic dataset" in err and "--tr: 100 must be <= 10" in err
