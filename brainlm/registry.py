"""The MLflow model registry: register BrainLM models with their lineage (promotion: promotion.py).

Registered versions carry what is needed to trust them later: the git commit and the hashes of
`data.dvc`, `dvc.lock` and `params.yaml` (lineage), the model's own metrics as `metric.<name>`
tags, and every promotion decision. Deployment reads `models:/<name>@champion`; aliases
(`champion`, `challenger`) replace the stages of MLflow 2.

Models are pyfuncs in the "models from code" style (`brainlm/mlflow_model.py`): weights travel as
the `save_pretrained` folder (safetensors), so loading a registered model never unpickles.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError
from .fileio import find_repo_root, read_json, sha256_file
from .tracking import experiment_id

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION = "promotion.decision"  # written last: a version without it is decided again
EXPERIMENT = "register"
MISSING, UNKNOWN = "missing", "unknown"
# what the pyfunc imports at serving time; pinned to this environment's versions
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "numpy", "pandas")


# ---------------------------------------------------------------------------- where

def default_tracking_uri(repo_root=None) -> str:
    """`sqlite:///<repo>/mlflow/mlflow.db`, absolute so every process finds the same file."""
    from .tracking import store_uri

    return store_uri(repo_root or find_repo_root())


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the repository's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _use_tracking_uri() -> None:
    """Point MLflow at `tracking_uri()` unless the caller already chose a URI. Without this
    MLflow 3 would fall back to a stray ./mlruns file store or ./mlflow.db."""
    import mlflow

    try:  # private helper; set_tracking_uri also exports the env var, the fallback's test
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:
        def is_tracking_uri_set():
            return bool(os.environ.get("MLFLOW_TRACKING_URI"))

    from .tracking import check_reachable

    if is_tracking_uri_set():
        check_reachable(mlflow.get_tracking_uri())
        return
    uri = tracking_uri()
    check_reachable(uri)  # also creates a SQLite store's folder
    mlflow.set_tracking_uri(uri)


def _client(client=None):
    if client is not None:
        return client
    from mlflow import MlflowClient

    _use_tracking_uri()
    return MlflowClient()


# ---------------------------------------------------------------------------- lineage

def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def lineage_tags(repo_root=None) -> dict:
    """What produced a model: git commit (+ whether the tree had uncommitted tracked changes)
    and sha256 of `data.dvc`, `dvc.lock` and `params.yaml`. Absent things are recorded as
    "missing"/"unknown" rather than left out, so a search for them finds them."""
    root = Path(repo_root).resolve() if repo_root else find_repo_root()
    commit = _git(root, "rev-parse", "HEAD")
    commit = commit if commit and re.fullmatch(r"[0-9a-f]{40,64}", commit) else UNKNOWN
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no") if commit != UNKNOWN \
        else None
    tags = {"lineage.git_commit": commit,
            "lineage.git_dirty": UNKNOWN if dirty is None else str(bool(dirty)).lower()}
    for key, name in (("data_dvc", "data.dvc"), ("dvc_lock", "dvc.lock"),
                      ("params", "params.yaml")):
        path = root / name
        tags[f"lineage.{key}_sha256"] = sha256_file(path) if path.is_file() else MISSING
    return tags


# ---------------------------------------------------------------------------- logging

def _read_json(path: Path, what: str) -> dict:
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path.parent}: not {what} ({path.name}: {exc})") from None


def _number(v) -> float | None:
    """A finite float, or None for anything MLflow should not record as a metric."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _our_model_config(folder: Path) -> dict:
    """config.json of a Family A folder with its atlas: the pyfunc needs the coordinates."""
    config = _read_json(folder / "config.json", "a pretrained model folder")
    if config.get("model_type") != "brainlm":
        raise ConfigError(f"{folder}: model_type {config.get('model_type')!r}; only our "
                          "'brainlm' models can be registered (they carry their atlas)")
    if not config.get("parcel_coords"):
        raise ConfigError(f"{folder}: config.json has no parcel_coords; the registered model "
                          "could not tell parcels apart")
    return config


