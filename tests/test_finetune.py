"""Fine-tuning: probe and full, classification, forecasting, honest splits, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import age_effect_setup
from brainlm.cli import main
from brainlm.data.store import BrainStore
from brainlm.errors import ConfigError
from brainlm.model.modeling import BrainLMForPretraining
from brainlm.train.finetune import FinetuneConfig, finetune, layer_groups

P, T = 10, 120


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Subjects whose parcel-0 amplitude grows with age; an untrained tiny model."""
    return age_effect_setup(tmp_path_factory.mktemp("ft"), 20, T, P)


def _cfg(root, out, **kw):
    base = dict(model=root / "model", data=root / "store", out=out, target="age", epochs=3,
                batch_size=8, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_probe_regression_predicts_val_and_test_only(setup, tmp_path):
    meta = finetune(_cfg(setup, tmp_path / "probe"))
    preds = pd.read_parquet(tmp_path / "probe" / "predictions.parquet")
    store = BrainStore(setup / "store")
    train = set(store.recordings("train")["subject"])
    assert set(preds["split"]) == {"val", "test"}
    assert not train & set(preds["subject"])  # nothing trained on is predicted (or scored)
    assert np.isfinite(preds["y_pred"]).all()
    assert meta["epochs_run"] <= 3 and np.isfinite(meta["best_val_loss"])
    saved = json.loads((tmp_path / "probe" / "finetune.json").read_text())
    assert saved["target_mean"] == pytest.approx(
        store.recordings("train")["age"].mean(), rel=1e-6)


def test_probe_leaves_the_encoder_untouched_full_mode_changes_it(setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import brainlm.model as model_mod

    used = []
    real = model_mod.load_model
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: used.append(real(*a, **k))
                        or used[-1])
    finetune(_cfg(setup, tmp_path / "p"))
    after = used[-1].state_dict()
    before = load_file(setup / "model" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)  # frozen in memory too
    monkeypatch.undo()
    # the run folder holds the whole task model: the probe's encoder is the pretrained one
    probe = load_file(tmp_path / "p" / "model.safetensors")
    assert {"head.linear.weight", "head.linear.bias"} <= set(probe)
    assert all(torch.equal(probe[f"brainlm.{k}"], before[k]) for k in before)
    finetune(_cfg(setup, tmp_path / "f", mode="full", epochs=1, windows_per_recording=1))
    state = load_file(tmp_path / "f" / "model.safetensors")
    key = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(state[f"brainlm.{key}"], before[key])


def test_layer_decay_orders_learning_rates(setup):
    model = BrainLMForPretraining.from_pretrained(setup / "model")
    head = torch.nn.Linear(64, 1)
    groups = layer_groups(model, head, lr=1.0, decay=0.5, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    emb = lr_of[id(model.patch_embed.weight)]
    first = lr_of[id(model.encoder.blocks[0].attn.qkv.weight)]
    last = lr_of[id(model.encoder.blocks[-1].attn.qkv.weight)]
    assert emb < first < last < lr_of[id(head.weight)] == 1.0
    assert last == pytest.approx(0.5 * lr_of[id(model.encoder.norm.weight)])
    assert id(model.decoder_pred.weight) not in lr_of  # the decoder is not fine-tuned


def test_classification_writes_probabilities(setup, tmp_path):
    finetune(_cfg(setup, tmp_path / "c", target="group", task="classification"))
    preds = pd.read_parquet(tmp_path / "c" / "predictions.parquet")
    proba = preds[["proba_old", "proba_young"]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert set(preds["y_pred"]) <= {"old", "young"}


def test_forecast_head_predicts_every_parcel(setup, tmp_path):
    assert main(["finetune", "--model", str(setup / "model"), "--data", str(setup / "store"),
                 "--out", str(tmp_path / "fc"), "--task", "forecast", "--horizon", "10",
                 "--epochs", "2", "--batch-size", "8"]) == 0
    arrays = np.load(tmp_path / "fc" / "forecast.npz")
    assert arrays["test_pred"].shape == arrays["test_true"].shape
    assert arrays["test_pred"].shape[1:] == (P, 10)
    assert len(arrays["test_subject"]) == arrays["test_pred"].shape[0]


@pytest.mark.parametrize("kw, message", [
    ({"target": "height"}, "no column 'height'"),
    ({"target": "group", "task": "regression"}, "not numeric"),
    ({"task": "forecast", "horizon": 15}, "multiple of the patch size"),
    ({"layer_decay": 1.5}, "layer_decay"),
    ({"task": "segmentation"}, "must be one of"),
])
def test_bad_finetune_settings(setup, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        finetune(_cfg(setup, tmp_path / "x", **kw))


def test_evaluate_scores_model_and_baselines_on_the_same_test_subjects(setup, tmp_path, capsys):
    run = tmp_path / "run"
    finetune(_cfg(setup, run))
    assert main(["evaluate", "--run", str(run), "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run / "evaluation" / "results.json").read_text())
    methods = {r["method"] for r in results}
    assert methods == {"brainlm", "fc_linear", "tangent_linear", "raw_roi_mlp", "train_mean"}
    store = BrainStore(setup / "store")
    for r in results:  # every method on exactly the subjects of its split
        assert r["n_subjects"] == store.recordings(r["split"])["subject"].nunique()
        if r["value"] is not None:
            assert r["low"] <= r["value"] <= r["high"]
    assert {r["metric"] for r in results} == {"r2", "mae", "pearson_r"}
    assert "fc_linear" in printed and (run / "evaluation" / "comparison.png").stat().st_size > 0
    assert (run / "evaluation" / "results.md").read_text().count("|") > 10


def test_evaluate_classification_and_forecast_runs(setup, tmp_path):
    finetune(_cfg(setup, tmp_path / "c", target="group", task="classification"))
    assert main(["evaluate", "--run", str(tmp_path / "c"), "--n-boot", "100"]) == 0
    rows = json.loads((tmp_path / "c" / "evaluation" / "results.json").read_text())
    assert {r["metric"] for r in rows} == {"accuracy", "balanced_accuracy", "roc_auc"}
    assert "majority" in {r["method"] for r in rows}
    finetune(_cfg(setup, tmp_path / "f", task="forecast", target=None, horizon=10, epochs=2))
    assert main(["evaluate", "--run", str(tmp_path / "f"), "--n-boot", "100"]) == 0
    rows = json.loads((tmp_path / "f" / "evaluation" / "results.json").read_text())
    assert {r["method"] for r in rows} == {"brainlm", "persistence", "parcel_mean", "linear_ar",
                                           "train_mean"}
    assert {r["split"] for r in rows} == {"val", "test"}  # forecast.npz holds both
    vs = json.loads((tmp_path / "f" / "evaluation" / "comparisons.json").read_text())
    assert {(c["split"], c["metric"]) for c in vs} == {
        (s, m) for s in ("val", "test") for m in ("mse", "r2")}
    assert (tmp_path / "f" / "evaluation" / "forecast_r2.png").is_file()


def test_analyze_and_perturb_commands(setup, tmp_path, capsys):
    truth = tmp_path / "networks.tsv"
    pd.DataFrame({"network": np.arange(P) % 3}).to_csv(truth, sep="\t", index=False)
    assert main(["analyze", "--model", str(setup / "model"), "--data", str(setup / "store"),
                 "--out", str(tmp_path / "a"), "--networks", "3", "--truth", str(truth)]) == 0
    summary = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert np.isfinite(summary["networks"]["ari_model"]) and np.isfinite(
        summary["networks"]["ari_fc"])
    assert len(summary["networks"]["labels_model"]) == P
    assert (tmp_path / "a" / "reconstruction.png").is_file()
    rec = BrainStore(setup / "store").recordings("test").iloc[0]["recording_id"]
    assert main(["perturb", "--model", str(setup / "model"), "--data", str(setup / "store"),
                 "--recording", rec, "--parcels", "1,2", "--mode", "shift", "--value", "2",
                 "--start", "40", "--stop", "80", "--out", str(tmp_path / "p")]) == 0
    effect = np.load(tmp_path / "p" / "effect.npy")
    assert effect.shape == (P, T) and np.isfinite(effect).all()
    assert np.abs(effect[:, 40:80]).sum() > 0
    assert main(["perturb", "--model", str(setup / "model"), "--data", str(setup / "store"),
                 "--recording", "sub-nobody", "--parcels", "1", "--out", str(tmp_path / "q")]) == 2
    assert "no kept recording 'sub-nobody'" in capsys.readouterr().err


def test_released_weights_fine_tune_through_the_same_command(setup, tmp_path):
    from transformers import ViTMAEConfig

    from brainlm.model.legacy import save_random_released

    save_random_released(tmp_path / "vit", ViTMAEConfig(
        image_size=48, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64))
    for mode in ("probe", "full"):
        out = tmp_path / mode
        assert main(["finetune", "--model", str(tmp_path / "vit"), "--data", str(setup / "store"),
                     "--out", str(out), "--target", "age", "--mode", mode, "--window", "40",
                     "--epochs", "2", "--windows-per-recording", "1"]) == 0
        preds = pd.read_parquet(out / "predictions.parquet")
        assert np.isfinite(preds["y_pred"]).all() and set(preds["split"]) == {"val", "test"}
    model_state = json.loads((tmp_path / "full" / "finetune.json").read_text())
    assert model_state["window"] == 40


def test_test_labels_never_influence_training(setup, tmp_path):
    """Shuffle the test subjects' targets: validation predictions and the stopping epoch must
    not move (test labels are only read by evaluate)."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(setup / "store", copy)
    manifest = pd.read_parquet(copy / "manifest.parquet")
    test = manifest["split"] == "test"
    manifest.loc[test, "age"] = manifest.loc[test, "age"].to_numpy()[::-1] + 100
    manifest.to_parquet(copy / "manifest.parquet", index=False)
    a = finetune(_cfg(setup, tmp_path / "a"))
    b = finetune(_cfg(setup, tmp_path / "b", data=copy))
    pa = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
    pb = pd.read_parquet(tmp_path / "b" / "predictions.parquet")
    assert a["history"] == b["history"]
    np.testing.assert_array_equal(pa["y_pred"], pb["y_pred"])


def test_empty_split_and_short_recordings_are_clear(setup, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(setup / "store", copy)
    manifest = pd.read_parquet(copy / "manifest.parquet")
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    manifest.to_parquet(copy / "manifest.parquet", index=False)
    with pytest.raises(ConfigError, match="the val split is empty"):
        finetune(_cfg(setup, tmp_path / "x", data=copy))
    with pytest.raises(ConfigError, match="--window 80"):
        finetune(_cfg(setup, tmp_path / "y", window=80))
