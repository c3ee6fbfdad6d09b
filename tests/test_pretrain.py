"""Pretraining as a user runs it: outputs, exact resume after a kill, DDP on gloo, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from brainlm.data.parcellate import ParcellationSettings
from brainlm.data.pipeline import PreprocessConfig, run_preprocess
from brainlm.train.pretrain import PretrainConfig, evaluate, pretrain

P, T = 12, 120
COMMON = ["--profile", "tiny", "--window", "40", "--patch-size", "10", "--batch-size", "4",
          "--windows-per-recording", "2", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small store of already-parcellated series: 12 parcels, 10 subjects."""
    root = tmp_path_factory.mktemp("pt")
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        x = np.cumsum(rng.standard_normal((T, P)), axis=0) * 0.3 + 100
        np.save(raw / f"sub-{i:02d}_task-rest_timeseries.npy", x)
    pd.DataFrame(rng.uniform(-60, 60, (P, 3)), columns=["x", "y", "z"]).to_csv(
        root / "coords.tsv", sep="\t", index=False)
    cfg = PreprocessConfig(inputs=[raw], out=root / "store", coords=root / "coords.tsv",
                           input_tr=0.735, progress=False, cache_dir=root / "cache",
                           settings=ParcellationSettings(min_timepoints=40, standardize="zscore"))
    run_preprocess(cfg)
    return root / "store"


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "brainlm.cli", "pretrain"] + args,
                          capture_output=True, text=True, **kw)


def test_pretrain_writes_a_loadable_model_folder(store, tmp_path):
    out = tmp_path / "model"
    res = _run(["--data", str(store), "--out", str(out), "--max-steps", "6", "--eval-every", "3",
                "--mask-ratio", "0.5"] + COMMON)
    assert res.returncode == 0, res.stderr
    assert "val R^2" in res.stdout
    for name in ("config.json", "model.safetensors", "scaler.safetensors", "README.md",
                 "metrics.json", "history.json", "reconstruction.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["val_mse"]) and np.isfinite(metrics["val_r2"])
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7))
    assert all(set(h) == {"step", "loss", "lr", "grad_norm"} for h in history)
    validation = json.loads((out / "validation.json").read_text())  # one row per evaluation
    assert [v["step"] for v in validation] == [3, 6] and "val_r2" in validation[0]
    assert all(set(v) == set(validation[0]) for v in validation)  # what dvc plots needs
    card = (out / "README.md").read_text()
    assert "mask ratio 0.5" in card and f"{metrics['val_r2']:.4f}" in card
    assert "hash" in card and "Licence" in card
    # loadable elsewhere: a fresh process with no store, coordinates from config.json
    code = ("import torch; from brainlm.model.modeling import BrainLMForPretraining as M; "
            f"m = M.from_pretrained({str(out)!r}); "
            f"e = m.embed(torch.zeros(1, {P}, 40)); print(tuple(e['cls'].shape))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("(1, 64)")


def test_exact_resume_after_a_kill(store, tmp_path):
    full = tmp_path / "full"
    args = ["--data", str(store), "--max-steps", "10", "--eval-every", "5", "--ckpt-every", "2",
            "--lr", "0.01"] + COMMON
    assert _run(args + ["--out", str(full)]).returncode == 0
    reference = json.loads((full / "history.json").read_text())

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "brainlm.cli", "pretrain", "--out",
                             str(killed)] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=True)
    assert 2 <= state["step"] < 10 or not (killed / "history.json").exists()
    res = _run(args + ["--out", str(killed), "--resume"])
    assert res.returncode == 0, res.stderr
    resumed = json.loads((killed / "history.json").read_text())
    assert [h["step"] for h in resumed] == list(range(1, 11))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    val = [json.loads((d / "validation.json").read_text()) for d in (killed, full)]
    assert [v["step"] for v in val[0]] == [5, 10]
    assert val[0][-1]["val_r2"] == pytest.approx(val[1][-1]["val_r2"], rel=1e-6)


def test_stop_after_then_resume_equals_one_run(store, tmp_path):
    base = PretrainConfig(data=store, out=tmp_path / "a", window=40, patch_size=10,
                          batch_size=4, windows_per_recording=2, workers=0, max_steps=6,
                          eval_every=6, ckpt_every=6, progress=False, base_lr=0.01)
    one = pretrain(base)
    part = PretrainConfig(**{**base.__dict__, "out": tmp_path / "b", "stop_after": 4})
    first = pretrain(part)
    assert first["step"] == 4 and not first["finished"]
    rest = pretrain(PretrainConfig(**{**part.__dict__, "stop_after": None, "resume": True}))
    assert rest["finished"]
    assert [h["loss"] for h in rest["history"]] == pytest.approx(
        [h["loss"] for h in one["history"]], rel=1e-6)