def _signature_and_example(config: dict, finetune: dict | None = None):
    """One zero window [P, T] as the input example; the schema types windows as nested double
    arrays (JSON numbers arrive as float64, which a float32 schema would refuse). A fine-tuned
    run (`finetune`: its finetune.json) takes whole unscaled recordings and answers its task."""
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (Array, ColSpec, DataType, ParamSchema, ParamSpec,
                                     Schema)

    p, t, h = len(config["parcel_coords"]), int(config["window"]), int(config["hidden_size"])
    example = pd.DataFrame({"signal": [np.zeros((p, t)).tolist()]})
    inputs = Schema([ColSpec(Array(Array(DataType.double)), "signal")])
    if finetune is None:
        return ModelSignature(
            inputs=inputs, outputs=Schema([ColSpec(DataType.float, f"cls_{i}")
                                           for i in range(h)]),
            params=ParamSchema([ParamSpec("pooling", DataType.string, "cls")])), example
    task, classes = finetune["config"]["task"], finetune.get("classes")
    if task == "forecast":
        outputs = [ColSpec(Array(Array(DataType.double)), "forecast")]
    elif classes:
        outputs = [ColSpec(DataType.string, "prediction")] + [
            ColSpec(DataType.double, f"proba_{c}") for c in classes]
    else:
        outputs = [ColSpec(DataType.double, "prediction")]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs), params=ParamSchema(
        [ParamSpec("scaled", DataType.boolean, False)])), example


