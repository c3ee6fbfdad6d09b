"""Model registry: pyfunc logging with lineage, embeddings through `models:/`, promotion by metric.

Everything runs against a private SQLite store in a temporary folder (no server, no network).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

mlflow = pytest.importorskip("mlflow")
torch = pytest.importorskip("torch")

from brainlm import promotion, registry  # noqa: E402
from brainlm.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite tracking store; cwd moves there too so nothing lands in the repo."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp.as_posix()}/mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        try:
            yield tmp
        finally:
            mlflow.set_tracking_uri(previous)  # None unsets it again
    assert os.environ.get("MLFLOW_TRACKING_URI") == previous


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny untrained Family A folder as pretraining writes it (scaler is a stand-in)."""
    from brainlm.model.config import BrainLMConfig
    from brainlm.model.modeling import BrainLMForPretraining

    folder = tmp_path_factory.mktemp("pretrained")
    config = BrainLMConfig.from_preset("tiny", window=40, patch_size=10)
    config.parcel_coords = np.random.default_rng(0).uniform(-60, 60, (10, 3)).round(2).tolist()
    torch.manual_seed(0)
    model = BrainLMForPretraining(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "scaler.safetensors").write_bytes(b"not a real scaler")
    (folder / "metrics.json").write_text(json.dumps({"val_mse": 0.42, "val_r2": None,
                                                     "step": 3}))
    (folder / "README.md").write_text("# tiny test model\n")
    return folder, model


@pytest.fixture(scope="module")
def registered(store, pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")  # a repository root without git or DVC files
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    return registry.log_pretrained(pretrained[0], repo_root=root), root


def windows(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 10, 40)).astype(np.float32)


# ---------------------------------------------------------------------------- where / lineage

def test_default_tracking_uri_is_absolute(tmp_path, monkeypatch):
    uri = registry.default_tracking_uri()
    assert uri.startswith("sqlite:///") and uri.endswith("mlflow/mlflow.db")
    assert Path(uri[len("sqlite:///"):]).is_absolute()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")  # found upward from a sub-folder
    assert registry.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert registry.tracking_uri() == "sqlite:////elsewhere/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert registry.tracking_uri() == registry.default_tracking_uri()