def test_ddp_on_gloo_matches_one_process(store, tmp_path):
    args = ["--data", str(store), "--max-steps", "3", "--eval-every", "3", "--ckpt-every", "3",
            "--lr", "0.01", "--grad-accum", "2"] + COMMON
    single = _run(args + ["--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "brainlm.cli", "pretrain",
                          "--out", str(tmp_path / "two")] + args, capture_output=True,
                         text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-4)
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_mlflow_logs_params_metrics_and_artifacts(store, tmp_path, monkeypatch):
    """The pretrain job's one MLflow run: config as params, every step's loss, validation at
    the evaluation steps (each metric once per step), the model folder as artifacts."""
    from mlflow.tracking import MlflowClient

    from brainlm.jobs import pretrain as pretrain_job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = PretrainConfig(data=store, out=tmp_path / "m", window=40, patch_size=10,
                         batch_size=4, windows_per_recording=2, workers=0, max_steps=4,
                         eval_every=2, ckpt_every=4, progress=False, mask_ratio=0.2)
    pretrain_job.run(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pretrain")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["mask_ratio"] == "0.2"
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert logged == [(r["step"], r["loss"]) for r in history]  # every step, batched requests
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    val_r2 = [m.step for m in client.get_metric_history(run.info.run_id, "val_r2")]
    assert sorted(val_r2) == [2, 4]  # once per evaluation step
    assert run.data.tags["brainlm.job"] == "pretrain" and run.info.status == "FINISHED"
    assert "val_r2" in run.data.metrics and "val_common_r2_gain_low" in run.data.metrics
    # the verdict of the gain's interval, never a string among the metrics
    assert run.data.tags["learned"] in ("learned", "not learned", "undecided")
    assert not any(k.endswith(("_verdict", "_by_subject")) for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in names and "model/reconstruction.png" in names
    # the same top-level path in every run: MLflow's Compare puts them side by side
    assert "reconstruction.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs


def test_r2_is_per_parcel_and_not_clipped(store, tmp_path):
    """A model that predicts nonsense gets R^2 < 0, reported as such."""
    from brainlm.data.store import BrainStore
    from brainlm.model.config import BrainLMConfig
    from brainlm.model.modeling import BrainLMForPretraining

    model = BrainLMForPretraining(BrainLMConfig.from_preset("tiny", window=40, patch_size=10))
    with torch.no_grad():
        model.decoder_pred.bias.fill_(25.0)  # far from any scaled value
    cfg = PretrainConfig(data=store, out=tmp_path, window=40, patch_size=10)
    ev = evaluate(model, BrainStore(store), cfg, torch.device("cpu"),
                  lambda: torch.autocast("cpu", enabled=False), {})
    assert ev["val_r2"] < -10
    assert ev["val_mse"] > 100
    # the baselines are scored on the same windows and masks, and the gain says it has not learned
    assert np.isfinite(ev["val_r2_zero"]) and ev["val_r2_zero"] > -1
    from brainlm.train.reconstruction import BASELINES

    best = max(ev[f"val_r2_{b}"] for b in BASELINES)
    assert {"cond_gaussian", "space_time"} <= set(BASELINES)
    assert ev["val_r2_best_baseline"] == best
    assert ev["val_r2_gain"] == pytest.approx(ev["val_r2"] - best)
    # ... and per validation subject; one subject gives no interval, so no verdict either
    subjects = ev["val_r2_by_subject"]
    assert len(subjects) == 1 and all(v < -10 for v in subjects.values())
    assert set(ev["val_common_r2_best_baseline_by_subject"]) == set(subjects)
    assert np.isnan(ev["val_r2_gain_low"]) and np.isnan(ev["val_common_r2_gain_high"])
    assert ev["val_verdict"] == ev["val_common_verdict"] == "undecided"


def test_bad_attention_kernel_is_refused_before_anything_runs(store, tmp_path):
    from brainlm.errors import ConfigError

    cfg = PretrainConfig(data=store, out=tmp_path / "x", attention_kernel="fastest")
    with pytest.raises(ConfigError, match="attention kernel 'fastest' must be one of auto"):
        pretrain(cfg)
    assert not (tmp_path / "x").exists()


def test_bad_pretrain_settings(store, tmp_path, capsys):
    from brainlm.cli import main

    def refused(args, message):
        assert main(["pretrain", "--out", str(tmp_path / "x")] + args) == 2
        err = capsys.readouterr().err
        assert message in err, err

    refused(["--data", str(store), "--batch-size", "3", "--grad-accum", "2", "--window", "40",
             "--patch-size", "10"], "not divisible")
    refused(["--data", str(tmp_path / "nowhere")], "not a processed store")
    refused(["--data", str(store), "--mask-ratio", "1.5", "--window", "40", "--patch-size", "10"],
            "--mask-ratio: 1.5 must be <= 1")
    for ratio, message in (("0", "masks nothing"), ("0.999", "masks 48")):
        refused(["--data", str(store), "--mask-ratio", ratio] + COMMON, message)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_embed_cli_with_our_model_and_with_released_weights(store, tmp_path, capsys):
    from transformers import ViTMAEConfig

    from brainlm.cli import main

    from brainlm.model.legacy import save_random_released

    ours = tmp_path / "ours"
    assert main(["pretrain", "--data", str(store), "--out", str(ours), "--max-steps", "2"]
                + COMMON) == 0
    released = tmp_path / "released"
    save_random_released(released, ViTMAEConfig(
        image_size=48, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64))
    tables = {}
    for name, extra in (("ours", []), ("released", ["--window", "40"])):
        out = tmp_path / f"{name}.parquet"
        assert main(["embed", "--model", str(tmp_path / name), "--data", str(store), "--out",
                     str(out)] + extra) == 0
        tables[name] = pd.read_parquet(out)
    for name, width in (("ours", 64), ("released", 32)):
        t = tables[name]
        assert len(t) == 10 and t["recording_id"].is_unique
        assert {f"cls_{width - 1}", f"mean_{width - 1}"} <= set(t.columns)
        assert f"cls_{width}" not in t.columns
        values = t.filter(regex="^(cls|mean)_").to_numpy()
        assert np.isfinite(values).all() and values.std(axis=0).max() > 0
        assert (t["n_windows"] == T // 40).all()
    capsys.readouterr()
    assert main(["embed", "--model", str(tmp_path / "released"), "--data", str(store), "--out",
                 str(tmp_path / "x.parquet")]) == 2  # the default 200-timepoint window is too big
    assert "nor large enough for a 12 x 200 window" in capsys.readouterr().err


def test_settle_reads_the_device_once_and_stops_at_a_non_finite_value():
    from brainlm.train.pretrain import settle

    pending = [(1, torch.tensor(0.5), torch.tensor(2.0), 1e-3),
               (2, torch.tensor(0.25, dtype=torch.bfloat16), torch.tensor(1.0), 2e-3)]
    good = [{"step": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0},
            {"step": 2, "loss": 0.25, "lr": 2e-3, "grad_norm": 1.0}]
    assert settle(pending, 1e-3) == (good, None)
    bad = pending + [(3, torch.tensor(float("nan")), torch.tensor(1.0), 3e-3),
                     (4, torch.tensor(0.1), torch.tensor(1.0), 3e-3)]
    records, problem = settle(bad, 1e-3)
    assert records == good  # the steps before the bad one are kept
    assert problem.startswith("the loss became nan at step 3")
    inf_grad = pending + [(3, torch.tensor(0.2), torch.tensor(float("inf")), 3e-3)]
    assert settle(inf_grad, 1e-3) == (good, "the gradient norm became inf at step 3: lower "
                                      "the learning rate (now 1.00e-03), or look for huge "
                                      "values in the store (brainlm validate)")


def test_a_diverging_run_stops_with_its_history_and_no_checkpoint(store, tmp_path):
    from brainlm.errors import ConfigError

    cfg = PretrainConfig(data=store, out=tmp_path / "m", window=40, patch_size=10,
                         batch_size=4, windows_per_recording=2, workers=0, max_steps=30,
                         eval_every=100, ckpt_every=100, progress=False, base_lr=1e30,
                         warmup_steps=1)
    with pytest.raises(ConfigError, match=r"became (nan|inf|-inf) at step \d+: lower the"):
        pretrain(cfg)
    assert not (tmp_path / "m" / "checkpoints" / "last.pt").exists()
