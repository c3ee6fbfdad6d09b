"""`dvc repro` end to end in a fresh git repository, on a micro profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO = {
    "synth": {"subjects": 10, "timepoints": 60, "seed": 0, "voxel_size": 8},
    "preprocess": {"tr": 0.735, "window": 40, "split": [0.6, 0.2, 0.2], "seed": 0, "workers": 1,
                   "standardize": "psc", "atlas": None},
    "validate": {"median_tol": 0.1, "iqr_tol": 0.2, "max_abs": 100.0},
    "pretrain": {"profile": "tiny", "max_steps": 4, "batch_size": 4, "window": 40,
                 "patch_size": 10, "eval_every": 2, "ckpt_every": 2, "windows_per_recording": 1,
                 "workers": 0, "seed": 0, "attention_kernel": "math"},
    "finetune": {"target": "age", "task": "regression", "mode": "probe", "epochs": 2,
                 "batch_size": 8, "lr": 0.001},
    "tune": {"n_trials": 2, "study": "micro", "seed": 0},
    "evaluate": {"n_boot": 50},
    "register": {"metric": "r2", "higher_is_better": True},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, atlas_spec):
    root = tmp_path_factory.mktemp("dvcrepo")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    # the stages' code dependencies (what runs is the installed package: the same source)
    shutil.copytree(ROOT / "brainlm", root / "brainlm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    micro = {k: dict(v) for k, v in MICRO.items()}
    micro["preprocess"]["atlas"] = atlas_spec
    params.update(demo=micro, mask_ratios=[0.2, 0.75, 0.9], finetune_mask_ratio=0.75)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root / ".site"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store, as for a user

    def sh(*cmd, stdout_only=False):
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        return res.stdout if stdout_only else res.stdout + res.stderr

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    sh("brainlm", "stage", "synth")
    sh("dvc", "add", "data")
    return root, sh


def test_repro_runs_every_stage_then_nothing_then_only_what_changed(repo):
    root, sh = repo
    out = sh("dvc", "repro")
    for stage in ("preprocess", "validate", "pretrain@0.2", "pretrain@0.75", "pretrain@0.9",
                  "compare", "tune", "finetune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out, stage
    rows = json.loads((root / "runs" / "compare" / "mask_ratios.json").read_text())
    assert [r["mask_ratio"] for r in rows] == [0.2, 0.75, 0.9]
    assert all(r["val_common_r2"] is not None for r in rows)
    assert (root / "data.dvc").is_file() and (root / "dvc.lock").is_file()
    metrics = sh("dvc", "metrics", "show")
    assert "metrics/evaluate.json" in metrics and "metrics/pretrain-0.75.json" in metrics
    assert "best_value" in metrics  # the tuning study's best trial
    assert (root / "mlflow" / "optuna.db").is_file()  # the default Optuna storage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert len(runs) == 3  # one per mask ratio, each with params.yaml's kernel
    assert {r.data.params["attention_kernel"] for r in runs} == {"math"}

    register = json.loads((root / "metrics" / "register.json").read_text())
    assert set(register) == {"brainlm-pretrain@0.2", "brainlm-pretrain@0.75",
                             "brainlm-pretrain@0.9", "brainlm-age"}
    # honest promotion, on validation: a champion is shown above its best baseline (the
    # interval of the gain above 0); otherwise it is held back and may be the challenger
    held = {"below_baseline", "baseline_undecided"}
    for r in (0.2, 0.75, 0.9):
        m = json.loads((root / "models" / f"pretrain-{r:g}" / "metrics.json").read_text())
        decision = register[f"brainlm-pretrain@{r:g}"]["decision"]
        assert (decision in held) == (m["val_common_verdict"] != "learned"), (r, decision)
    vs = [c for c in json.loads((root / "runs" / "evaluation" / "comparisons.json").read_text())
          if c["split"] == "val" and c["metric"] == "r2"]
    best = max(vs, key=lambda c: c["baseline_value"])
    beats = best["verdict"] == "better"
    assert (register["brainlm-age"]["decision"] == "promoted") == beats
    assert beats or register["brainlm-age"]["decision"] in held
    age = client.get_model_version_by_alias("brainlm-age", "champion" if beats else "challenger")
    assert str(age.version) == "1" and age.tags["promotion.decision"] == \
        register["brainlm-age"]["decision"]
    # lineage: the version's source run is the fine-tuning run, with its loss curve
    source = client.get_run(age.tags["source_run_id"])
    assert client.get_experiment(source.info.experiment_id).name == "finetune"
    assert client.get_metric_history(source.info.run_id, "val_loss")

    _plots_render(sh, 3)

    again = sh("dvc", "repro")
    assert "Running stage" not in again  # a second repro does nothing
    tuned = (root / "metrics" / "tune.json").read_text()
    assert json.loads(tuned)["n_trials"] == 2
    assert json.loads(tuned)["storage"] == "sqlite:///mlflow/optuna.db"
    for committed in (root / "metrics").glob("*.json"):  # no machine path in git
        assert str(root) not in committed.read_text(), committed
    forced = sh("dvc", "repro", "-f", "-s", "tune")  # forced: the study is complete already
    assert "Running stage 'tune'" in forced
    assert (root / "metrics" / "tune.json").read_text() == tuned  # no trials added

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["demo"]["evaluate"]["n_boot"] = 60
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    changed = sh("dvc", "repro")
    assert "Running stage 'evaluate'" in changed
    for stage in ("preprocess", "validate", "pretrain@0.2", "tune", "finetune"):
        assert f"Running stage '{stage}'" not in changed, stage
    # register ran again on the same models: no new version, and it says so
    assert "Running stage 'register'" in changed
    register = json.loads((root / "metrics" / "register.json").read_text())
    assert {d["decision"] for d in register.values()} == {"unchanged"}
    assert len(client.search_model_versions("name = 'brainlm-pretrain'")) == 3
    assert len(client.search_model_versions("name = 'brainlm-age'")) == 1

    # back to n_boot 50: evaluate comes from DVC's run cache, but register.json is never
    # restored from it (the first run's "promoted" would be stale); it matches the registry
    params["demo"]["evaluate"]["n_boot"] = 50
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    restored = sh("dvc", "repro")
    assert "Running stage 'evaluate'" not in restored and "'evaluate' is cached" in restored
    assert "Running stage 'register'" in restored
    register = json.loads((root / "metrics" / "register.json").read_text())
    assert {d["decision"] for d in register.values()} == {"unchanged"}
    for key, d in register.items():
        aliases = {a: v.version for v in client.search_model_versions(
            f"name = '{key.split('@')[0]}'") for a in v.aliases}
        assert d["champion_version"] == str(aliases.get("champion")), (key, aliases)

    # code is a dependency: a change to the evaluation module reruns evaluate only ...
    evaluate_py = root / "brainlm" / "evaluate" / "metrics.py"
    evaluate_py.write_text(evaluate_py.read_text() + "\n# changed\n")
    changed = sh("dvc", "repro")
    assert "Running stage 'evaluate'" in changed
    for stage in ("preprocess", "validate", "pretrain@0.2", "pretrain@0.75", "finetune"):
        assert f"Running stage '{stage}'" not in changed, stage
    # ... one to the model marks every stage that trains one, and nothing upstream
    modeling = root / "brainlm" / "model" / "modeling.py"
    original = modeling.read_text()
    modeling.write_text(original + "\n# changed\n")
    (root / "brainlm" / "model" / "__pycache__").mkdir(exist_ok=True)
    status = sh("dvc", "status")
    for stage in ("pretrain@0.2", "pretrain@0.75", "pretrain@0.9", "tune", "finetune"):
        assert f"{stage}:" in status, stage
    for stage in ("preprocess", "validate", "evaluate", "register"):
        assert f"{stage}:" not in status, stage
    modeling.write_text(original)
    (root / "brainlm" / "model" / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    assert "Data and pipelines are up to date" in sh("dvc", "status")  # .pyc files ignored


def _plots_render(sh, n_ratios: int) -> None:
    """`dvc plots show --json`: every plot of dvc.yaml renders, with one point per step on each
    loss curve and one per evaluation on each validation curve."""
    shown = json.loads(sh("dvc", "plots", "show", "--json", stdout_only=True))
    assert not shown.get("errors"), shown["errors"]
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    ids = [next(iter(p)) if isinstance(p, dict) else p for p in plots]
    assert set(ids) <= set(shown["data"]), set(ids) - set(shown["data"])
    steps, evals = MICRO["pretrain"]["max_steps"], \
        MICRO["pretrain"]["max_steps"] // MICRO["pretrain"]["eval_every"]

    def points(plot_id):
        (vega,) = shown["data"][plot_id]
        values = vega["content"]["data"]["values"]
        counts = {}
        for v in values:
            key = v.get("filename::field") or v.get("filename")  # one curve each
            counts[key] = counts.get(key, 0) + 1
        return counts

    loss = points("pretraining loss")
    assert len(loss) == n_ratios and set(loss.values()) == {steps}, loss
    val = points("validation R^2 and the best baseline, common mask")
    assert len(val) == 2 * n_ratios and set(val.values()) == {evals}, val
    bars = points("mask ratios on one yardstick")
    assert sum(bars.values()) == n_ratios, bars


def test_mlflow_ui_shows_the_mask_ratios_side_by_side(repo, tmp_path):
    """What the MLflow UI shows, read through the REST API it uses: the pretrain experiment
    opens on its runs, one run per mask ratio named by profile and ratio, the compared columns
    under the same names in every run, and the reconstruction plot at one top-level path."""
    import urllib.request

    from tests.services import free_port, stop, wait_for_http

    root, _ = repo
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path, body=None):
        req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode()
                                     if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read())

    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, timeout=120,
                      log=tmp_path / "mlflow.log")
        exp = call("experiments/get-by-name?experiment_name=pretrain")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in \
            exp["tags"]
        runs = call("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        names = sorted(r["info"]["run_name"] for r in runs)
        assert names == [f"demo-tiny-mask{r}" for r in ("0.2", "0.75", "0.9")], names
        for r in runs:
            params = {p["key"] for p in r["data"]["params"]}
            metrics = {m["key"] for m in r["data"]["metrics"]}
            assert "mask_ratio" in params
            assert {"val_r2", "val_r2_gain", "val_common_r2", "val_common_r2_gain",
                    "probe_score"} <= metrics, sorted(metrics)
            files = call(f"artifacts/list?run_id={r['info']['run_id']}")["files"]
            assert "reconstruction.png" in {f["path"] for f in files}
        keys = [sorted(m["key"] for m in r["data"]["metrics"]) for r in runs]
        assert all(k == keys[0] for k in keys)  # the same columns in every run
    finally:
        stop(server)
        log.close()


_READ_RUNS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    arts = sorted((a for a in client.read_artifacts() if a.key == "retrain"),
                  key=lambda a: a.created)
    print(json.dumps({"tasks": [t.name for t in client.read_task_runs()],
                      "artifact": arts[-1].data if arts else ""}))
"""


