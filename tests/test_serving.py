"""Registered fine-tuned models answer their task: through `models:/` and through
`mlflow models serve`, on unscaled recordings, with what the fine-tuning run predicted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.helpers import age_effect_setup
from brainlm import registry
from brainlm.data.store import BrainStore
from brainlm.train.finetune import FinetuneConfig, finetune

P, T = 10, 120


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A store, three fine-tuning runs on it (regression, classification, forecast), each
    registered in a fresh SQLite registry."""
    root = age_effect_setup(tmp_path_factory.mktemp("serve"), 20, T, P)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    base = dict(model=root / "model", data=root / "store", epochs=2, batch_size=8,
                progress=False)
    out = {}
    try:
        for name, kw in {"age": dict(target="age"),
                         "group": dict(target="group", task="classification"),
                         "forecast": dict(task="forecast", horizon=10, mode="full",
                                          windows_per_recording=1)}.items():
            run = root / name
            finetune(FinetuneConfig(out=run, **base, **kw))
            out[name] = (run, registry.log_finetuned(run, repo_root=root))
        yield root, uri, out
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _test_recordings(root: Path):
    """The test split's recordings as the user has them (the raw tables, unscaled, [P, T]),
    and as the store holds them (scaled)."""
    store = BrainStore(root / "store")
    rows = store.recordings("test")
    raw = [np.load(Path(p)).T for p in rows["source_path"]]
    return rows, raw, [np.asarray(store.load(r)) for _, r in rows.iterrows()]


def test_regression_model_predicts_what_the_run_predicted(runs):
    root, _, out = runs
    run, version = out["age"]
    rows, raw, scaled = _test_recordings(root)
    expected = pd.read_parquet(run / "predictions.parquet").set_index("recording_id").loc[
        rows["recording_id"], "y_pred"].to_numpy()
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    got = model.predict(pd.DataFrame({"signal": [x.tolist() for x in raw]}))
    assert list(got.columns) == ["prediction"]
    np.testing.assert_allclose(got["prediction"].to_numpy(), expected, rtol=1e-4, atol=1e-3)
    again = model.predict(pd.DataFrame({"signal": [x.tolist() for x in scaled]}),
                          params={"scaled": True})
    np.testing.assert_allclose(again["prediction"].to_numpy(), expected, rtol=1e-6, atol=1e-6)
    assert np.ptp(expected) > 0  # different recordings, different answers


def test_classification_model_gives_labels_and_probabilities(runs):
    root, _, out = runs
    run, version = out["group"]
    rows, raw, _ = _test_recordings(root)
    expected = pd.read_parquet(run / "predictions.parquet").set_index("recording_id").loc[
        rows["recording_id"]]
    got = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict(
        pd.DataFrame({"signal": [x.tolist() for x in raw]}))
    assert list(got.columns) == ["prediction", "proba_old", "proba_young"]
    assert got["prediction"].tolist() == expected["y_pred"].astype(str).tolist()
    for c in ("old", "young"):
        np.testing.assert_allclose(got[f"proba_{c}"], expected[f"proba_{c}"], atol=1e-4)


def test_forecast_model_predicts_the_next_timepoints(runs):
    """The first test window's context as a recording: the forecast the run scored for it."""
    root, _, out = runs
    run, version = out["forecast"]
    _, _, scaled = _test_recordings(root)
    window, horizon = 40, 10
    expected = np.load(run / "forecast.npz")["test_pred"][0]  # [P, horizon]
    got = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict(
        pd.DataFrame({"signal": [scaled[0][:, :window - horizon].tolist()]}),
        params={"scaled": True})
    forecast = np.asarray(got["forecast"][0])
    assert forecast.shape == (P, horizon)
    np.testing.assert_allclose(forecast, expected, rtol=1e-4, atol=1e-5)


def test_wrong_recordings_get_one_clear_message(runs):
    from brainlm.errors import ConfigError
    from brainlm.predictor import FinetunedModel

    run, _ = runs[2]["age"]
    model = FinetunedModel(run)
    with pytest.raises(ConfigError, match=r"recording 0: shape \[9, 120\].*\[10 parcels"):
        model.predict([np.zeros((9, 120))])
    with pytest.raises(ConfigError, match=r"recording 1: shape \[10, 20\]"):
        model.predict([np.zeros((10, 120)), np.zeros((10, 20))])
    bad = np.zeros((10, 120))
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="recording 0: NaN"):
        model.predict([bad])