def test_lineage_tags(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    tags = registry.lineage_tags(tmp_path)
    assert tags["lineage.git_commit"] == "unknown"
    assert tags["lineage.data_dvc_sha256"] == "missing"
    assert tags["lineage.dvc_lock_sha256"] == "missing"
    assert tags["lineage.params_sha256"] == hashlib.sha256(b"seed: 0\n").hexdigest()
    if not (REPO / ".git").exists():
        pytest.skip("the checkout has no .git")
    commit = registry.lineage_tags(REPO)["lineage.git_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit), commit


# ---------------------------------------------------------------------------- logging

def test_log_pretrained_registers_version_with_lineage(registered, store):
    mv, root = registered
    assert (mv.name, str(mv.version)) == ("brainlm-pretrain", "1")
    tags = mv.tags
    assert tags["lineage.git_commit"] == "unknown"  # the tmp repository root is not in git
    assert tags["lineage.data_dvc_sha256"] == "missing"
    assert tags["lineage.dvc_lock_sha256"] == hashlib.sha256(
        (root / "dvc.lock").read_bytes()).hexdigest()
    assert float(tags["metric.val_mse"]) == pytest.approx(0.42)
    assert "metric.val_r2" not in tags  # null in metrics.json: not a number
    assert tags["config.n_parcels"] == "10" and tags["config.window"] == "40"
    assert mv.description.startswith("# tiny test model")
    client = mlflow.MlflowClient()
    # the logged model knows its registered version (the MLflow UI's link)
    assert mv.source.startswith("models:/m-")  # registered from the logged model
    model_id = mv.source.split("/")[-1]
    linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert linked == [{"name": "brainlm-pretrain", "version": 1}] or \
        [(d["name"], str(d["version"])) for d in linked] == [("brainlm-pretrain", "1")]
    run = client.get_run(tags["source_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "register"
    assert run.data.tags["lineage.data_dvc_sha256"] == "missing"
    assert run.data.metrics["val_mse"] == pytest.approx(0.42)
    # artifacts live beside the store, not under whatever folder was current
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith(
        (store / "artifacts").as_uri())


def test_registered_pyfunc_returns_the_models_embeddings(registered, pretrained):
    import pandas as pd

    _, model = pretrained
    loaded = mlflow.pyfunc.load_model("models:/brainlm-pretrain/1")
    x = windows(2)
    out = loaded.predict(pd.DataFrame({"signal": [w.tolist() for w in x]}))
    assert out.shape == (2, 64)
    assert list(out.columns[:2]) == ["cls_0", "cls_1"]
    with torch.no_grad():
        expected = model.embed(torch.from_numpy(x))
    np.testing.assert_allclose(out.to_numpy(), expected["cls"].numpy(), rtol=1e-5, atol=1e-6)
    mean = loaded.predict(pd.DataFrame({"signal": list(x)}), params={"pooling": "mean"})
    np.testing.assert_allclose(mean.to_numpy(), expected["mean"].numpy(), rtol=1e-5, atol=1e-6)
    one = loaded.predict({"signal": x[1].tolist()})  # a dict is one window
    np.testing.assert_allclose(one.to_numpy()[0], expected["cls"][1].numpy(), atol=1e-6)
    with pytest.raises(Exception, match="expects"):
        loaded.predict(pd.DataFrame({"signal": [np.zeros((10, 30)).tolist()]}))
    meta = loaded.metadata
    assert meta.get_input_schema().input_names() == ["signal"]
    assert len(meta.get_output_schema().input_names()) == 64


def test_log_pretrained_refuses_folders_it_cannot_serve(store, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    with pytest.raises(ConfigError, match="brainlm"):
        registry.log_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a pretrained model folder"):
        registry.log_pretrained(tmp_path / "nothing")


def test_log_finetuned_serves_the_tuned_encoder(registered, pretrained, tmp_path):
    """A `mode: full` run: the registered pyfunc answers the task (the head over the run's
    tuned encoder, in the target's units), not with embeddings."""
    import pandas as pd
    from safetensors.torch import save_file

    folder, model = pretrained
    run = tmp_path / "ft"
    (run / "evaluation").mkdir(parents=True)
    (run / "finetune.json").write_text(json.dumps({
        "config": {"task": "regression", "mode": "full", "pooling": "cls", "target": "age"},
        "best_val_loss": 0.9, "window": 40, "model": str(folder), "classes": None,
        "target_mean": 50.0, "target_std": 10.0}))
    head_w = torch.linspace(-1, 1, 64)[None]
    tuned = {k: v + 0.01 for k, v in model.state_dict().items()}
    save_file({f"encoder.{k}": v.contiguous() for k, v in tuned.items()}
              | {"head.linear.weight": head_w, "head.linear.bias": torch.full((1,), 0.5)},
              str(run / "finetuned.safetensors"))
    (run / "evaluation" / "results.json").write_text(json.dumps([
        {"method": "brainlm", "metric": "r2", "value": 0.31, "low": 0.1, "high": 0.5,
         "split": "val"},
        {"method": "brainlm", "metric": "r2", "value": 0.27, "low": 0.05, "high": 0.45,
         "split": "test"},
        {"method": "fc_linear", "metric": "r2", "value": 0.2, "low": 0.0, "high": 0.4,
         "split": "val"}]))
    (run / "evaluation" / "results.md").write_text("| method | r2 |\n")
    with pytest.raises(ConfigError, match="age"):
        registry.log_finetuned(run, "sex")
    client = mlflow.MlflowClient()
    training_run = client.create_run(client.create_experiment("finetune")).info.run_id
    mv = registry.log_finetuned(run, "age", repo_root=tmp_path, run_id=training_run)
    assert (mv.name, str(mv.version)) == ("brainlm-age", "1")
    assert mv.tags["source_run_id"] == training_run  # logged into the given run
    logged = client.get_run(training_run).data
    assert logged.tags["lineage.git_commit"] == "unknown" and not logged.metrics
    assert float(mv.tags["metric.r2"]) == pytest.approx(0.31)  # brainlm's row, not fc_linear's
    assert float(mv.tags["metric.r2.low"]) == pytest.approx(0.1)  # validation: promotion's
    assert float(mv.tags["metric.test_r2"]) == pytest.approx(0.27)  # test: reported only
    assert mv.tags["finetune.mode"] == "full"
    assert mv.description.startswith("| method | r2 |")
    x = windows(3, seed=2)  # three recordings of one window each, already scaled
    loaded = mlflow.pyfunc.load_model("models:/brainlm-age/1")
    assert [c.name for c in loaded.metadata.get_output_schema().inputs] == ["prediction"]
    out = loaded.predict(pd.DataFrame({"signal": list(x)}), params={"scaled": True})
    from brainlm.model.modeling import BrainLMForPretraining

    tuned_model = BrainLMForPretraining(model.config).eval()
    tuned_model.load_state_dict(tuned)
    with torch.no_grad():
        def age(m):
            return ((m.embed(torch.from_numpy(x))["cls"] @ head_w.T)[:, 0] + 0.5) * 10 + 50

        expected, untuned = age(tuned_model).numpy(), age(model).numpy()
    assert list(out.columns) == ["prediction"]
    np.testing.assert_allclose(out["prediction"].to_numpy(), expected, rtol=1e-5, atol=1e-4)
    assert not np.allclose(out["prediction"].to_numpy(), untuned, atol=1e-3)


# ---------------------------------------------------------------------------- promotion

def _versions(client, name: str, n: int, tmp_path) -> list[str]:
    """Cheap registered versions (promotion only reads tags and aliases)."""
    client.create_registered_model(name)
    return [str(client.create_model_version(name, source=(tmp_path / f"v{i}").as_uri()).version)
            for i in range(n)]


def _champion(client, name):
    return str(client.get_model_version_by_alias(name, "champion").version)


def _evidence(value: float, spread: float = 0.01, n: int = 12, seed: int = 0) -> dict:
    """Per-subject validation scores whose mean is `value`: each subject's score is the value
    plus a subject effect (shared by every version, so it cancels in a paired difference) and
    `spread` of version-specific noise."""
    rng = np.random.default_rng(seed)
    subject = np.random.default_rng(99).normal(0, 0.2, n)
    noise = rng.normal(0, spread, n)
    scores = value + subject - subject.mean() + noise - noise.mean()
    return promotion.subject_scores({f"sub-{i:02d}": v for i, v in enumerate(scores)})


@pytest.mark.parametrize("metric,higher,values", [
    ("r2", True, (0.30, 0.25, 0.35)),   # first, worse, better
    ("mse", False, (0.50, 0.60, 0.40)),
])
def test_promotion_by_metric(store, tmp_path, metric, higher, values):
    client = mlflow.MlflowClient()
    name = f"promo-{metric}"
    v1, v2, v3 = _versions(client, name, 3, tmp_path)

    def promote(v, value, seed):
        return promotion.promote(name, v, metric, value, higher, client=client,
                                 evidence=_evidence(value, seed=seed))

    first = promote(v1, values[0], 1)
    assert first["decision"] == "promoted" and first["compared_with"] is None
    assert first["champion_value"] is None and _champion(client, name) == v1

    worse = promote(v2, values[1], 2)
    assert worse["decision"] == "kept_champion" and worse["compared_with"] == v1
    assert worse["champion_value"] == values[0] and worse["difference"]["verdict"] == "worse"
    assert worse["difference"]["high"] < 0
    assert _champion(client, name) == v1
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v2
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "kept_champion"
    assert tags["promotion.compared_with"] == v1
    assert float(tags["promotion.champion_value"]) == values[0]
    assert float(tags[f"metric.{metric}"]) == values[1]

    better = promote(v3, values[2], 3)
    assert better["decision"] == "promoted" and better["champion_version"] == v3
    assert better["difference"]["low"] > 0
    assert _champion(client, name) == v3
    assert client.get_model_version(name, v3).tags["promotion.decision"] == "promoted"
    assert client.get_model_version(name, v1).tags["promotion.replaced_by"] == v3
    # the challenger is the best version that is not champion (v1 at values[0]), not the
    # latest one (v2)
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v1
    # a tie is not shown better
    tie = promote(v2, values[2], 4)
    assert tie["decision"] == "kept_champion" and _champion(client, name) == v3
    assert tie["difference"]["verdict"] == "undecided"


def test_a_better_point_whose_interval_spans_zero_is_not_promoted(store, tmp_path):
    """Promotion needs the paired interval over validation subjects above 0: a challenger
    better on average by noise across subjects stays the challenger."""
    client = mlflow.MlflowClient()
    name = "promo-noisy"
    v1, v2, v3 = _versions(client, name, 3, tmp_path)
    promotion.promote(name, v1, "r2", 0.50, True, client=client, evidence=_evidence(0.50))
    noisy = _evidence(0.53, spread=0.15, seed=5)  # +0.03 on average, +-0.15 per subject
    point = np.mean(list(noisy["scores"].values()))
    out = promotion.promote(name, v2, "r2", float(point), True, client=client, evidence=noisy)
    assert point > 0.50 and out["difference"]["value"] > 0
    assert out["difference"]["low"] < 0 < out["difference"]["high"]
    assert out["decision"] == "kept_champion" and _champion(client, name) == v1
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v2
    assert client.get_model_version(name, v2).tags["promotion.verdict"] == "undecided"
    # the same gain, consistent across subjects, is promoted
    clear = promotion.promote(name, v3, "r2", 0.53, True, client=client,
                              evidence=_evidence(0.53, spread=0.005, seed=6))
    assert clear["decision"] == "promoted" and clear["difference"]["low"] > 0


def test_predictions_are_paired_on_the_shared_recordings(store, tmp_path):
    """Fine-tuned models carry their validation predictions; the metric (R^2 here) is
    recomputed on each resample of subjects for both, on the same recordings."""
    client = mlflow.MlflowClient()
    name = "promo-preds"
    v1, v2 = _versions(client, name, 2, tmp_path)
    rng = np.random.default_rng(0)
    y = rng.uniform(20, 80, 30)

    def ev(err):
        return promotion.predictions("regression", "r2", None, [
            (f"sub-{i:02d}_rest", f"sub-{i:02d}", float(y[i]), float(y[i] + e))
            for i, e in enumerate(err)])

    weak, strong = rng.normal(0, 15, 30), rng.normal(0, 3, 30)
    promotion.promote(name, v1, "r2", 0.1, True, client=client, evidence=ev(weak))
    out = promotion.promote(name, v2, "r2", 0.9, True, client=client, evidence=ev(strong))
    assert out["decision"] == "promoted" and out["difference"]["low"] > 0
    assert out["difference"]["n_subjects"] == 30
    # other recordings: nothing to pair, not comparable
    other = promotion.predictions("regression", "r2", None, [("sub-99_rest", "sub-99", 1.0,
                                                               2.0)])
    with pytest.raises(ValueError, match="no validation recording"):
        promotion.paired_difference(other, ev(strong), True)


def test_long_evidence_is_split_over_tags(store, tmp_path):
    client = mlflow.MlflowClient()
    name = "promo-long"
    (v1,) = _versions(client, name, 1, tmp_path)
    big = promotion.subject_scores({f"sub-{i:06d}": i / 7 for i in range(12_000)})
    promotion.write_evidence(client, name, v1, big)
    tags = client.get_model_version(name, v1).tags
    assert tags[promotion.EVIDENCE].startswith("chunks:")
    assert promotion.read_evidence(client.get_model_version(name, v1)) == big


def test_promotion_refuses_what_it_cannot_compare(store, tmp_path):
    client = mlflow.MlflowClient()
    name = "promo-guard"
    v1, v2 = _versions(client, name, 2, tmp_path)
    with pytest.raises(ValueError, match="finite"):
        promotion.promote(name, v1, "r2", float("nan"), True, client=client)
    client.set_registered_model_alias(name, "champion", v1)  # set by hand: no recorded value
    with pytest.raises(ValueError, match="no finite tag metric.r2"):
        promotion.promote(name, v2, "r2", 0.5, True, client=client, evidence=_evidence(0.5))
    client.set_model_version_tag(name, v1, "metric.r2", "0.1")
    client.set_model_version_tag(name, v1, "promotion.split", "val-A")
    with pytest.raises(ValueError, match="not comparable"):
        promotion.promote(name, v2, "r2", 0.5, True, client=client, split="val-B",
                          evidence=_evidence(0.5))
    with pytest.raises(ValueError, match="no per-subject validation evidence"):
        promotion.promote(name, v2, "r2", 0.5, True, client=client, split="val-A",
                          evidence=_evidence(0.5))
    promotion.write_evidence(client, name, v1, _evidence(0.1))
    assert _champion(client, name) == v1
    assert promotion.promote(name, v2, "r2", 0.5, True, client=client, split="val-A",
                             evidence=_evidence(0.5))["decision"] == "promoted"


def test_registered_champion_loads_by_alias(registered, pretrained):
    """The deployment path: promote the pretrained model, then load `models:/name@champion`."""
    mv, _ = registered
    result = promotion.promote(mv.name, mv.version, "val_mse", 0.42, higher_is_better=False)
    assert result["decision"] == "promoted"
    out = mlflow.pyfunc.load_model("models:/brainlm-pretrain@champion").predict(
        {"signal": windows(1)[0].tolist()})
    assert out.shape == (1, 64)


def test_an_unchanged_model_is_found_by_its_fingerprint(registered, pretrained, tmp_path):
    import shutil

    mv, _ = registered
    folder, _ = pretrained
    fp = registry.pretrained_fingerprint(folder)
    assert mv.tags["fingerprint"] == fp
    assert str(registry.find_version("brainlm-pretrain", fp).version) == str(mv.version)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert registry.pretrained_fingerprint(copy) == fp  # content, not place
    (copy / "scaler.safetensors").write_bytes(b"another scaler")
    other = registry.pretrained_fingerprint(copy)
    assert other != fp and registry.find_version("brainlm-pretrain", other) is None


def test_a_nightly_run_that_ran_nothing_reports_the_registry_not_stale_words(
        registered, tmp_path):
    """flows/retrain: when dvc repro ran no register stage, the decisions are `unchanged` with
    the registry's current champion, whatever the last register.json said."""
    from flows.retrain import decisions_now

    mv, _ = registered
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("brainlm-pretrain", "champion", str(mv.version))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "register.json").write_text(json.dumps({
        "brainlm-pretrain@0.75": {"decision": "promoted", "champion_version": "99"},
        "brainlm-age": {"decision": "promoted", "champion_version": "7"}}))
    now = decisions_now(tmp_path, ran=[])
    assert now["brainlm-pretrain@0.75"] == {"decision": "unchanged",
                                            "champion_version": str(mv.version)}
    assert now["brainlm-age"] == {"decision": "unchanged", "champion_version": "None"}
    assert decisions_now(tmp_path, ran=["evaluate", "register"])["brainlm-age"][
        "decision"] == "promoted"


def test_the_gate_needs_an_interval_above_the_baseline(store, tmp_path):
    """register's gate: with no baseline measured (it could not be fitted), shown below it, or
    with an interval that holds 0, a candidate is held back with that decision; only a gain
    whose interval is above 0 competes for champion."""
    from types import SimpleNamespace

    from brainlm.jobs.register import Candidate, _candidate

    client = mlflow.MlflowClient()
    name = "promo-gate"
    v1, v2, v3, v4 = _versions(client, name, 4, tmp_path)

    def gate(v, value, verdict, low=-0.1, high=0.1):
        floor = None if verdict is None else {"name": "fc_linear", "value": 0.0, "low": low,
                                              "high": high, "verdict": verdict}
        return _candidate(name, SimpleNamespace(version=v), Candidate(
            "r2", value, True, "k", _evidence(value), floor), True)

    unmeasured = gate(v1, 0.5, None)
    assert unmeasured["decision"] == "no_baseline" and "could not be fitted" in \
        unmeasured["reason"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v1
    assert gate(v2, 0.45, "worse", -0.3, -0.1)["decision"] == "below_baseline"
    undecided = gate(v3, 0.55, "undecided")
    assert undecided["decision"] == "baseline_undecided" and "not shown above" in \
        undecided["reason"]
    # the best held-back version is the challenger, whatever came last
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v3
    above = gate(v4, 0.7, "better", 0.05, 0.2)
    assert above["decision"] == "promoted" and _champion(client, name) == v4
    assert client.get_model_version(name, v1).tags["promotion.decision"] == "no_baseline"


def test_promotion_never_reads_the_test_split(tmp_path):
    """register's candidates (score, key, evidence, gate) come from the validation split only:
    changing every test score, test prediction and test subject changes none of them."""
    import pandas as pd

    from brainlm.jobs.register import RegisterConfig, _finetuned_candidate, _split_hashes

    root = tmp_path
    for d in ("processed", "runs/finetune", "runs/evaluation"):
        (root / d).mkdir(parents=True)
    (root / "processed" / "store.json").write_text(json.dumps({"atlas_hash": "abc"}))
    (root / "runs" / "finetune" / "finetune.json").write_text(json.dumps(
        {"config": {"target": "age", "task": "regression"}, "classes": None}))
    rng = np.random.default_rng(0)

    def write(test_value: float, test_subjects: list[str]):
        subjects = [f"sub-v{i}" for i in range(6)] + test_subjects
        split = ["val"] * 6 + ["test"] * len(test_subjects)
        pd.DataFrame({"subject": subjects, "split": split}).to_parquet(
            root / "processed" / "manifest.parquet")
        y = rng.uniform(20, 80, len(subjects))
        pd.DataFrame({"recording_id": [f"{s}_rest" for s in subjects], "subject": subjects,
                      "split": split, "y_true": y,
                      "y_pred": np.where(np.array(split) == "val", y + 1.0, test_value)}
                     ).to_parquet(root / "runs" / "finetune" / "predictions.parquet")
        rows = [{"method": m, "metric": "r2", "value": v, "split": s}
                for s, vals in (("val", (0.6, 0.4)), ("test", (test_value, -test_value)))
                for m, v in zip(("brainlm", "fc_linear"), vals)]
        (root / "runs" / "evaluation" / "results.json").write_text(json.dumps(rows))
        comps = [{"split": s, "metric": "r2", "baseline": "fc_linear", "value": d,
                  "low": d - 0.1, "high": d + 0.1, "verdict": "better" if d > 0.1 else "worse",
                  "brainlm": 0.0, "baseline_value": 0.0, "n_subjects": 6}
                 for s, d in (("val", 0.2), ("test", test_value))]
        (root / "runs" / "evaluation" / "comparisons.json").write_text(json.dumps(comps))
        cfg = RegisterConfig(root=root, mask_ratios=(0.75,), finetune_mask_ratio=0.75)
        return _finetuned_candidate(cfg, root, _split_hashes(root))

    first = write(0.9, ["sub-t1", "sub-t2"])
    rng = np.random.default_rng(0)  # the same validation targets again
    second = write(-5.0, ["sub-t7", "sub-t8", "sub-t9"])
    assert first == second
    assert first.value == 0.6 and first.floor["verdict"] == "better"
    assert all(s.startswith("sub-v") for s, _, _ in first.evidence["rows"].values())
