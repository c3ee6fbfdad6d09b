"""Every command, end to end, on synthetic BOLD with known networks and phenotype effects."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainlm.cli import main
from brainlm.data.store import BrainStore

RANGES = {"r2": (-np.inf, 1), "mae": (0, np.inf), "pearson_r": (-1, 1), "accuracy": (0, 1),
          "balanced_accuracy": (0, 1), "roc_auc": (0, 1), "mse": (0, np.inf)}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, atlas_spec):
    root = tmp_path_factory.mktemp("e2e")
    run = lambda *args: main([str(a) for a in args])  # noqa: E731
    assert run("synth", "--out", root / "raw", "--subjects", "14", "--timepoints", "160",
               "--voxel-size", "8", "--atlas", atlas_spec, "--seed", "3") == 0
    assert run("preprocess", "--input", root / "raw", "--out", root / "store", "--atlas",
               atlas_spec, "--window", "40", "--no-progress", "--split", "0.6,0.2,0.2") == 0
    assert run("pretrain", "--data", root / "store", "--out", root / "model", "--profile",
               "tiny", "--window", "40", "--patch-size", "10", "--max-steps", "4",
               "--batch-size", "4", "--eval-every", "4", "--workers", "0",
               "--no-progress") == 0
    return root, run


def test_finetune_and_evaluate_on_known_effects(chain):
    root, run = chain
    store = BrainStore(root / "store")
    train = set(store.recordings("train")["subject"])
    for target, task in (("age", "regression"), ("sex", "classification")):
        out = root / f"ft-{target}"
        assert run("finetune", "--model", root / "model", "--data", root / "store", "--out", out,
                   "--target", target, "--task", task, "--epochs", "3") == 0
        preds = pd.read_parquet(out / "predictions.parquet")
        assert not train & set(preds["subject"])  # no test (or val) subject was fitted
        assert run("evaluate", "--run", out, "--n-boot", "100") == 0
        rows = json.loads((out / "evaluation" / "results.json").read_text())
        floor = "train_mean" if task == "regression" else "majority"
        assert {r["method"] for r in rows} == {"brainlm", "fc_linear", "tangent_linear",
                                               "raw_roi_mlp", floor}
        control = json.loads((out / "evaluation" / "positive_control.json").read_text())
        assert control["status"] in ("passed", "failed", "undetermined"), control  # synthetic
        assert "## Positive control" in (out / "evaluation" / "results.md").read_text()
        for r in rows:
            if r["value"] is None:  # e.g. ROC-AUC with one class among few test subjects
                continue
            lo, hi = RANGES[r["metric"]]
            assert lo <= r["value"] <= hi, r
            assert r["low"] <= r["value"] <= r["high"], r
            if r["metric"] == "mae":  # a smooth metric: its percentile CI needs no widening
                assert not r["widened"], r


def test_forecast_analyze_perturb_embed(chain):
    root, run = chain
    out = root / "ft-forecast"
    assert run("finetune", "--model", root / "model", "--data", root / "store", "--out", out,
               "--task", "forecast", "--horizon", "10", "--epochs", "2") == 0
    assert run("evaluate", "--run", out, "--n-boot", "100") == 0
    rows = json.loads((out / "evaluation" / "results.json").read_text())
    assert all(np.isfinite(r["value"]) for r in rows if r["metric"] == "mse")

    assert run("analyze", "--model", root / "model", "--data", root / "store", "--out",
               root / "analysis", "--truth", root / "raw" / "ground_truth.json") == 0
    nets = json.loads((root / "analysis" / "analysis.json").read_text())["networks"]
    # the generator's modules are the truth; raw FC of synthetic BOLD finds them well
    assert nets["ari_fc"] > 0.3 and np.isfinite(nets["ari_model"])

    store = BrainStore(root / "store")
    rec = store.recordings("test").iloc[0]["recording_id"]
    labels = store.parcels["label"].astype(str).tolist()
    assert run("perturb", "--model", root / "model", "--data", root / "store", "--recording",
               rec, "--parcels", ",".join(labels[:3]), "--mode", "clamp", "--value", "0",
               "--start", "0", "--stop", "40", "--out", root / "perturb") == 0
    summary = json.loads((root / "perturb" / "summary.json").read_text())
    assert np.isfinite(summary["others"])

    assert run("embed", "--model", root / "model", "--data", root / "store", "--out",
               root / "emb.parquet") == 0
    assert len(pd.read_parquet(root / "emb.parquet")) == len(store.recordings())
