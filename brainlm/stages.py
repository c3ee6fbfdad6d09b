"""Pipeline stages driven by params.yaml: what `dvc repro`, the Prefect flows and
`brainlm stage NAME` all call (one code path).

Folders (relative to the repository root): data/ raw recordings (tracked by data.dvc),
processed/ the store, validation/, models/pretrain-<mask ratio>/, runs/finetune/,
runs/evaluation/, metrics/ one JSON per stage for `dvc metrics`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError

STAGES = ("synth", "preprocess", "validate", "pretrain", "compare", "tune", "finetune",
          "evaluate", "register")


def load_params(path="params.yaml") -> dict:
    """The active profile's settings plus the shared keys (mask_ratios, profile)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline settings ({exc})") from None
    profile = raw.get("profile", "demo")
    if profile not in raw or not isinstance(raw[profile], dict):
        raise ConfigError(f"{path}: profile '{profile}' has no block (have: "
                          f"{', '.join(k for k, v in raw.items() if isinstance(v, dict))})")
    return {**raw[profile], "profile": profile, "mask_ratios": raw.get("mask_ratios", [0.75]),
            "finetune_mask_ratio": raw.get("finetune_mask_ratio", 0.75),
            "root": str(path.resolve().parent)}


def _write_metrics(root: Path, name: str, values: dict) -> None:
    from .fileio import write_bytes_atomic

    write_bytes_atomic(root / "metrics" / f"{name}.json",
                       json.dumps(values, indent=2, default=float).encode())


