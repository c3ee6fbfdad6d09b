"""Great Expectations on the scaled store: passes when right, stops with reasons when not;
held-out splits that moved away from the training distribution stop it too, and the training
split's own median/IQR checks are labelled as the scaler's self-check."""

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
    # the training split's median and IQR: labelled as what they are, the scaler's self-check
    self_check = summary["scaler_self_check"]
    assert self_check["train_median_max_abs"] < 0.1 and self_check["success"]
    assert self_check["evidence_about_data"] is False and "by construction" in self_check["what"]
    suite = json.loads((tmp_path / "v" / "gx" / "expectations" /
                        "scaled_scaler_self_check.json").read_text())
    for expectation in suite["expectations"]:
        assert expectation["meta"]["check"] == "scaler_self_check"
        assert expectation["notes"].startswith("Scaler self-check, not evidence about the data")
    # the held-out splits against training: within the stated tolerances, none beyond
    shift = summary["shift"]
    assert shift["tolerances"] == {"median": 0.5, "iqr_ratio": 1.5, "z": 4.0}
    for split in ("val", "test"):
        entry = shift["splits"][split]
        assert entry["success"] and entry["fraction_shifted"] == 0.0
        assert entry["median"]["bounds"] == [-0.5, 0.5]
        assert entry["iqr"]["bounds"] == pytest.approx([1 / 1.5, 1.5])
        assert entry["n_parcels"] == P and entry["median"]["parcels_beyond"] == []
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
    assert set(rows) == {("scaler_self_check", "median"), ("scaler_self_check", "iqr"),
                         ("shift", "median val"), ("shift", "iqr val"),
                         ("shift", "median test"), ("shift", "iqr test"),
                         ("parcels", "n_nonfinite"),
                         ("parcels", "max_abs"), ("recordings", "n_parcels"),
                         ("recordings", "n_timepoints"), ("recordings", "recording_id"),
                         ("splits", "n_recordings"), ("splits", "(table)"),
                         ("subjects", "n_splits")}
    assert all('class="pass">PASS<' in row for row in rows.values())
    assert 'suite scaler_self_check (scaler self-check on the training split: holds by ' \
        'construction, not evidence about the data)' in page
    assert "expect_column_values_to_be_between" in rows["scaler_self_check", "median"]
    assert "-0.1 ≤ x ≤ 0.1; where split == train" in rows["scaler_self_check", "median"]
    assert "0.8 ≤ x ≤ 1.2" in rows["scaler_self_check", "iqr"]
    assert f"rows checked: {P}<br>unexpected: 0 (0%)" in rows["scaler_self_check", "iqr"]
    assert "-0.5 ≤ x ≤ 0.5; for at least 90% of rows; where split == test" in \
        rows["shift", "median test"]
    assert "0.6667 ≤ x ≤ 1.5; for at least 90% of rows; where split == val" in \
        rows["shift", "iqr val"]
    section = page.split('<h2 id="shift">')[1].split("<h2")[0]
    assert section.count('class="pass">PASS<') == 4 and f"0 of {P} (0%): none" in section
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
    """(suite, column) -> the HTML of that expectation's row in validation.html; the shift
    suite's column names its split too ("median val")."""
    rows = {}
    for part in page.split('<h2 id="suite-')[1:]:
        suite = part.split('"', 1)[0]
        for row in re.findall(r"<tr><td>.*?</tr>", part):
            column = re.findall(r"<td[^>]*>(.*?)</td>", row)[1].split(":")[0]
            split = re.search(r"where split == (\w+)", row)
            if suite == "shift" and split:
                column += " " + split.group(1)
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
    assert "scaler_self_check: expect_column_values_to_be_between(iqr)" in message
    assert "parcels: expect_column_values_to_be_between(n_nonfinite)" in message
    assert "Data Docs:" in message
    assert f"Report: {tmp_path / 'v' / 'validation.html'}" in message
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert not summary["success"] and not summary["tables"]["parcels"]
    assert not summary["tables"]["scaler_self_check"] and summary["tables"]["shift"]
    page = (tmp_path / "v" / "validation.html").read_text()
    rows = _report_rows(page)
    assert '<td class="fail">FAILED</td>' in page
    # every parcel's training IQR is ~5: all P rows fail, and the spread shows the IQRs
    assert 'class="fail">FAIL<' in rows["scaler_self_check", "iqr"]
    assert f"unexpected: {P} (100%)" in rows["scaler_self_check", "iqr"]
    low = float(re.search(r"min ([0-9.e+-]+) / median",
                          rows["scaler_self_check", "iqr"]).group(1))
    assert low > 1.2
    # one NaN in the training split: one (split, parcel) row of the 3 * P fails, and is named
    nonfinite = rows["parcels", "n_nonfinite"]
    assert 'class="fail">FAIL<' in nonfinite
    assert f"rows checked: {3 * P}<br>unexpected: 1 ({100 / (3 * P):.4g}%)" in nonfinite
    assert re.search(r"e\.g\. 1 \(split=train, parcel=\d+\)", nonfinite)
    assert 'class="pass">PASS<' in rows["scaler_self_check", "median"]
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


