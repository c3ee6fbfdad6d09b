"""The team stack's services for real: PostgreSQL (set up by infra/postgres/init-roles.sh, as in
compose) behind MLflow, Optuna and Prefect, and an S3 server (moto, the MinIO stand-in) behind
MLflow's proxied artefacts and the DVC `team` remote. The project reaches every service through
environment variables only, as a team member's shell would."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import age_effect_setup
from tests.services import REPO, free_port, start_postgres, start_s3, stop, wait_for_http

BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "test-admin-password-1"  # a throwaway server's; never a default anywhere


@pytest.fixture(scope="module")
def postgres():
    yield from start_postgres()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from start_s3(tmp_path_factory.mktemp("s3"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small store and an untrained tiny model (window 40)."""
    return age_effect_setup(tmp_path_factory.mktemp("services"), 12, 80, 10)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "BRAINLM_OPTUNA"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", **extra)
    return env


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


# ------------------------------------------------------------------------------- PostgreSQL


def test_each_service_role_reaches_only_its_own_database(postgres):
    for role, own in (("mlflow", "mlflow"), ("mlflow", "mlflow_auth"), ("optuna", "optuna"),
                      ("prefect", "prefect")):
        assert postgres.psql("select current_user", role, own).stdout.strip() == role
    for role, other in (("mlflow", "optuna"), ("optuna", "prefect"), ("prefect", "mlflow"),
                        ("optuna", "postgres"), ("mlflow", "template1")):
        denied = postgres.psql("select 1", role, other, check=False)
        assert denied.returncode != 0 and "permission denied" in denied.stderr, denied.stderr
    flags = postgres.psql("select rolname, rolsuper or rolcreatedb or rolcreaterole or "
                          "rolreplication or rolbypassrls from pg_roles where rolname in "
                          "('mlflow', 'optuna', 'prefect') order by 1").stdout.split()
    assert flags == ["mlflow|f", "optuna|f", "prefect|f"]
    bad = subprocess.run([str(postgres.bindir / "psql"), "-X", "-h", "127.0.0.1", "-p",
                          str(postgres.port), "-U", "mlflow", "-d", "mlflow", "-c", "select 1"],
                         env={**os.environ, "PGPASSWORD": "not-the-password"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr


def test_init_script_refuses_an_empty_password(tmp_path):
    env = {"PATH": os.environ["PATH"], "MLFLOW_DB_PASSWORD": "x", "OPTUNA_DB_PASSWORD": "",
           "PREFECT_DB_PASSWORD": "y"}
    done = subprocess.run(["sh", str(REPO / "infra" / "postgres" / "init-roles.sh")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "OPTUNA_DB_PASSWORD is empty" in done.stderr


# ----------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3, tmp_path_factory):
    """mlflow/server.sh as compose runs it: Postgres stores, S3 artefacts, basic auth on."""
    s3.client().create_bucket(Bucket="mlflow-artifacts")
    port, log = free_port(), tmp_path_factory.mktemp("mlflow") / "server.log"
    env = _env(**s3.env, MLFLOW_BACKEND_STORE_URI=postgres.url("mlflow"),
               MLFLOW_ARTIFACTS="s3://mlflow-artifacts/", MLFLOW_PORT=str(port),
               MLFLOW_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               MLFLOW_AUTH_DATABASE_URI=postgres.url("mlflow", "mlflow_auth"))
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "server.sh"), "--workers", "1"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, timeout=180, log=log)
        yield url
    finally:
        stop(proc)


def test_mlflow_refuses_to_start_without_an_admin_password(tmp_path):
    done = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh")],
                          env=_env(MLFLOW_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=""),
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in done.stderr


def test_pretraining_logs_to_the_team_mlflow(mlflow_server, postgres, s3, setup, tmp_path,
                                             monkeypatch):
    api = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=10"
    assert _get(api) == 401
    assert _get(api, "admin", "wrong-password") == 401
    assert _get(api, "admin", ADMIN_PASSWORD) == 200

    # the non-admin user compose's mlflow-init creates, with the same script
    admin = dict(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_TRACKING_USERNAME="admin",
                 MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    user = dict(BRAINLM_MLFLOW_USER="brainlm", BRAINLM_MLFLOW_PASSWORD="worker-password-1")
    for _ in range(2):  # the second run finds the user and only re-keys it
        added = subprocess.run([sys.executable, str(REPO / "infra" / "mlflow" / "add_user.py")],
                               env=_env(**admin, **user), capture_output=True, text=True,
                               timeout=120)
        assert added.returncode == 0, added.stderr[-3000:]
    assert "exists" in added.stdout
    assert _get(api, "brainlm", "worker-password-1") == 200

    out = tmp_path / "pretrained"
    client_env = dict(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_TRACKING_USERNAME="brainlm",
                      MLFLOW_TRACKING_PASSWORD="worker-password-1")
    done = subprocess.run(
        [str(BIN / "brainlm"), "pretrain", "--data", str(setup / "store"), "--out", str(out),
         "--profile", "tiny", "--window", "40", "--patch-size", "10", "--max-steps", "2",
         "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "2", "--workers", "0",
         "--windows-per-recording", "1", "--no-progress"],
        env=_env(**client_env), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    for key, value in client_env.items():
        monkeypatch.setenv(key, value)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and {"loss", "val_mse"} <= set(run.data.metrics)
    assert "model.safetensors" in {Path(a.path).name for a in client.list_artifacts(
        run.info.run_id, "model")}
    # the artefact went through the server into the bucket; the run row is in Postgres
    keys = s3.keys("mlflow-artifacts")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/model/model.safetensors")
               for k in keys), keys[:20]
    rows = postgres.psql(f"select status from runs where run_uuid = '{run.info.run_id}'",
                         "mlflow", "mlflow").stdout.split()
    assert rows == ["FINISHED"]
    assert run.info.user_id == "brainlm"
    users = postgres.psql("select username, is_admin from users order by 1", "mlflow",
                          "mlflow_auth").stdout.split()
    assert users == ["admin|t", "brainlm|f"]
    # the registry through the team server, as the non-admin user: a new version of
    # brainlm-pretrain, promoted to champion, loaded back by alias
    code = textwrap.dedent(f"""
        import json, numpy as np, mlflow
        from brainlm import promotion, registry
        mv = registry.log_pretrained({str(out)!r}, repo_root={str(tmp_path)!r})
        result = promotion.promote(mv.name, mv.version, "val_mse", 0.5, higher_is_better=False)
        model = mlflow.pyfunc.load_model(f"models:/{{mv.name}}@champion")
        x = np.random.default_rng(0).normal(size=(10, 40)).astype("float32")
        emb = model.predict({{"signal": x.tolist()}})
        print(json.dumps({{"decision": result["decision"], "version": mv.version,
                          "shape": list(np.asarray(emb).shape)}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_env(**client_env),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    registered = json.loads(done.stdout.strip().splitlines()[-1])
    assert registered["decision"] == "promoted" and registered["shape"][0] == 1
    version = client.get_model_version_by_alias("brainlm-pretrain", "champion")
    assert version.version == str(registered["version"])
    assert any("/artifacts/" in k and k.endswith("model.safetensors") and
               run.info.run_id not in k for k in s3.keys("mlflow-artifacts"))

    # the worker's user cannot administer users
    from mlflow.server import get_app_client

    with pytest.raises(Exception, match="403|PERMISSION_DENIED|Permission denied"):
        get_app_client("basic-auth", tracking_uri=mlflow_server).create_user("x", "y-password1")


# ----------------------------------------------------------------------------------- Optuna


def test_two_tune_workers_share_a_study_in_postgres(postgres, setup, tmp_path):
    """Two `brainlm tune` processes told the storage only by BRAINLM_OPTUNA_STORAGE."""
    url = postgres.url("optuna")
    env = _env(BRAINLM_OPTUNA_STORAGE=url)
    procs = [subprocess.Popen(
        [str(BIN / "brainlm"), "tune", "--model", str(setup / "model"), "--data",
         str(setup / "store"), "--out", str(tmp_path / f"w{w}"), "--target", "age",
         "--epochs", "2", "--batch-size", "8", "--study", "pg-study", "--n-trials", "2",
         "--worker", str(w)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for w in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    import optuna

    trials = optuna.load_study(study_name="pg-study", storage=url).trials
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["worker"] for t in trials) == [0, 0, 1, 1]
    assert postgres.psql("select count(*) from trials", "optuna", "optuna").stdout.strip() == "4"
    best = json.loads((tmp_path / "w1" / "best.json").read_text())
    assert postgres.passwords["optuna"] not in json.dumps(best)  # committed file: no secret
    assert best["storage"].startswith("postgresql://optuna:***@")


def test_tune_waits_for_the_study_set_up_lock(postgres, setup, tmp_path):
    """Workers starting together take turns creating Optuna's tables and the study (without
    the lock two of them raced: `relation "alembic_version" already exists`)."""
    import time

    import optuna
    import sqlalchemy

    from brainlm.train.hpo import _PG_LOCK_KEY

    url = postgres.url("optuna")
    waiting = "select count(*) from pg_locks where locktype = 'advisory' and not granted"
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        proc = subprocess.Popen(
            [str(BIN / "brainlm"), "tune", "--model", str(setup / "model"), "--data",
             str(setup / "store"), "--out", str(tmp_path / "w"), "--target", "age",
             "--epochs", "2", "--batch-size", "8", "--study", "lock-study", "--n-trials", "1",
             "--storage", url], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while postgres.psql(waiting).stdout.strip() != "1":
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "the worker never asked for the lock"
                time.sleep(0.3)
            assert "lock-study" not in optuna.get_all_study_names(url)  # it waits, not works
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
    engine.dispose()
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]
    assert len(optuna.load_study(study_name="lock-study", storage=url).trials) == 1


# ---------------------------------------------------------------------------------- Prefect


def test_prefect_server_and_worker_on_postgres(postgres, tmp_path):
    """The compose pair: a server on Postgres with API auth, and a process worker started with
    compose's command (health endpoint on), running a deployment to completion."""
    port, log = free_port(), tmp_path / "prefect.log"
    auth = "brainlm:test-prefect-secret"
    api = f"http://127.0.0.1:{port}/api"
    server_env = _env(
        PREFECT_HOME=str(tmp_path / "server-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=postgres.url("prefect", driver="postgresql+asyncpg"),
        PREFECT_SERVER_API_AUTH_STRING=auth, PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false")
    client_env = _env(PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=auth,
                      PREFECT_HOME=str(tmp_path / "client-home"))
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    worker_cmd = compose["services"]["prefect-worker"]["command"]
    health = free_port()
    project = tmp_path / "project"
    project.mkdir()
    (project / "check.py").write_text(textwrap.dedent("""
        from prefect import flow, task

        @task
        def square(x):
            return x * x

        @flow(name="services-check")
        def check():
            assert sum(square.map(range(4)).result()) == 14
    """))
    procs = []
    with open(log, "w") as fh:
        procs.append(subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=tmp_path))
    try:
        wait_for_http(f"{api}/health", procs[0], timeout=240, log=log)
        assert _get(f"{api}/work_pools/brainlm-process") == 401  # no credentials: refused

        def prefect(*args):
            done = subprocess.run([str(BIN / "prefect"), *args], cwd=project, env=client_env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            return done.stdout + done.stderr

        pool = worker_cmd[worker_cmd.index("--pool") + 1]
        prefect("work-pool", "create", pool, "--type", "process")
        worker_log = tmp_path / "worker.log"
        with open(worker_log, "w") as fh:
            procs.append(subprocess.Popen(
                [str(BIN / worker_cmd[0]), *worker_cmd[1:]], cwd=project,
                env={**client_env, "PREFECT_WORKER_WEBSERVER_PORT": str(health)}, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_http(f"http://127.0.0.1:{health}/health", procs[1], timeout=120,
                      log=worker_log)
        assert _get(f"http://127.0.0.1:{health}/health") == 200
        prefect("--no-prompt", "deploy", "check.py:check", "--name", "services", "--pool", pool)
        out = prefect("deployment", "run", "services-check/services", "--watch",
                      "--watch-timeout", "240")
        assert "Completed" in out, out[-2000:]
    finally:
        for proc in reversed(procs):
            stop(proc)
    rows = postgres.psql("select f.name, r.state_type, r.deployment_id is not null from "
                         "flow_run r join flow f on f.id = r.flow_id", "prefect",
                         "prefect").stdout.split()
    assert rows == ["services-check|COMPLETED|t"]
    tasks = postgres.psql("select count(*) from task_run where state_type = 'COMPLETED'",
                          "prefect", "prefect").stdout.strip()
    assert tasks == "4"


# -------------------------------------------------------------------------------------- DVC


def test_dvc_team_remote_round_trip_through_s3(s3, tmp_path):
    """The `team` remote of .dvc/config, pointed at the S3 server by AWS_* variables only."""
    s3.client().create_bucket(Bucket="brainlm-dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(**{k: v for k, v in s3.env.items() if k.startswith("AWS_")},
               DVC_SITE_CACHE_DIR=str(tmp_path / "site"))

    def dvc(*args):
        done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    payload = os.urandom(4096)
    (repo / "data").mkdir()
    (repo / "data" / "scan.bin").write_bytes(payload)
    dvc("add", "-q", "data")
    dvc("push", "-r", "team")
    assert any(k.startswith("cache/files/md5/") for k in s3.keys("brainlm-dvc"))
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    dvc("pull", "-r", "team")
    assert (repo / "data" / "scan.bin").read_bytes() == payload
