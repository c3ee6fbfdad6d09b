"""Great Expectations on the scaled store: passes when right, stops with reasons when not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from brainlm.cli import main
from brainlm.data.parcellate import ParcellationSettings
from brainlm.data.pipeline import PreprocessConfig, run_preprocess
from brainlm.data.validate import Thresholds, ValidationFailed, validate_store

P = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gx")
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        np.save(raw / f"sub-{i:02d}_task-rest_timeseries.npy",
                100 + rng.standard_normal((120, P)))
    pd.DataFrame(rng.uniform(-60, 60, (P, 3)), columns=["x", "y", "z"]).to_csv(
        root / "coords.tsv", sep="\t", index=False)
    run_preprocess(PreprocessConfig(inputs=[raw], out=root / "store", coords=root / "coords.tsv",
                                    input_tr=0.735, progress=False, cache_dir=root / "cache",
                                    settings=ParcellationSettings(min_timepoints=40,
                                                                  standardize="none")))
    return root / "store"


def test_a_good_store_passes_and_gets_data_docs(store, tmp_path, capsys):
    assert main(["validate", "--data", str(store), "--out", str(tmp_path / "v"),
                 "--window", "40"]) == 0
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert summary["success"] and summary["failures"] == []
    assert summary["train_median_max_abs"] < 0.1
    assert (tmp_path / "v" / "gx" / "uncommitted" / "data_docs" / "local_site" /
            "index.html").is_file()
    assert "all checks passed" in capsys.readouterr().out


def _corrupt(store, tmp_path, edit):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    edit(copy)
    return copy


def test_corrupted_values_are_rejected_with_reasons(store, tmp_path):
    def scale_and_poison(folder):
        x = np.load(folder / "train.npy")
        x *= 5.0  # IQR ~5 instead of 1
        x[3] = np.nan
        np.save(folder / "train.npy", x)

    bad = _corrupt(store, tmp_path, scale_and_poison)
    with pytest.raises(ValidationFailed) as err:
        validate_store(bad, tmp_path / "v", Thresholds(window=40))
    message = str(err.value)
    assert "expect_column_values_to_be_between(iqr)" in message
    assert "expect_column_values_to_be_between(n_nonfinite)" in message
    assert "Data Docs:" in message
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert not summary["success"] and not summary["tables"]["parcels"]


def test_leaked_subject_wrong_parcel_count_and_short_window(store, tmp_path, capsys):
    def leak(folder):
        m = pd.read_parquet(folder / "manifest.parquet")
        test_subject = m.loc[m["split"] == "test", "subject"].iloc[0]
        row = m[m["split"] == "train"].iloc[[0]].copy()
        row["subject"], row["recording_id"] = test_subject, "sub-dup_task-rest"
        pd.concat([m, row]).to_parquet(folder / "manifest.parquet", index=False)

    bad = _corrupt(store, tmp_path, leak)
    code = main(["validate", "--data", str(bad), "--out", str(tmp_path / "v"), "--window", "500",
                 "--parcels", str(P + 1)])
    err = capsys.readouterr().err
    assert code == 2
    assert "subjects: expect_column_values_to_be_between(n_splits)" in err
    assert "recordings: expect_column_values_to_be_between(n_parcels)" in err
    assert "recordings: expect_column_values_to_be_between(n_timepoints)" in err


def test_drift_suite_flags_moved_medians_and_iqrs_per_parcel():
    """Scaled training data have median 0 and IQR 1 per parcel; the GX drift suite names the
    parcels of a new cohort that moved (a shifted one, a louder one) and passes the rest."""
    from brainlm.data.validate import drift_check

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 500)) / 1.349 for _ in range(3)]  # IQR 1 per parcel
    for x in xs:
        x[0] += 2.0
        x[1] *= 3.0
    report = drift_check(xs, median_tol=0.5, iqr_tol=0.5)
    assert report["median_moved"] == [0] and report["iqr_moved"] == [1]
    assert report["drifted_parcels"] == [0, 1] and not report["success"]
    assert drift_check([x[2:] for x in xs], 0.5, 0.5)["success"]
