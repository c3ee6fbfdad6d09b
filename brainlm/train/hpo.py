"""Hyper-parameter search for fine-tuning with Optuna, on a database several workers can share.

Each trial is one `finetune` run on a copy of the base config; its per-epoch validation loss is
reported to the pruner, so hopeless trials stop early. The study lives in an RDB storage
(SQLite on one box, Postgres for many), so any number of processes calling `tune` with the same
study name and storage add trials to one study. With a tracking URI, the study is one MLflow
parent run and every trial a child run. The result is `<out>/best.json`, a DVC metrics file.

Choices: TPE seeded explicitly (Optuna 5 changed its defaults to multivariate + constant liar,
so unseeded runs are not repeatable); `MedianPruner(n_warmup_steps=2)` rather than Hyperband,
because trials have different epoch budgets and the median rule needs no resource bookkeeping;
one trial at a time per process (`n_jobs=1`): MLflow's active-run stack is thread-local, so
parallelism is by processes sharing the storage, never threads.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from ..fileio import write_bytes_atomic
from .finetune import Diverged, FinetuneConfig, check_inputs, finetune

# name -> (kind, low, high) or ("categorical", choices). Names are FinetuneConfig fields.
SEARCH_SPACE: dict[str, tuple] = {
    # Adam step size: spans two decades, so sampled on a log scale.
    "lr": ("log-uniform", 1e-4, 1e-2),
    # AdamW decoupled decay; 0 (none) is a legitimate answer for a linear probe.
    "weight_decay": ("uniform", 0.0, 0.2),
    # Layer-wise lr decay; sampled only in `full` mode (a frozen probe has no encoder lr).
    "layer_decay": ("uniform", 0.5, 1.0),
    # Recording embedding: CLS token, mean of the patch tokens, or the tokens' connectivity
    # (a probe only: dropped in `full` mode; not used by `forecast`).
    "pooling": ("categorical", ("cls", "mean", "connectivity")),
    # Dropout before the head (the forecast head has none).
    "head_dropout": ("uniform", 0.0, 0.5),
    # Epoch budget: the upper end is the base config's `epochs` (the budget the user set),
    # the lower end min(5, that); early stopping may end a trial sooner.
    "epochs": ("int", 5, 30),
}

TRIAL_FOLDER = "trial-{number}"


STORAGE_ENV = "BRAINLM_OPTUNA_STORAGE"
JOURNAL_SCHEME = "journal://"


def _flag(url: str) -> str:
    """How the user gave the storage, for messages: the flag, or the environment variable."""
    return f"{STORAGE_ENV}=" if os.environ.get(STORAGE_ENV) == url else "--storage"


def storage_url(storage: str | None = None) -> str:
    """The study's storage: `storage`, else $BRAINLM_OPTUNA_STORAGE (how a team points every
    worker at its PostgreSQL without editing params.yaml), else `default_storage()`."""
    return storage or os.environ.get(STORAGE_ENV) or default_storage()


def default_storage(repo_root: Path | str | None = None) -> str:
    """`sqlite:///<repo>/mlflow/optuna.db` (absolute), beside MLflow's database so DVC stages,
    workers and the dashboard started from anywhere in the repository find the same study."""
    if repo_root is None:
        from ..fileio import find_repo_root

        repo_root = find_repo_root()
    return f"sqlite:///{Path(repo_root).resolve() / 'mlflow' / 'optuna.db'}"


def search_space(base: FinetuneConfig) -> dict[str, tuple]:
    """The part of SEARCH_SPACE that matters for this config (a parameter that cannot change
    the run would only dilute TPE), with the epoch range bounded by `base.epochs`."""
    space = dict(SEARCH_SPACE)
    if base.mode != "full":
        del space["layer_decay"]
    else:  # the connectivity head is fitted in closed form on a frozen encoder
        space["pooling"] = ("categorical", tuple(p for p in space["pooling"][1]
                                                 if p != "connectivity"))
    if base.task == "forecast":
        del space["pooling"], space["head_dropout"]
    kind, low, _ = space["epochs"]
    space["epochs"] = (kind, min(low, base.epochs), base.epochs)
    return space


def suggest(trial, base: FinetuneConfig) -> dict:
    """Sample one point of `search_space(base)` through the trial."""
    params = {}
    for name, spec in search_space(base).items():
        kind = spec[0]
        if kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2])
        else:
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=kind == "log-uniform")
    return params


def tune(base: FinetuneConfig, n_trials: int, study_name: str, storage: str | None = None,
         seed: int = 0, tracking_uri: str | None = None, out: Path | None = None,
         timeout: float | None = None, *, pruner=None, worker: int = 0,
         total: bool = False, tracker=None) -> dict:
    """Run `n_trials` more trials of study `study_name` (created or loaded) and write
    `<out>/best.json` (`out` defaults to `base.out`; trial `n` writes to `<out>/trial-n`).
    With `total`, `n_trials` is the study's size: only the trials still missing run (finished
    or pruned ones count), so running again with the same settings runs none and gives the
    same best.json (what a pipeline stage needs).

    Workers share a study by calling this with the same `study_name` and `storage`; give each
    concurrent worker its own `worker` number, or workers with the same seed would propose the
    same random start-up points. For the same reason a study that already has trials gets a
    sampler seed derived from (seed, worker, trial count): a resumed search explores on
    instead of repeating its first points. A fresh study with worker 0 uses `seed` itself.
    `pruner` replaces the default `MedianPruner(n_warmup_steps=2)`.
    `tracker`: the study's MLflow run (the `tune` job's); without it, one is opened in
    experiment `tune` when `tracking_uri` (or MLFLOW_TRACKING_URI) is set. Every trial is a
    child run tracked like a `finetune` job.
    Returns the dict written to best.json.
    """
    _check_tune_args(n_trials, study_name, timeout, worker)
    check_inputs(base)  # a wrong target or store is one message, not a failed trial each
    url = storage_url(storage)
    shown = _masked(url)
    out = Path(out if out is not None else base.out)
    study, to_run, counted = _load_study(url, shown, study_name, n_trials, seed, worker, total,
                                         pruner)
    _same_question(study, base, shown)
    if tracker is not None:
        return _optimize(study, base, out, n_trials, to_run, counted, timeout, worker, total,
                         shown, tracker)
    from ..tracking import job_run

    summary = {"study_name": study_name, "n_trials": n_trials, "seed": seed,
               "target": base.target, "task": base.task, "mode": base.mode, "worker": worker,
               "storage": shown}
    with job_run("tune", study_name, summary, {"optuna.study_name": study_name},
                 uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "") as parent:
        return _optimize(study, base, out, n_trials, to_run, counted, timeout, worker, total,
                         shown, parent)


def _same_question(study, base: FinetuneConfig, shown: str) -> None:
    """A study answers one question: minimise the validation loss of one target, task and
    mode. A study of the same name made otherwise (another target, maximised, several
    objectives) is refused, not mixed into one "best"."""
    import optuna

    where = f"study '{study.study_name}' in {shown}"
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MINIMIZE:
        goal = "/".join(d.name.lower() for d in study.directions)
        raise ConfigError(f"{where} was created to {goal}; brainlm minimises one validation "
                          "loss: use another --study")
    question = {"target": base.target or "", "task": base.task, "mode": base.mode}
    asked = study.user_attrs.get("brainlm.question")  # one attribute: set whole, never half
    if asked is None:
        study.set_user_attr("brainlm.question", question)  # workers starting together agree
    elif asked != question:
        differ = ", ".join(f"{k} {asked.get(k)!r} there, {v!r} now"
                           for k, v in question.items() if asked.get(k) != v)
        raise ConfigError(f"{where} holds trials of another question ({differ}): their losses "
                          "are not comparable; use another --study")


def _check_tune_args(n_trials, study_name, timeout, worker) -> None:
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if not study_name or not str(study_name).strip():
        raise ConfigError("study name must not be empty")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
    if worker < 0:
        raise ConfigError(f"worker must be >= 0, got {worker}")


def _load_study(url, shown, study_name, n_trials, seed, worker, total, pruner):
    """(study, trials still to run, the states that count) with its seeded sampler."""
    import numpy as np
    import optuna

    with _init_lock(url):  # concurrent first-time table creation would race on SQLite
        rdb = _open_storage(url, shown)
        try:
            study = optuna.create_study(storage=rdb, study_name=study_name, direction="minimize",
                                        pruner=pruner or optuna.pruners.MedianPruner(
                                            n_warmup_steps=2),
                                        load_if_exists=True)
        except ValueError as e:  # e.g. an existing study of the same name with two objectives
            raise ConfigError(f"study '{study_name}' in {shown}: {e}") from None
    existing = len(study.get_trials(deepcopy=False))
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    to_run = n_trials
    if total:
        to_run = max(0, n_trials - len(study.get_trials(deepcopy=False, states=counted)))
    sampler_seed = seed if existing == 0 and worker == 0 else \
        int(np.random.SeedSequence([seed, worker, existing]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    return study, to_run, counted


def _optimize(study, base, out, n_trials, to_run, counted, timeout, worker, total, shown,
              parent) -> dict:
    import optuna

    def objective(trial):
        cfg = replace(base, out=out / TRIAL_FOLDER.format(number=trial.number),
                      **suggest(trial, base))
        trial.set_user_attr("worker", worker)
        return _trial(trial, cfg, parent)

    if to_run:
        callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=counted)] if total \
            else None  # with total, workers sharing the study stop at n_trials together
        study.optimize(objective, n_trials=to_run, timeout=timeout, n_jobs=1,
                       gc_after_trial=True, callbacks=callbacks)
    result = summarize(study, shown)
    write_bytes_atomic(out / "best.json", json.dumps(result, indent=2).encode())
    parent.metrics({"n_trials_total": result["n_trials"], "n_complete": result["n_complete"],
                    "n_pruned": result["n_pruned"]}, step=0)
    if result["best_value"] is not None:
        parent.metrics({"best_value": result["best_value"]}, step=0)
        parent.params({f"best_{k}": v for k, v in result["best_params"].items()})
        parent.tags({"best_trial": str(result["best_trial"])})
    return result


def _trial(trial, cfg: FinetuneConfig, parent) -> float:
    """One trial: a child run tracked like a `finetune` job; the validation loss of every
    epoch goes to the pruner too."""
    import optuna

    from ..tracking import job_run

    pruned = None
    with job_run("finetune", f"trial-{trial.number}", cfg,
                 {"optuna.trial_number": str(trial.number)}, parent=parent) as child:
        def on_epoch(epoch, val_loss):
            child.metrics({"val_loss": float(val_loss)}, step=epoch)
            trial.report(val_loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: val_loss {val_loss:.4g}")

        try:
            meta = finetune(cfg, on_epoch=on_epoch)
        except optuna.TrialPruned as exc:  # a finished run, stopped by the pruner
            child.tags({"optuna.state": "PRUNED"})
            pruned = exc
        except Diverged:  # these settings blow up (a large lr): a failed trial, go on
            meta = {"best_val_loss": float("nan"), "epochs_run": None}
        except BaseException:
            child.tags({"optuna.state": "FAIL"})
            raise
        if pruned is None:
            value = float(meta["best_val_loss"])
            child.summary({"best_val_loss": value, "epochs_run": meta["epochs_run"] or 0,
                           **({"value": value} if math.isfinite(value) else {})})
            child.tags({"optuna.state": "COMPLETE" if math.isfinite(value) else "FAIL"})
            if not math.isfinite(value):
                child.end("FAILED")
    if pruned is not None:
        raise pruned
    return value  # NaN: Optuna records a FAIL and carries on


def summarize(study, storage: str) -> dict:
    """The best.json content for the whole study (all workers), as it stands now."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    return {"best_value": best.value if best else None,
            "best_params": dict(best.params) if best else {},
            "best_trial": best.number if best else None,
            "n_trials": len(trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_complete": len(complete),
            "study_name": study.study_name,
            "storage": storage}