def _requirements() -> list[str]:
    """Pinned, instead of MLflow's inference (a subprocess that imports the model: slow)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in SERVING_REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")  # no local tag (+cpu)
        except PackageNotFoundError:
            out.append(dist)
    return out


@contextmanager
def _run(run_id: str | None, run_name: str):
    """The run to log into: `run_id` (resumed; reused if it is already the active run), else a
    new run in experiment "register" (nested when another run is active)."""
    import mlflow

    active = mlflow.active_run()
    if run_id and active and active.info.run_id == run_id:
        yield active
        return
    nested = active is not None
    if run_id:
        with mlflow.start_run(run_id=run_id, nested=nested) as run:
            yield run
        return
    exp_id = experiment_id(mlflow, EXPERIMENT)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested) as run:
        yield run


def _log_pyfunc(name: str, config: dict, artifacts: dict, run_id, version_tags: dict,
                run_metrics: dict, description: str | None, finetune: dict | None = None):
    """Log the pyfunc over `artifacts` into a run, register it, tag the new version."""
    import mlflow

    _use_tracking_uri()
    signature, example = _signature_and_example(config, finetune)
    package = Path(__file__).resolve().parent
    with _run(run_id, f"register-{name}") as run:
        mlflow.set_tags({k: v for k, v in version_tags.items() if k.startswith("lineage.")})
        if run_metrics and not run_id:  # a training run already has its own metrics
            mlflow.log_metrics(run_metrics)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(package / "mlflow_model.py"),
            artifacts={k: str(v) for k, v in artifacts.items()},
            code_paths=[str(package)],  # the model code travels with the weights
            signature=signature, input_example=example, pip_requirements=_requirements())
        run_id = run.info.run_id
    # the version's tags travel with the registration (one request, not one per tag: against
    # a server with basic auth every request pays a password check); register_model also
    # links the logged model to its version
    version = mlflow.register_model(
        info.model_uri, name,
        tags={k: str(v) for k, v in {**version_tags, "source_run_id": run_id}.items()})
    if not description:
        return version
    return mlflow.MlflowClient().update_model_version(name, version.version,
                                                      description=description[:5000])


def log_pretrained(folder, name: str = "brainlm-pretrain", run_id: str | None = None,
                   tags: dict | None = None, repo_root=None):
    """Register a pretraining output folder (config.json, model.safetensors, scaler,
    README.md, metrics.json) as a new version of `name`; returns the `ModelVersion`.

    Version tags: lineage (see `lineage_tags`), `metric.<k>` for numbers in metrics.json,
    `config.*` (window, patch size, widths, atlas), the scaler's sha256 and `tags`. The model
    card (README.md) becomes the version's description.
    """
    folder = Path(folder).resolve()
    config = _our_model_config(folder)
    metrics = {}
    if (folder / "metrics.json").is_file():
        metrics = {k: v for k, v in _read_json(folder / "metrics.json", "metrics").items()
                   if _number(v) is not None}
    version_tags = {**lineage_tags(repo_root), **_config_tags(config),
                    **{f"metric.{k}": v for k, v in metrics.items()}}
    if (folder / "scaler.safetensors").is_file():
        version_tags["scaler.sha256"] = sha256_file(folder / "scaler.safetensors")
    # a caller that looked the model up already passes its fingerprint: hash the weights once
    version_tags[FINGERPRINT] = (tags or {}).get(FINGERPRINT) or pretrained_fingerprint(folder)
    version_tags.update(tags or {})
    readme = folder / "README.md"
    return _log_pyfunc(name, config, {"model": folder}, run_id, version_tags, metrics,
                       model_card_text(readme.read_text()) if readme.is_file() else None)


def _config_tags(config: dict) -> dict:
    keys = ("window", "patch_size", "hidden_size", "num_hidden_layers", "mask_ratio",
            "mask_strategy", "atlas", "atlas_hash")
    out = {f"config.{k}": config[k] for k in keys if config.get(k) is not None}
    out["config.n_parcels"] = len(config["parcel_coords"])
    return out


def log_finetuned(run_dir, target: str | None = None, name: str | None = None,
                  run_id: str | None = None, tags: dict | None = None, repo_root=None,
                  pretrained=None):
    """Register a fine-tuning run folder (finetune.json, the task model, predictions)
    as a new version of `brainlm-<target>` (`brainlm-forecast` for forecasting).

    The served pyfunc (`brainlm/mlflow_model.py`) answers the run's task with
    `brainlm.predictor`: the pretrained folder the run started from (`pretrained`, default
    finetune.json's "model") and the whole run folder (artifact "finetune": head, tuned
    encoder for `mode: full`, the training data's scaler) travel with it; its input is
    unscaled recordings, its output the prediction per recording.

    Version tags: lineage, `config.*`, `finetune.*` (task, mode, pooling, target), and
    `metric.<m>` (+ `metric.<m>.low/high`) for the brainlm validation rows of
    evaluation/results.json (`metric.test_<m>` for its test rows)
    when `brainlm evaluate` has been run (its results.md becomes the description), plus
    `metric.best_val_loss`. Only fine-tuning from our ('brainlm') pretrained folders.
    """
    run_dir = Path(run_dir).resolve()
    meta = _read_json(run_dir / "finetune.json", "a fine-tuning run")
    cfg = meta.get("config", {})
    task, run_target = cfg.get("task"), cfg.get("target")
    if target is None:
        target = run_target or task
    elif task != "forecast" and target != run_target:
        raise ConfigError(f"{run_dir}: the run fine-tuned on {run_target!r}, not {target!r}")
    name = name or finetuned_name(run_dir, target)
    model_folder = Path(pretrained or meta.get("model") or "").resolve()
    config = _our_model_config(model_folder)
    metrics = {}
    if (n := _number(meta.get("best_val_loss"))) is not None:
        metrics["best_val_loss"] = n
    results = run_dir / "evaluation" / "results.json"
    ci = {}
    if results.is_file():
        for row in _read_json(results, "evaluation results"):
            if row.get("method") == "brainlm" and (v := _number(row.get("value"))) is not None:
                # validation scores are what promotion compares (metric.<m>); test scores are
                # reported beside them (test.<m>), never chosen on
                key = row["metric"] if row.get("split") == "val" else f"test_{row['metric']}"
                metrics[key] = v
                for end in ("low", "high"):
                    if (b := _number(row.get(end))) is not None:
                        ci[f"metric.{key}.{end}"] = b
    version_tags = {**lineage_tags(repo_root), **_config_tags(config),
                    **{f"finetune.{k}": cfg.get(k) for k in ("task", "mode", "pooling", "target")
                       if cfg.get(k) is not None},
                    "finetune.pretrained": str(model_folder),
                    **{f"metric.{k}": v for k, v in metrics.items()}, **ci,
                    FINGERPRINT: (tags or {}).get(FINGERPRINT)
                    or finetuned_fingerprint(run_dir, model_folder), **(tags or {})}
    report = run_dir / "evaluation" / "results.md"
    return _log_pyfunc(name, config, {"model": model_folder, "finetune": run_dir}, run_id,
                       version_tags, metrics, report.read_text() if report.is_file() else None,
                       finetune=meta)


# ---------------------------------------------------------------------------- unchanged models

FINGERPRINT = "fingerprint"  # version tag: sha256 over the files that make the model


def fingerprint(files) -> str:
    """sha256 over the names and contents of `files` (missing ones count as absent)."""
    import hashlib

    h = hashlib.sha256()
    for path in map(Path, files):
        h.update(f"{path.name}:{sha256_file(path) if path.is_file() else MISSING};".encode())
    return h.hexdigest()


def pretrained_fingerprint(folder) -> str:
    """Weights, scaler and config: what a registered pretrained model serves."""
    folder = Path(folder)
    return fingerprint([folder / n for n in ("model.safetensors", "scaler.safetensors",
                                             "config.json")])


def finetuned_fingerprint(run_dir, pretrained=None) -> str:
    """The run's model (task model, or head and tuned encoder), scaler and predictions, and
    the encoder it started from; not its evaluation (a new bootstrap of the same model is the
    same model)."""
    run_dir = Path(run_dir)
    meta = _read_json(run_dir / "finetune.json", "a fine-tuning run")
    folder = Path(pretrained or meta.get("model") or "")
    return fingerprint([run_dir / "model.safetensors", run_dir / "config.json",
                        run_dir / "finetuned.safetensors", run_dir / "scaler.safetensors",
                        run_dir / "predictions.parquet", run_dir / "forecast.npz",
                        folder / "model.safetensors"])


def finetuned_name(run_dir, target: str | None = None) -> str:
    """`brainlm-<target>` (`brainlm-forecast` for forecasting): the registered model's name."""
    cfg = _read_json(Path(run_dir) / "finetune.json", "a fine-tuning run").get("config", {})
    target = target or cfg.get("target") or cfg.get("task")
    return "brainlm-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", str(target)).strip("-")


def find_version(name: str, fingerprint_: str, client=None):
    """The newest version of `name` registered with this fingerprint, or None."""
    client = _client(client)
    found = client.search_model_versions(
        f"name = '{name}' and tags.{FINGERPRINT} = '{fingerprint_}'")
    return max(found, key=lambda v: int(v.version), default=None)


def champion_version(name: str, client=None) -> str | None:
    from .promotion import alias_version

    champion = alias_version(_client(client), name, CHAMPION)
    return None if champion is None else str(champion.version)


def training_run(experiment: str, fingerprint_: str, client=None) -> str | None:
    """The finished run of `experiment` that made the model with this fingerprint (the
    pretrain and finetune jobs tag it), so its version's source run is the one with its loss
    curves; None when this store never saw that run (then the register run is the source)."""
    client = _client(client)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1,
                              filter_string=f"tags.{FINGERPRINT} = '{fingerprint_}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def model_card_text(readme: str) -> str:
    """A model card as a version description: without its YAML front matter (Hugging Face
    metadata, which MLflow would show as text)."""
    if readme.startswith("---\n"):
        end = readme.find("\n---", 4)
        if end != -1:
            return readme[end + 4:].lstrip("\n")
    return readme
