"""The command line as a user runs it: fast help, synth -> preprocess, parallel == serial, cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from brainlm.cli import main
from brainlm.data import pipeline
from brainlm.data.store import BrainStore

HEAVY = ("torch", "nilearn", "nibabel", "pandas", "scipy", "sklearn", "mlflow",
         "great_expectations", "prefect")


def test_help_imports_nothing_heavy():
    code = ("import sys; from brainlm.cli import build_parser; build_parser().format_help(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "brainlm.cli", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0
    assert "synth" in res.stdout and "preprocess" in res.stdout


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory, atlas_spec):
    out = tmp_path_factory.mktemp("synth")
    env = {**os.environ}
    res = subprocess.run([sys.executable, "-m", "brainlm.cli", "synth", "--out", str(out),
                          "--subjects", "6", "--timepoints", "80", "--seed", "1",
                          "--atlas", atlas_spec, "--voxel-size", "8"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "6 recordings" in res.stdout
    return out


def test_synth_then_preprocess_end_to_end(synth_dir, tmp_path, atlas_spec):
    out = tmp_path / "store"
    res = subprocess.run([sys.executable, "-m", "brainlm.cli", "preprocess", "--input",
                          str(synth_dir), "--out", str(out), "--atlas", atlas_spec, "--window",
                          "60", "--workers", "2", "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "6 recordings kept, 0 quarantined" in res.stdout
    assert "train" in res.stdout and "parcels without coverage" in res.stdout
    store = BrainStore(out)
    kept = store.recordings()
    assert len(kept) == 6
    assert set(kept.columns) >= {"subject", "session", "split", "n_parcels", "n_timepoints",
                                 "tr", "source_path", "source_hash", "status", "age", "sex",
                                 "symptom"}
    assert (kept["n_timepoints"] == 80).all() and (kept["tr"] == 0.735).all()
    train = np.concatenate([store.load(r) for _, r in store.recordings("train").iterrows()],
                           axis=1)
    has = store.parcels["has_data"].to_numpy()
    med = np.median(train[has], axis=1)
    q = np.percentile(train[has], [25, 75], axis=1)
    assert np.abs(med).max() < 1e-4  # the training split is centred ...
    np.testing.assert_allclose(q[1] - q[0], 1.0, atol=1e-3)  # ... with unit IQR


def test_parallel_equals_serial_and_second_run_reuses_the_cache(synth_dir, tmp_path, atlas_spec,
                                                                 monkeypatch):
    args = ["preprocess", "--input", str(synth_dir), "--atlas", atlas_spec, "--window", "60",
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--out", str(tmp_path / "par"), "--workers", "2"]) == 0
    calls = []
    real = pipeline.parcellate_recording.__globals__["_compute"]
    monkeypatch.setitem(pipeline.parcellate_recording.__globals__, "_compute",
                        lambda *a: calls.append(a) or real(*a))
    assert main(args + ["--out", str(tmp_path / "again"), "--workers", "1"]) == 0
    assert calls == []  # every recording came from the cache
    assert main(args[:-2] + ["--cache-dir", str(tmp_path / "cold"), "--out",
                             str(tmp_path / "ser"), "--workers", "1"]) == 0
    assert len(calls) == 6  # a cold cache parcellates each once
    par, ser = BrainStore(tmp_path / "par"), BrainStore(tmp_path / "ser")
    assert par.manifest.drop(columns="source_path").equals(
        ser.manifest.drop(columns="source_path"))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(np.load(tmp_path / "par" / f"{split}.npy"),
                                      np.load(tmp_path / "ser" / f"{split}.npy"))