# ---------------------------------------------------------------------------- storage


def _masked(url: str) -> str:
    """The URL without its password: it goes into best.json, which is committed."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: reported by _open_storage
        return url


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001
        return None
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database)


@contextmanager
def _init_lock(url: str):
    """Serialize study set-up between workers starting together: otherwise two of them find an
    empty database and both create Optuna's tables ("relation alembic_version already exists").
    SQLite: an advisory file lock beside the database; PostgreSQL: a session advisory lock."""
    path = _sqlite_file(url)
    if path is not None:
        with _file_lock(path):
            yield
    elif _backend(url) in ("postgresql", "postgres"):
        with _pg_lock(url):
            yield
    else:
        yield


@contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no lock, start the first worker before the others
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"study storage {path}: cannot create its folder "
                          f"({exc.strerror or exc})") from None
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_PG_LOCK_KEY = 0x6272_6169_6E6C_6D  # "brainlm": any constant shared by all workers


@contextmanager
def _pg_lock(url: str):
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        conn = engine.connect()
    except Exception as e:  # noqa: BLE001 - missing driver, unreachable server
        raise ConfigError(f"{_flag(url)} {_masked(url)!r}: cannot open it: {_first_line(e)}") \
            from None
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        finally:
            conn.close()
            engine.dispose()


def _open_storage(url: str, shown: str):
    """RDBStorage with heartbeats: a trial whose worker died is failed after the grace period
    and queued again once with the same parameters (by whichever worker looks next).
    `journal:///abs/path.log` opens a JournalStorage on that file instead: an append-only log
    with file locks, for clusters that share a filesystem but no database server."""
    import optuna
    from sqlalchemy.engine import make_url

    if url.startswith(JOURNAL_SCHEME):
        return _open_journal(url, shown)
    try:
        make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises ArgumentError or ValueError
        raise ConfigError(f"{_flag(url)} {shown!r} is not a database URL (e.g. "
                          f"sqlite:///abs/path/optuna.db or postgresql://host/db): "
                          f"{_first_line(e)}") from None
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if _is_sqlite(url) else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=60, grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1))
    except Exception as e:  # noqa: BLE001 - missing driver, unreachable server, bad file
        raise ConfigError(f"{_flag(url)} {shown!r}: cannot open it: {_first_line(e)}") from None


def _open_journal(url: str, shown: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(url[len(JOURNAL_SCHEME):])
    if not path.is_absolute() or path.name == "":
        raise ConfigError(f"{_flag(url)} {shown!r}: a journal storage needs an absolute file path "
                          f"(journal:///shared/path/optuna.log)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise ConfigError(f"{_flag(url)} {shown!r}: cannot open it: {_first_line(e)}") from None


def _backend(url: str) -> str:
    """'sqlite', 'postgresql', ... (the scheme without its driver)."""
    return url.split(":", 1)[0].split("+", 1)[0]


def _is_sqlite(url: str) -> bool:
    return _backend(url) == "sqlite"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