def test_mlflow_models_serve_answers_with_the_same_predictions(runs, tmp_path):
    """`mlflow models serve -m models:/brainlm-age@champion --env-manager local` and a real
    HTTP request, as a user would send it."""
    import urllib.request

    from tests.services import free_port, stop, wait_for_http

    root, uri, out = runs
    run, version = out["age"]
    rows, raw, _ = _test_recordings(root)
    mlflow.MlflowClient().set_registered_model_alias(version.name, "champion", version.version)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{version.name}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc=server, timeout=120,
                      log=tmp_path / "serve.log")
        body = json.dumps({"dataframe_records": [{"signal": x.tolist()} for x in raw]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop(server)
        log.close()
    got = [row["prediction"] for row in answer["predictions"]]
    expected = pd.read_parquet(run / "predictions.parquet").set_index("recording_id").loc[
        rows["recording_id"], "y_pred"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_brainlm_predict_scores_a_new_cohort_and_reports_drift(runs, tmp_path, capsys):
    """`brainlm predict` on the raw tables: the model's preprocessing and scaler, the run's
    predictions for the recordings it saw; a cohort with 3x the amplitude is flagged."""
    import shutil

    from brainlm.cli import main

    root, _, out = runs
    run, version = out["age"]
    argv = ["predict", "--model", str(run), "--atlas", "A424", "--coords",
            str(root / "coords.tsv"), "--input-tr", "0.735", "--cache-dir", str(tmp_path / "c")]
    assert main(argv + ["--input", str(root / "raw"), "--out", str(tmp_path / "p.parquet")]) == 0
    got = pd.read_parquet(tmp_path / "p.parquet").set_index("recording_id")
    assert len(got) == 20 and {"subject", "source_path", "prediction"} <= set(got.columns)
    ran = pd.read_parquet(run / "predictions.parquet").set_index("recording_id")
    np.testing.assert_allclose(got.loc[ran.index, "prediction"], ran["y_pred"], rtol=1e-4,
                               atol=1e-3)
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["recordings"] == 20 and report["drift"]["drifted_parcels"] == []

    louder = tmp_path / "louder"
    louder.mkdir()
    for f in (root / "raw").glob("*.npy"):
        x = np.load(f)
        np.save(louder / f.name, x.mean(0) + 3 * (x - x.mean(0)))
    shutil.copy(root / "raw" / "participants.tsv", louder)
    capsys.readouterr()
    assert main(argv + ["--input", str(louder), "--out", str(tmp_path / "l.parquet")]) == 0
    report = json.loads((tmp_path / "l.report.json").read_text())
    assert report["drift"]["drifted_parcels"] == list(range(P))  # every IQR tripled
    assert report["drift"]["suite"] == "drift_from_training" and not report["drift"]["success"]
    assert report["drift"]["iqr_moved"] == list(range(P)) and report["drift"]["median_moved"] == []
    assert "parcels drifted from the training distribution" in capsys.readouterr().err


def test_brainlm_predict_refuses_a_model_without_a_head(runs, tmp_path, capsys):
    from brainlm.cli import main

    root, _, _ = runs
    registry.log_pretrained(root / "model", repo_root=root)
    assert main(["predict", "--model", "models:/brainlm-pretrain/1", "--input",
                 str(root / "raw"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "without a head" in capsys.readouterr().err
    assert main(["predict", "--model", "models:/brainlm-nothing@champion", "--input",
                 str(root / "raw"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "cannot load the registered model" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


class _Planted(mlflow.pyfunc.PythonModel):
    """A pyfunc whose pickle runs a command when it is loaded (what an attacker with write
    access to the registry could register)."""

    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

    def predict(self, context, model_input):
        return model_input


def test_a_pickled_registered_model_is_refused_before_anything_of_it_runs(runs, tmp_path,
                                                                            capsys):
    """`brainlm predict` reads a registered version's files and checks its MLmodel first: a
    pickled python_model (or any other loader or artifact list) is refused by name, and the
    command planted in its pickle never runs; the real versions keep loading."""
    from brainlm.cli import main

    root, _, out = runs
    marker = tmp_path / "pwned"
    planted = _Planted()
    planted.marker = marker
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=planted)
    marker.unlink(missing_ok=True)  # MLflow itself loads what it logs: that ran it once
    version = mlflow.register_model(info.model_uri, "brainlm-planted")
    mlflow.MlflowClient().set_registered_model_alias("brainlm-planted", "champion",
                                                     version.version)
    assert main(["predict", "--model", "models:/brainlm-planted@champion", "--input",
                 str(root / "raw"), "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "not this project's BrainLM pyfunc" in err and "pickled python_model" in err
    assert not marker.exists() and not (tmp_path / "x.parquet").exists()
    _, real = out["age"]
    assert main(["predict", "--model", f"models:/{real.name}/{real.version}", "--atlas", "A424",
                 "--coords", str(root / "coords.tsv"), "--input-tr", "0.735", "--cache-dir",
                 str(tmp_path / "c"), "--input", str(root / "raw"), "--out",
                 str(tmp_path / "ok.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "ok.parquet")) == 20


def test_a_registered_version_with_foreign_artifacts_is_refused(tmp_path):
    from brainlm.errors import ConfigError
    from brainlm.registered import check_mlmodel

    (tmp_path / "artifacts" / "model").mkdir(parents=True)
    spec = {"flavors": {"python_function": {
        "loader_module": "mlflow.pyfunc.loaders.code_model",
        "model_code_path": "/x/brainlm/mlflow_model.py",
        "artifacts": {"model": {"path": "artifacts/model"}}}}}
    import yaml

    (tmp_path / "MLmodel").write_text(yaml.safe_dump(spec))
    assert check_mlmodel(tmp_path, "models:/m/1") == {"model": tmp_path / "artifacts" / "model"}
    for change, message in [
        (lambda f: f["python_function"]["artifacts"].update(extra={"path": "artifacts/model"}),
         "artifacts"),
        (lambda f: f["python_function"]["artifacts"]["model"].update(path="../../etc"),
         "not a folder inside the model"),
        (lambda f: f.update(sklearn={"pickled_model": "model.pkl"}), "flavours"),
        (lambda f: f["python_function"].update(model_code_path="/x/evil.py"), "model code"),
    ]:
        bad = json.loads(json.dumps(spec))
        change(bad["flavors"])
        (tmp_path / "MLmodel").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message):
            check_mlmodel(tmp_path, "models:/m/1")


def test_brainlm_predict_refuses_another_atlas_parcel_count_or_tr(runs, tmp_path, capsys):
    """The model's preprocessing is the only one allowed: parcels from another atlas (other
    coordinates) or of another count are refused with the scaler's reason; recordings whose
    TR leaves less than one window at the model's TR are named, and nothing is written."""
    import pandas as pd

    from brainlm.cli import main

    root, _, out = runs
    run, _ = out["age"]
    base = ["predict", "--model", str(run), "--atlas", "A424", "--cache-dir", str(tmp_path / "c"),
            "--out", str(tmp_path / "x.parquet")]
    coords = pd.read_csv(root / "coords.tsv", sep="\t")
    (coords + 5).to_csv(tmp_path / "moved.tsv", sep="\t", index=False)
    assert main(base + ["--input", str(root / "raw"), "--coords", str(tmp_path / "moved.tsv"),
                        "--input-tr", "0.735"]) == 2
    assert "scaler was fitted on atlas" in capsys.readouterr().err

    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in sorted((root / "raw").glob("*.npy"))[:3]:
        np.save(fewer / f.name, np.load(f)[:, :P - 1])
    coords.iloc[:P - 1].to_csv(tmp_path / "fewer.tsv", sep="\t", index=False)
    assert main(base + ["--input", str(fewer), "--coords", str(tmp_path / "fewer.tsv"),
                        "--input-tr", "0.735"]) == 2
    assert f"scaler has {P} parcels, data have {P - 1}" in capsys.readouterr().err

    assert main(base + ["--input", str(root / "raw"), "--coords", str(root / "coords.tsv"),
                        "--input-tr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "no recording could be processed" in err and "0.1 s" in err, err
    assert not (tmp_path / "x.parquet").exists()


def test_brainlm_predict_names_an_unreachable_registry(runs, tmp_path, capsys, monkeypatch):
    """A registry URI nobody answers at: one message naming it, at once (MLflow alone retries
    for minutes), and no output."""
    import time

    from brainlm.cli import main
    from tests.services import free_port

    root, _, _ = runs
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    start = time.monotonic()
    assert main(["predict", "--model", "models:/brainlm-age@champion", "--input",
                 str(root / "raw"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"tracking server {dead} is not reachable" in err, err
    assert not (tmp_path / "x.parquet").exists()
