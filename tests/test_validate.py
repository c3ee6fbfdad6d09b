"""Great Expectations on the scaled store: passes when right, stops with reasons when not."""

from __future__ import annotations

import json
import re
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
    out = capsys.readouterr().out
    assert "all checks passed" in out and str(tmp_path / "v" / "validation.html") in out
    assert summary["report"] == str(tmp_path / "v" / "validation.html")
    page = (tmp_path / "v" / "validation.html").read_text()
    # offline: no remote stylesheet, script, font or image; inline CSS only
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    rows = _report_rows(page)
    assert set(rows) == {("parcels", "median"), ("parcels", "iqr"), ("parcels", "n_nonfinite"),
                         ("parcels", "max_abs"), ("recordings", "n_parcels"),
                         ("recordings", "n_timepoints"), ("recordings", "recording_id"),
                         ("splits", "n_recordings"), ("splits", "(table)"),
                         ("subjects", "n_splits")}
    assert all('class="pass">PASS<' in row for row in rows.values())
    assert "expect_column_values_to_be_between" in rows["parcels", "median"]
    assert "-0.1 ≤ x ≤ 0.1; where split == train" in rows["parcels", "median"]
    assert "0.8 ≤ x ≤ 1.2" in rows["parcels", "iqr"]
    assert f"rows checked: {P}<br>unexpected: 0 (0%)" in rows["parcels", "iqr"]
    assert "0 ≤ x ≤ 100" in rows["parcels", "max_abs"]
    assert f"rows checked: {3 * P}<br>" in rows["parcels", "max_abs"]
    # the largest |value| of the store, read here from its arrays, is the spread's maximum
    biggest = max(float(np.abs(np.load(store / f"{s}.npy")).max()) for s in ("train", "val",
                                                                             "test"))
    assert f"/ max {biggest:.4g} (n = {3 * P})" in rows["parcels", "max_abs"]
    assert f"= {P}" in rows["recordings", "n_parcels"]
    assert "x ≥ 40" in rows["recordings", "n_timepoints"]
    assert "min 120 / median 120 / max 120" in rows["recordings", "n_timepoints"]
    assert "= 3" in rows["splits", "(table)"] and "observed: 3" in rows["splits", "(table)"]
    assert "threshold median_tol</th><td>0.1<" in page and str(store) in page


def _report_rows(page: str) -> dict:
    """(suite, column) -> the HTML of that expectation's row in validation.html."""
    rows = {}
    for part in page.split('<h2 id="suite-')[1:]:
        suite = part.split('"', 1)[0]
        for row in re.findall(r"<tr><td>.*?</tr>", part):
            column = re.findall(r"<td[^>]*>(.*?)</td>", row)[1].split(":")[0]
            rows[suite, column] = row
    return rows


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
    assert f"Report: {tmp_path / 'v' / 'validation.html'}" in message
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert not summary["success"] and not summary["tables"]["parcels"]
    page = (tmp_path / "v" / "validation.html").read_text()
    rows = _report_rows(page)
    assert '<td class="fail">FAILED</td>' in page
    # every parcel's training IQR is ~5: all P rows fail, and the spread shows the IQRs
    assert 'class="fail">FAIL<' in rows["parcels", "iqr"]
    assert f"unexpected: {P} (100%)" in rows["parcels", "iqr"]
    low = float(re.search(r"min ([0-9.e+-]+) / median", rows["parcels", "iqr"]).group(1))
    assert low > 1.2
    # one NaN in the training split: one (split, parcel) row of the 3 * P fails, and is named
    nonfinite = rows["parcels", "n_nonfinite"]
    assert 'class="fail">FAIL<' in nonfinite
    assert f"rows checked: {3 * P}<br>unexpected: 1 ({100 / (3 * P):.4g}%)" in nonfinite
    assert re.search(r"e\.g\. 1 \(split=train, parcel=\d+\)", nonfinite)
    assert 'class="pass">PASS<' in rows["parcels", "median"]
    assert 'class="pass">PASS<' in rows["recordings", "n_parcels"]


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