def run_stage(name: str, params: dict, mask_ratio: float | None = None) -> dict:
    """Run one stage. Tracking goes to MLFLOW_TRACKING_URI, by default the repository's
    sqlite:///<root>/mlflow/mlflow.db shared by every stage, worker and test."""
    import os

    root = Path(params["root"])
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' (use one of {', '.join(STAGES)})")
    needs = {"synth": ["synth", "preprocess"], "tune": ["finetune", "tune"], "compare": [],
             "register": ["register", "finetune"]}.get(name, [name])
    missing = [k for k in needs if not isinstance(params.get(k), dict)]
    if missing:
        raise ConfigError(f"params.yaml: profile '{params['profile']}' has no "
                          f"{', '.join(missing)} settings")
    from .registry import default_tracking_uri

    (root / "mlflow").mkdir(exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    values = globals()[f"_{name}"](params, root, mask_ratio)
    if name in ("preprocess", "validate", "finetune", "evaluate"):  # the others log their own
        _track(name, params, values)
    return values


def _track(name: str, params: dict, values: dict) -> None:
    """One MLflow run per stage execution, in the experiment named after the stage."""
    from .tracking import Tracker

    tracker = Tracker(name, run_name=f"{params['profile']}-{name}")
    tracker.params({f"{name}.{k}": v for k, v in params[name].items()})
    tracker.metrics({k: float(v) for k, v in values.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v},
                    step=0)
    tracker.tags({k: str(v) for k, v in values.items() if isinstance(v, str)})
    tracker.end()


def _synth(p, root, _):
    from .atlas import load_atlas
    from .data.synthetic import simulate_cohort, write_bids

    s = p["synth"]
    atlas = load_atlas(p["preprocess"].get("atlas", "A424"), allow_fallback=True)
    cohort = simulate_cohort(atlas.coords, s["subjects"], s["timepoints"],
                             tr=p["preprocess"]["tr"], seed=s["seed"])
    paths = write_bids(cohort, atlas, root / "data", tr=p["preprocess"]["tr"],
                       voxel_size=s.get("voxel_size", 4.0))
    return {"recordings": len(paths)}


def preprocess_config(p, root: Path):
    from .data.parcellate import ParcellationSettings
    from .data.pipeline import PreprocessConfig

    s = p["preprocess"]
    return PreprocessConfig(
        inputs=[root / "data"], out=root / "processed", atlas=s.get("atlas", "A424"),
        settings=ParcellationSettings(target_tr=s["tr"], min_timepoints=s["window"],
                                      standardize=s.get("standardize", "psc")),
        fractions=tuple(s["split"]), seed=s["seed"], workers=s.get("workers", 1),
        allow_fallback_atlas=True, progress=False)


def preprocess_done(root: Path, summary) -> dict:
    """Metrics of a finished preprocessing (shared by the stage and the Prefect flow)."""
    values = {"atlas": summary.atlas, "recordings_kept": summary.n_kept,
              "quarantined": len(summary.quarantined),
              **{f"subjects_{k}": v[0] for k, v in summary.per_split.items()}}
    _write_metrics(root, "preprocess", values)
    print(summary.format())
    return values


def _preprocess(p, root, _):
    from .data.pipeline import run_preprocess

    return preprocess_done(root, run_preprocess(preprocess_config(p, root)))


def _validate(p, root, _):
    from .data.validate import Thresholds, validate_store

    s = p["validate"]
    summary = validate_store(root / "processed", root / "validation", Thresholds(
        median_tol=s["median_tol"], iqr_tol=s["iqr_tol"], max_abs=s["max_abs"],
        window=p["preprocess"]["window"]))
    values = {"success": summary["success"], "n_recordings": summary["n_recordings"],
              "train_median_max_abs": summary["train_median_max_abs"]}
    _write_metrics(root, "validate", values)
    return values


def _pretrain(p, root, mask_ratio):
    from .train.pretrain import PretrainConfig, pretrain

    if mask_ratio is None:
        raise ConfigError("the pretrain stage needs a mask ratio (--mask-ratio)")
    s = p["pretrain"]
    cfg = PretrainConfig(
        data=root / "processed", out=root / "models" / f"pretrain-{mask_ratio:g}",
        profile=s["profile"], mask_ratio=float(mask_ratio), window=s["window"],
        patch_size=s["patch_size"], max_steps=s["max_steps"], batch_size=s["batch_size"],
        eval_every=s["eval_every"], ckpt_every=s["ckpt_every"],
        windows_per_recording=s["windows_per_recording"], workers=s["workers"], seed=s["seed"],
        compile=bool(s.get("compile", False)), attention_kernel=s.get("attention_kernel", "auto"),
        progress=False, extra={"stage": "pretrain", "profile_name": p["profile"]},
        **_yardstick(p, root))
    result = pretrain(cfg)
    values = {"mask_ratio": float(mask_ratio), **result.get("metrics", {})}
    _write_metrics(root, f"pretrain-{mask_ratio:g}", values)
    return values


def _compare(p, root, _):
    """The pretrained models of every mask ratio on one yardstick (table, plot, MLflow)."""
    from .analysis.mask_ratios import compare
    from .tracking import Tracker

    out = root / "runs" / "compare"
    rows = compare({float(r): root / "models" / f"pretrain-{r:g}" for r in p["mask_ratios"]}, out)
    tracker = Tracker("compare", run_name=f"{p['profile']}-mask-ratios")
    tracker.params({"mask_ratios": p["mask_ratios"], "stage": "compare"})
    for row in rows:
        tracker.metrics({k: v for k, v in row.items() if isinstance(v, float)
                         and k != "mask_ratio"}, step=int(round(row["mask_ratio"] * 100)))
    tracker.artifacts(out, "compare")
    tracker.end()
    values = {f"{k}@{r['mask_ratio']:g}": r[k] for r in rows
              for k in ("val_common_r2", "val_common_r2_gain") if r.get(k) is not None}
    _write_metrics(root, "compare", values)
    print((out / "mask_ratios.md").read_text())
    return values


def _yardstick(p, root: Path) -> dict:
    """The encoder checks every pretrain run gets: a probe of the fine-tuning target, and the
    networks of a synthetic cohort when its ground truth is there (it is part of data/, which
    processed/ is made from, so the stage's dependency on processed/ covers it)."""
    ft = p.get("finetune") or {}
    out = {}
    if ft.get("task") in ("regression", "classification") and ft.get("target"):
        out.update(probe_target=ft["target"], probe_task=ft["task"])
    truth = root / "data" / "ground_truth.json"
    if truth.is_file():
        out["networks_truth"] = truth
    return out


def _tune(p, root, _):
    """Optuna over the fine-tuning settings; best.json is a DVC metrics file."""
    from .train.finetune import FinetuneConfig
    from .train.hpo import tune

    s, t = p["finetune"], p["tune"]
    base = FinetuneConfig(
        model=root / "models" / f"pretrain-{p['finetune_mask_ratio']:g}",
        data=root / "processed", out=root / "runs" / "tune", target=s["target"],
        task=s["task"], mode=s["mode"], epochs=s["epochs"], batch_size=s["batch_size"],
        lr=s["lr"], progress=False)
    # a study belongs to one dataset, one pretrained model, one set of fine-tuning settings and
    # one version of the fine-tuning code: trials made under anything else would otherwise mix
    # into "best" when the shared storage already holds the study name
    import hashlib

    from .fileio import sha256_file

    settings = {"finetune": s, "tune": {k: v for k, v in t.items() if k not in ("n_trials",
                                                                              "storage")}}
    package = Path(__file__).resolve().parent
    code = hashlib.sha256()  # the code dvc.yaml lists for this stage
    for path in [*sorted((package / "model").glob("*.py")), package / "train" / "finetune.py",
                 package / "train" / "hpo.py"]:
        code.update(path.read_bytes())
    key = (sha256_file(base.data / "manifest.parquet")[:6]
           + sha256_file(base.model / "model.safetensors")[:6]
           + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                            + code.digest()).hexdigest()[:6])
    # n_trials is the study's size: a rerun on the same inputs runs nothing new and writes the
    # same best.json; raising n_trials runs only the extra trials
    best = tune(base, t["n_trials"], study_name=f"{t.get('study', 'finetune')}-{key}",
                storage=t.get("storage"), seed=t.get("seed", 0), out=root / "runs" / "tune",
                total=True)
    _write_metrics(root, "tune", best)
    return best