def _edit_split(folder, split, edit):
    """Apply `edit` to every [P, T] recording of `split` in a copied store's array."""
    manifest = pd.read_parquet(folder / "manifest.parquet")
    x = np.load(folder / f"{split}.npy")
    for _, r in manifest[(manifest["split"] == split) & (manifest["status"] == "ok")].iterrows():
        off, t = int(r["offset"]), int(r["n_timepoints"])
        edit(x[off:off + P * t].reshape(P, t))
    np.save(folder / f"{split}.npy", x)


def test_a_shifted_test_split_stops_validation_naming_the_split_and_parcels(store, tmp_path,
                                                                             capsys):
    """The test split moved from the training distribution (three parcels offset by one
    training IQR, three with another site's gain of 2): the shift suite fails for `test`,
    names its parcels and stops the command like any failed expectation; `val` passes."""
    def shift(v):
        v[:3] += 1.0
        v[5:] *= 2.0

    bad = _corrupt(store, tmp_path, lambda f: _edit_split(f, "test", shift))
    labels = pd.read_parquet(store / "parcels.parquet")["label"].astype(int).tolist()
    code = main(["validate", "--data", str(bad), "--out", str(tmp_path / "v"),
                 "--window", "40"])
    err = capsys.readouterr().err
    assert code == 2 and "2 expectation(s) failed" in err
    assert ("shift: expect_column_values_to_be_between(median) failed for the test split: "
            f"3 of {P} parcels beyond -0.5 <= median <= 0.5") in err
    assert f"parcels {', '.join(map(str, labels[:3]))}\n" in err
    assert ("shift: expect_column_values_to_be_between(iqr) failed for the test split: "
            f"3 of {P} parcels beyond 0.6667 <= iqr <= 1.5") in err
    assert f"parcels {', '.join(map(str, labels[5:]))}\n" in err
    assert "val split" not in err
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert not summary["success"] and not summary["tables"]["shift"]
    assert summary["tables"]["scaler_self_check"]  # the training split is untouched
    test, val = summary["shift"]["splits"]["test"], summary["shift"]["splits"]["val"]
    assert not test["success"] and val["success"]
    assert test["median"]["parcels_beyond"] == labels[:3]
    assert test["iqr"]["parcels_beyond"] == labels[5:]
    assert test["fraction_shifted"] == 6 / P and test["median"]["max"] > 0.9
    page = (tmp_path / "v" / "validation.html").read_text()
    section = page.split('<h2 id="shift">')[1].split("<h2")[0]
    assert f"3 of {P} (37.5%): {', '.join(map(str, labels[:3]))}" in section
    assert section.count('class="fail">FAIL<') == 2 and section.count('class="pass">PASS<') == 2
    rows = _report_rows(page)
    assert 'class="fail">FAIL<' in rows["shift", "median test"]
    assert 'class="pass">PASS<' in rows["shift", "median val"]


def test_shift_bounds_widen_with_few_subjects_and_stay_stated_with_many():
    """A split's bounds are the stated tolerances unless the training subjects' spread says
    a split of that size scatters more: then shift_z standard errors."""
    from brainlm.data.validate import shift_bounds

    th = Thresholds()
    spread = {"n_subjects": 6, "median_sd": 0.07, "log_iqr_sd": 0.25}
    few = shift_bounds(spread, 2, th)  # SE factor sqrt(1/2 + 1/6)
    assert few["median"] == [-0.5, 0.5] and not few["widened"]["median"]
    assert few["iqr"][1] == pytest.approx(np.exp(4 * 0.25 * np.sqrt(2 / 3)))
    assert few["iqr"][0] == pytest.approx(1 / few["iqr"][1]) and few["widened"]["iqr"]
    many = shift_bounds({**spread, "n_subjects": 160}, 20, th)
    assert many["iqr"] == pytest.approx([1 / 1.5, 1.5]) and not many["widened"]["iqr"]
    alone = shift_bounds({"n_subjects": 1, "median_sd": None, "log_iqr_sd": None}, 1, th)
    assert alone["median"] == [-0.5, 0.5] and alone["se_log_iqr"] is None