def test_prefect_deployment_retrain_nightly_completes(repo, tmp_path):
    """A real `prefect server start`, `prefect deploy`, a process worker, and
    `prefect deployment run 'retrain/nightly'`: a new wave of subjects, one task per stage,
    the decisions in a markdown artifact; then `score/folder` with the registered model."""
    from tests.services import free_port, stop, wait_for_http

    root, _ = repo
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["prefect", "server", "start", "--port", str(port)], env=env,
                              stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", server, timeout=180,
                      log=tmp_path / "server.log")

        def prefect(*args, cwd=ROOT, timeout=600):
            res = subprocess.run(["prefect", *args], cwd=cwd, env=env, capture_output=True,
                                 text=True, timeout=timeout)
            assert res.returncode == 0, f"{args}: {res.stdout[-2000:]}\n{res.stderr[-2000:]}"
            return res.stdout + res.stderr

        prefect("work-pool", "create", "brainlm-process", "--type", "process")
        assert "nightly" in prefect("--no-prompt", "deploy", "--all")
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "brainlm-process"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        out = prefect("deployment", "run", "retrain/nightly", "--param", f"repo={root}",
                      "--watch", "--watch-timeout", "500")
        assert "Completed" in out, out[-2000:]
        # a new wave of training subjects (seed 1), the same validation and test subjects
        import pandas as pd

        waves = pd.read_csv(root / "data" / "participants.tsv", sep="\t")
        assert set(waves["wave"]) == {0, 1} and set(waves.loc[waves["wave"] == 1, "split"]) == \
            {"train"} and set(waves.loc[waves["wave"] == 0, "split"]) == {"val", "test"}
        # so everything retrained and every model was compared with its champion
        register = json.loads((root / "metrics" / "register.json").read_text())
        assert {d["decision"] for d in register.values()} <= \
            {"promoted", "kept_champion", "below_baseline", "baseline_undecided"}, register
        seen = json.loads(subprocess.run(
            [sys.executable, "-c", _READ_RUNS], env=env, capture_output=True, text=True,
            check=True).stdout)
        for stage in ("preprocess", "pretrain@0.2", "pretrain@0.9", "tune", "register"):
            assert f"dvc repro {stage}" in seen["tasks"], (stage, seen["tasks"])
        artifact = seen["artifact"]
        assert "synthetic wave 1 (seed 1)" in artifact and "metrics/evaluate.json" in artifact
        for key, d in register.items():
            assert f"| {key} | {d['decision']} |" in artifact, (key, artifact)
        # score/folder: the nightly's registered model predicts the raw cohort through the
        # worker; the registry is this project's store, handed over as a job variable
        scores = tmp_path / "scores" / "p.parquet"
        store = json.dumps({"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"})
        out = prefect("deployment", "run", "score/folder", "--param", "model=models:/brainlm-age/1",
                      "--param", f"folder={root / 'data'}", "--param", f"out={scores}",
                      "--job-variable", f"env={store}", "--watch", "--watch-timeout", "300")
        assert "Completed" in out, out[-2000:]
        import pandas as pd

        assert len(pd.read_parquet(scores)) == MICRO["synth"]["subjects"]
        assert json.loads(scores.with_suffix(".report.json").read_text())["model"] == \
            "models:/brainlm-age/1"
    finally:
        for proc in (worker, server):
            if proc is not None:
                stop(proc)  # the whole process group: flow runs the worker started too
        logs.close()


def test_failed_expectations_stop_the_pipeline_at_validate(repo):
    root, _ = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["demo"]["validate"]["max_abs"] = 0.01  # scaled values are far larger
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "expectation(s) failed" in out and "max_abs" in out and "Data Docs:" in out
    assert "Running stage 'pretrain" not in out and "Running stage 'finetune'" not in out