def _finetune(p, root, _):
    from .train.finetune import FinetuneConfig, finetune

    s = p["finetune"]
    meta = finetune(FinetuneConfig(
        model=root / "models" / f"pretrain-{p['finetune_mask_ratio']:g}",
        data=root / "processed",
        out=root / "runs" / "finetune", target=s["target"], task=s["task"], mode=s["mode"],
        epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], progress=False))
    values = {"best_val_loss": meta["best_val_loss"], "epochs_run": meta["epochs_run"]}
    _write_metrics(root, "finetune", values)
    return values


def _evaluate(p, root, _):
    from .evaluate import evaluate_run

    result = evaluate_run(root / "runs" / "finetune", root / "runs" / "evaluation",
                          n_boot=p["evaluate"]["n_boot"])
    values = {f"{r['method']}_{r['metric']}": r["value"] for r in result["rows"]}
    _write_metrics(root, "evaluate", values)
    print(result["table"])
    return values


def _register(p, root, _):
    """Register the pretrained and fine-tuned models; promote each to `champion` only if it
    beats the current one (validation R^2 of the pretraining at the fine-tuned mask ratio;
    the params' test metric for the fine-tuned model, same split)."""
    import hashlib

    import pandas as pd

    from .registry import log_finetuned, log_pretrained, promote

    reg = p["register"]
    ratio = p["finetune_mask_ratio"]
    decisions = {}
    manifest = pd.read_parquet(root / "processed" / "manifest.parquet")
    split = {s: hashlib.sha256(",".join(sorted(set(
        manifest.loc[manifest["split"] == s, "subject"]))).encode()).hexdigest()[:16]
        for s in ("val", "test")}

    def decide(name, version, metric, value, higher, on):
        try:
            return promote(name, version, metric, value, higher, split=split[on])
        except ValueError as exc:  # the champion was scored on other subjects
            return {"decision": "not_comparable", "champion_version": None, "reason": str(exc)}

    for r in p["mask_ratios"]:
        version = log_pretrained(root / "models" / f"pretrain-{r:g}", repo_root=root,
                                 tags={"mask_ratio": str(r)})
        if r == ratio:
            val = json.loads((root / "models" / f"pretrain-{r:g}" / "metrics.json").read_text())
            decisions["brainlm-pretrain"] = decide("brainlm-pretrain", version.version,
                                                   "val_r2", val["val_r2"], True, "val")
    rows = json.loads((root / "runs" / "evaluation" / "results.json").read_text())
    value = next(r["value"] for r in rows if r["method"] == "brainlm"
                 and r["metric"] == reg["metric"])
    version = log_finetuned(root / "runs" / "finetune", repo_root=root)
    name = version.name
    decisions[name] = decide(name, version.version, reg["metric"], value,
                             reg["higher_is_better"], "test")
    values = {k: {"decision": d["decision"], "champion_version": str(d["champion_version"])}
              for k, d in decisions.items()}
    _write_metrics(root, "register", values)
    return values
