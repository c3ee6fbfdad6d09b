"""The pipeline's jobs: one module per stage, each holding a typed config (the one default of
every setting), `from_params` (its params.yaml block) and `run` (the work, tracked by
`tracking.job_run` whoever calls it). `brainlm <command>`, `brainlm stage NAME`, `dvc repro` and
the Prefect flows all call these `run` functions.

The table below is the one list of stages: the command line's `stage` choices come from it and a
test checks dvc.yaml against it.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from ..errors import ConfigError

# stage name -> module; in pipeline order. `synth` writes data/ (outside dvc.yaml: data.dvc
# tracks its output); `pretrain` runs once per mask ratio (its item).
JOBS = {
    "synth": "synth",
    "preprocess": "preprocess",
    "validate": "validate",
    "pretrain": "pretrain",
    "compare": "compare",
    "tune": "tune",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "register": "register",
}
PER_ITEM = {"pretrain": "mask_ratios"}  # stages run once per value of this params.yaml list


def job(name: str):
    """The job module of stage `name`."""
    if name not in JOBS:
        raise ConfigError(f"unknown stage '{name}' (use one of {', '.join(JOBS)})")
    return importlib.import_module(f"{__name__}.{JOBS[name]}")


def load_params(path="params.yaml") -> dict:
    """The active profile's blocks plus the shared keys (profile, mask_ratios,
    finetune_mask_ratio) and `root`, the folder holding params.yaml."""
    import yaml

    path = Path(path)
    try:
        raw = _bounded_yaml(path)
    except yaml.YAMLError as exc:  # one line: what and where (line, column)
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} "
                          f"({getattr(exc, 'problem', None) or exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline settings ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    profile = raw.get("profile")
    if not isinstance(profile, str) or not isinstance(raw.get(profile), dict):
        raise ConfigError(f"{path}: profile {profile!r} has no block (have: "
                          f"{', '.join(str(k) for k, v in raw.items() if isinstance(v, dict))})")
    shared = {k: raw[k] for k in ("mask_ratios", "finetune_mask_ratio") if k in raw}
    _check_ratios(path, shared)
    return {**raw[profile], **shared, "profile": profile, "root": str(path.resolve().parent)}


PARAMS_LIMIT = (1 << 20, 100_000)  # bytes of params.yaml, values once its aliases expand


def _bounded_yaml(path: Path):
    """params.yaml parsed with its size and expanded size bounded first: a few kB of nested
    aliases (a "billion laughs") expand to billions of values once logged or printed."""
    import yaml

    most_bytes, most_values = PARAMS_LIMIT
    if path.stat().st_size > most_bytes:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, more than the {most_bytes:,} "
                          "pipeline settings may take")
    text = path.read_text(encoding="utf-8")
    sizes: dict = {}

    def expanded(node) -> int:  # values the node stands for, each shared node counted once
        if id(node) not in sizes:
            sizes[id(node)] = 1  # a node that contains itself counts once
            children = node.value if isinstance(node.value, list) else []
            parts = [p for c in children for p in (c if isinstance(c, tuple) else (c,))]
            sizes[id(node)] = 1 + sum(expanded(p) for p in parts)
        return sizes[id(node)]

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None and expanded(root) > most_values:
        raise ConfigError(f"{path}: its aliases expand to {expanded(root):,} values, more than "
                          f"the {most_values:,} pipeline settings may take (a YAML alias bomb?)")
    return yaml.safe_load(text)


def _check_ratios(path: Path, shared: dict) -> None:
    """mask_ratios: numbers in (0, 1); finetune_mask_ratio: one of them (its model must be
    pretrained)."""
    def ratio(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1

    ratios = shared.get("mask_ratios")
    if ratios is not None and not (isinstance(ratios, list) and ratios and all(map(ratio, ratios))
                                   and len(set(ratios)) == len(ratios)):
        raise ConfigError(f"{path}: mask_ratios must be a list of different numbers between 0 "
                          f"and 1 (got {ratios!r})")
    chosen = shared.get("finetune_mask_ratio")
    if chosen is not None and (not ratio(chosen) or (ratios and chosen not in ratios)):
        raise ConfigError(f"{path}: finetune_mask_ratio {chosen!r} must be one of mask_ratios "
                          f"({ratios}): that is the pretrained model fine-tuning starts from")


def block(params: dict, name: str) -> dict:
    """params.yaml's block `name` of the active profile, or a ConfigError naming it."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"params.yaml: profile '{params['profile']}' has no {name} settings")
    return value


def shared(params: dict, name: str):
    if name not in params:
        raise ConfigError(f"params.yaml: the top-level setting '{name}' is missing")
    return params[name]


def write_metrics(root: Path, name: str, values: dict) -> None:
    """metrics/<name>.json, the stage's `dvc metrics` file."""
    from ..fileio import write_bytes_atomic

    write_bytes_atomic(Path(root) / "metrics" / f"{name}.json",
                       json.dumps(values, indent=2, default=float).encode())


def run_stage(name: str, params: dict, item=None, **hooks) -> dict:
    """One pipeline stage from params.yaml: the job's config from its block, the job's `run`
    (tracked in the project's MLflow store unless MLFLOW_TRACKING_URI says otherwise), then
    metrics/<name>.json."""
    mod = job(name)
    if (item is None) != (name not in PER_ITEM):
        raise ConfigError(f"stage {name}: " + (f"which of {PER_ITEM[name]}? (--mask-ratio)"
                          if name in PER_ITEM else "takes no --mask-ratio"))
    root = Path(params["root"])
    from ..tracking import store_uri

    os.environ.setdefault("MLFLOW_TRACKING_URI", store_uri(root))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = mod.from_params(params, root, item) if name in PER_ITEM else \
        mod.from_params(params, root)
    values = mod.run(cfg, tags={"brainlm.profile": params["profile"],
                                "brainlm.caller": "stage"}, **hooks)
    metrics = getattr(mod, "METRICS", name)
    if metrics is not None:
        write_metrics(root, metrics.format(item=item), values)
    return values
