"""Job `tune`: an Optuna study over the fine-tuning settings, shareable by workers on any number
of machines (same study and storage); `best.json` is a DVC metrics file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..train.config import FinetuneConfig
from . import finetune as finetune_job
from .options import Option

NAME = "tune"
# the code a study's trials depend on (under brainlm/): dvc.yaml's tune stage lists the same
# paths (a test checks), so a study is keyed to what the stage reruns for
CODE = ("jobs/tune.py", "jobs/finetune.py", "model", "data/windows.py", "train/config.py",
        "train/finetune.py", "train/hpo.py")


@dataclass
class TuneConfig:
    base: FinetuneConfig  # the configuration the search varies
    study: str
    storage: str | None = None  # default: $BRAINLM_OPTUNA_STORAGE, else mlflow/optuna.db
    n_trials: int = 10
    total: bool = False  # n_trials is the study's size (a pipeline stage) or this worker's
    worker: int = 0
    timeout: float | None = None  # seconds
    seed: int = 0  # the search's: the sampler's and every trial's


Config = TuneConfig
OPTIONS = [dataclasses.replace(o, path=f"base.{o.path}") for o in finetune_job.BASE_OPTIONS] + [
    Option("study", help="study name (shared by all workers)"),
    Option("storage", help="database URL (default: $BRAINLM_OPTUNA_STORAGE, else "
           "mlflow/optuna.db in the repository)"),
    Option("n_trials", help="trials for this worker", positive=True),
    Option("total", help="n_trials is the study's size: run only the trials still missing"),
    Option("worker", help="this worker's number (0, 1, ...)", low=0),
    Option("timeout", help="seconds", positive=True),
    Option("seed", low=0, help="the search's seed: the sampler's and every trial's"),
]
NOT_OPTIONS = {"base.seed": "set by seed", "base.progress": "trials are quiet"}


def from_params(params: dict, root: Path) -> TuneConfig:
    from . import block
    from .options import from_block

    base = finetune_job.from_params(params, root, out="tune")
    settings = block(params, NAME)
    if not settings.get("study"):
        raise ConfigError("params.yaml tune: 'study' (the study's name) is missing")
    cfg = from_block(TuneConfig, [o for o in OPTIONS if not o.path.startswith("base.")],
                     settings, NAME, fixed={"base": base, "total": True})
    return dataclasses.replace(cfg, study=f"{cfg.study}-{study_key(cfg, params)}")


def study_key(cfg: TuneConfig, params: dict) -> str:
    """A study belongs to one dataset, one pretrained model, one set of fine-tuning settings and
    one version of the fine-tuning code: trials made under anything else would otherwise mix
    into "best" when the shared storage already holds the study name."""
    import hashlib
    import json

    from ..fileio import sha256_file

    t = {k: v for k, v in params[NAME].items() if k not in ("n_trials", "storage")}
    settings = {"finetune": params["finetune"], "tune": t}
    package = Path(__file__).resolve().parents[1]
    code = hashlib.sha256()
    for name in CODE:
        path = package / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            code.update(file.read_bytes())
    base = cfg.base
    return (sha256_file(Path(base.data) / "manifest.parquet")[:6]
            + sha256_file(Path(base.model) / "model.safetensors")[:6]
            + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                             + code.digest()).hexdigest()[:6])


def _portable(storage: str, out: Path) -> str:
    """The storage as metrics/tune.json (committed) may hold it: a password masked, a SQLite
    file inside the project relative to its root (as usable from there), never a machine
    path."""
    from ..tracking import masked_uri, project_root

    storage = masked_uri(str(storage))
    root = project_root(out)
    if root is not None and storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///"):])
        if path.is_absolute() and path.resolve().is_relative_to(root):
            return f"sqlite:///{path.resolve().relative_to(root).as_posix()}"
    return storage


def run(cfg: TuneConfig, tags: dict | None = None) -> dict:
    from ..tracking import job_run
    from ..train.hpo import tune

    summary = {"study_name": cfg.study, "n_trials": cfg.n_trials, "seed": cfg.seed,
               "target": cfg.base.target, "task": cfg.base.task, "mode": cfg.base.mode,
               "worker": cfg.worker}
    with job_run(NAME, cfg.study, cfg, {"optuna.study_name": cfg.study, **(tags or {})},
                 out=cfg.base.out) as tracker:
        tracker.params({k: v for k, v in summary.items() if k not in ("n_trials", "seed",
                                                                      "worker")})
        base = dataclasses.replace(cfg.base, seed=cfg.seed, progress=False)
        result = tune(base, cfg.n_trials, cfg.study,
                      storage=cfg.storage, seed=cfg.seed, out=Path(cfg.base.out),
                      timeout=cfg.timeout, worker=cfg.worker, total=cfg.total,
                      tracker=tracker)
    result = {**result, "storage": _portable(result["storage"], Path(cfg.base.out))}
    print(f"brainlm tune: study {result['study_name']} in {result['storage']}: "
          f"{result['n_trials']} trials ({result['n_complete']} complete, "
          f"{result['n_pruned']} pruned), best {result['best_value']} "
          f"{result['best_params']} -> {Path(cfg.base.out) / 'best.json'}")
    if result["n_trials"] and not result["n_complete"] and not result["n_pruned"]:
        raise ConfigError(f"study {result['study_name']}: none of its {result['n_trials']} "
                          "trials finished (each failed: see the tune experiment's child runs "
                          "in MLflow)")
    return result
