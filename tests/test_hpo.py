"""Hyper-parameter search: best.json agrees with the storage, seeds repeat, pruning prunes,
workers share one study, MLflow gets one parent run with a child per trial, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import age_effect_setup
from brainlm.errors import ConfigError
from brainlm.train.finetune import FinetuneConfig
from brainlm.train.hpo import SEARCH_SPACE, default_storage, search_space, storage_url, tune

P, T, N = 10, 80, 16

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Subjects whose parcel-0 amplitude grows with age; an untrained tiny model."""
    return age_effect_setup(tmp_path_factory.mktemp("hpo"), N, T, P)


def _base(root, out, **kw):
    base = dict(model=root / "model", data=root / "store", out=out, target="age", epochs=3,
                batch_size=8, progress=False)
    return FinetuneConfig(**{**base, **kw})


def _db(path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def three_trials(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    storage = _db(out / "optuna.db")
    result = tune(_base(setup, out), n_trials=3, study_name="s3", storage=storage, seed=0)
    return out, storage, result


def test_best_json_is_the_best_completed_trial_in_the_storage(three_trials):
    out, storage, result = three_trials
    saved = json.loads((out / "best.json").read_text())
    assert saved == result
    study = optuna.load_study(study_name="s3", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == saved["n_trials"] == 3
    assert saved["n_complete"] == len(complete) >= 1  # the median pruner waits for 5 trials
    assert math.isfinite(saved["best_value"])
    assert saved["best_value"] == min(t.value for t in complete)
    best = min(complete, key=lambda t: t.value)
    assert saved["best_trial"] == best.number and saved["best_params"] == best.params
    assert set(best.params) == {"lr", "weight_decay", "pooling", "head_dropout", "epochs"}
    assert 1e-4 <= best.params["lr"] <= 1e-2 and best.params["pooling"] in SEARCH_SPACE["pooling"][1]
    for t in complete:  # each trial fine-tuned into its own folder, one report per epoch
        meta = json.loads((out / f"trial-{t.number}" / "finetune.json").read_text())
        assert meta["best_val_loss"] == pytest.approx(t.value)
        assert sorted(t.intermediate_values) == [h["epoch"] for h in meta["history"]]


def test_same_seed_same_first_trial_and_resume_does_not_repeat(three_trials, setup, tmp_path):
    _, _, first = three_trials
    reference = optuna.load_study(study_name="s3", storage=three_trials[1]).trials[0].params
    storage = _db(tmp_path / "fresh.db")
    base = _base(setup, tmp_path, epochs=1)
    tune(base, n_trials=1, study_name="again", storage=storage, seed=0)
    trials = optuna.load_study(study_name="again", storage=storage).trials
    assert {k: v for k, v in trials[0].params.items() if k != "epochs"} == \
        {k: v for k, v in reference.items() if k != "epochs"}
    # the second call loads the study (load_if_exists) and must explore, not replay trial 0
    result = tune(base, n_trials=1, study_name="again", storage=storage, seed=0)
    trials = optuna.load_study(study_name="again", storage=storage).trials
    assert result["n_trials"] == len(trials) == 2
    assert trials[1].params["lr"] != trials[0].params["lr"]


def test_total_counts_the_study_so_a_rerun_runs_nothing_new(setup, tmp_path):
    """What the DVC stage uses: n_trials is the study's size, not a number to add."""
    storage = _db(tmp_path / "total.db")
    base = _base(setup, tmp_path, epochs=1)
    first = tune(base, n_trials=2, study_name="t", storage=storage, seed=0, total=True)
    assert first["n_trials"] == 2
    again = tune(base, n_trials=2, study_name="t", storage=storage, seed=0, total=True)
    assert again == first  # same settings: nothing new runs, same best.json
    assert len(optuna.load_study(study_name="t", storage=storage).trials) == 2
    more = tune(base, n_trials=3, study_name="t", storage=storage, seed=0, total=True)
    assert more["n_trials"] == 3  # only the missing trial ran


class _PruneAfterFirstEpoch(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.last_step is not None and trial.last_step >= 1


def test_a_pruner_that_says_prune_stops_trials_after_one_epoch(setup, tmp_path):
    storage = _db(tmp_path / "p.db")
    result = tune(_base(setup, tmp_path), n_trials=2, study_name="p", storage=storage,
                  pruner=_PruneAfterFirstEpoch())
    trials = optuna.load_study(study_name="p", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in trials)  # not 3 epochs
    assert not (tmp_path / "trial-0" / "finetune.json").exists()
    assert result["n_pruned"] == 2 and result["n_complete"] == 0
    assert result["best_value"] is None and result["best_params"] == {}
    assert json.loads((tmp_path / "best.json").read_text()) == result


def test_two_worker_processes_share_one_study(setup, tmp_path):
    storage = _db(tmp_path / "shared.db")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from brainlm.train.finetune import FinetuneConfig
        from brainlm.train.hpo import tune
        root, out = Path({str(setup)!r}), Path({str(tmp_path)!r})
        base = FinetuneConfig(model=root / "model", data=root / "store", out=out,
                              target="age", epochs=2, batch_size=8, progress=False)
        tune(base, n_trials=2, study_name="shared", storage={storage!r}, seed=0,
             worker=int(sys.argv[1]))
        assert "mlflow" not in sys.modules, "mlflow imported without a tracking URI"
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for w in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert len(trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["worker"] for t in trials) == [0, 0, 1, 1]
    assert len({t.params["lr"] for t in trials}) == 4  # workers did not replay each other
    assert json.loads((tmp_path / "best.json").read_text())["study_name"] == "shared"


def test_two_cli_workers_share_a_journal_study(setup, tmp_path):
    """`brainlm tune` as two processes on one journal file: what workers on machines that
    share a filesystem (but no database server) run."""
    log = tmp_path / "journal" / "optuna.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "BRAINLM_OPTUNA_STORAGE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "brainlm.cli", "tune", "--model", str(setup / "model"),
         "--data", str(setup / "store"), "--out", str(tmp_path / f"w{w}"), "--target", "age",
         "--epochs", "2", "--batch-size", "8", "--study", "journal-study",
         "--storage", f"journal://{log}", "--n-trials", "2", "--worker", str(w)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for w in (0, 1)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    trials = optuna.load_study(study_name="journal-study",
                               storage=JournalStorage(JournalFileBackend(str(log)))).trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["worker"] for t in trials) == [0, 0, 1, 1]
    assert len({t.params["lr"] for t in trials}) == 4
    # each worker's best.json summarises the whole shared study, not only its own trials
    last = json.loads((tmp_path / "w1" / "best.json").read_text())
    assert last["study_name"] == "journal-study" and last["n_trials"] >= 3
    assert "journal-study" in outputs[1] and "best" in outputs[1]


def test_storage_comes_from_the_environment_unless_given(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINLM_OPTUNA_STORAGE", "postgresql://optuna@db.example/optuna")
    assert storage_url() == "postgresql://optuna@db.example/optuna"
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("BRAINLM_OPTUNA_STORAGE")
    assert storage_url() == default_storage()


def test_journal_storage_needs_an_absolute_path(setup, tmp_path):
    with pytest.raises(ConfigError, match="absolute file path"):
        tune(_base(setup, tmp_path), n_trials=1, study_name="x", storage="journal://rel.log")


def test_mlflow_parent_run_with_one_child_per_trial(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # any default artifact folder lands here
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = _db(tmp_path / "mlflow.db")
    result = tune(_base(setup, tmp_path / "hpo", epochs=2), n_trials=2, study_name="ml",
                  storage=_db(tmp_path / "o.db"), tracking_uri=uri)
    assert mlflow.active_run() is None  # nothing left open
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["study_name"] == "ml" and parent.data.params["target"] == "age"
    assert parent.data.params["n_trials"] == "2" and parent.data.params["seed"] == "0"
    assert parent.data.metrics["best_value"] == pytest.approx(result["best_value"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 2
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and history
        assert child.data.tags["optuna.state"] == "COMPLETE"
        assert set(child.data.params) >= {"lr", "weight_decay", "pooling", "epochs"}
        assert child.data.metrics["value"] == pytest.approx(min(m.value for m in history))


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://host/db"])
def test_bad_storage_url_is_one_clear_line(setup, tmp_path, url):
    with pytest.raises(ConfigError) as err:
        tune(_base(setup, tmp_path), n_trials=1, study_name="x", storage=url)
    message = str(err.value)
    assert url in message and "\n" not in message


def test_input_checks_and_default_storage(setup, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="n_trials"):
        tune(_base(setup, tmp_path), n_trials=0, study_name="x", storage=_db(tmp_path / "d"))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert default_storage() == f"sqlite:///{tmp_path.resolve()}/mlflow/optuna.db"
    assert default_storage(tmp_path / "a") == f"sqlite:///{tmp_path.resolve()}/a/mlflow/optuna.db"
    assert set(SEARCH_SPACE) >= {"lr", "weight_decay", "layer_decay", "pooling",
                                 "head_dropout", "epochs"}
    full = search_space(_base(setup, tmp_path, mode="full", epochs=12))
    assert "layer_decay" in full and full["epochs"] == ("int", 5, 12)
    assert "layer_decay" not in search_space(_base(setup, tmp_path))
