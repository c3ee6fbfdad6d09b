"""Job `register`: the pipeline's pretrained and fine-tuned models into the MLflow registry,
each promoted to `champion` only when it is shown better than the champion on the VALIDATION
subjects (the paired interval of the difference above 0) and shown above its best baseline.

- Every mask ratio's pretrained model is a candidate for `brainlm-pretrain`, on one yardstick:
  validation R^2 at the common mask (the same masks for every ratio), compared with the
  champion as the mean of per-subject differences; the gate is the gain over the best
  reconstruction rung (`val_common_verdict` must be `learned`).
- The fine-tuned model competes on the params' metric on the validation split, its validation
  predictions re-scored on each resample of subjects beside the champion's; the gate is BrainLM
  minus the best baseline on validation (`comparisons.json`: `better`). The test split is scored
  and reported by `evaluate`, never read here.
- Comparable means the same atlas, target, task and validation subjects (a key of them is tagged
  on each version); otherwise `not_comparable` and the champion stays. A model not shown above
  its baseline is held back (`below_baseline` when shown below, `baseline_undecided` when its
  interval holds 0, `no_baseline` when none was measured; `gate: false` turns this off); the
  `challenger` alias marks the best version on validation that is not champion.
- An unchanged model (same fingerprint) keeps its version: decision `unchanged`.
- A version's source run is the run that trained it, when this store has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

NAME = "register"


@dataclass
class RegisterConfig:
    root: Path  # the project: models/, runs/, processed/
    mask_ratios: tuple  # params.yaml's: every pretrained model is registered
    finetune_mask_ratio: float  # params.yaml's: the pretrained model that competes
    metric: str = "r2"  # the fine-tuned model's validation metric (results.json)
    higher_is_better: bool = True
    gate: bool = True  # a champion must beat its baseline too


Config = RegisterConfig
OPTIONS: list = []  # a pipeline stage only (brainlm stage register)


def from_params(params: dict, root: Path) -> RegisterConfig:
    from . import block, shared
    from .options import Option, from_block

    settings = [Option("metric"), Option("higher_is_better"), Option("gate")]  # typed as below
    return from_block(RegisterConfig, settings, block(params, NAME), NAME, fixed={
        "root": root, "mask_ratios": tuple(float(r) for r in shared(params, "mask_ratios")),
        "finetune_mask_ratio": float(shared(params, "finetune_mask_ratio"))})


def _split_hashes(root: Path) -> dict:
    import hashlib

    import pandas as pd

    manifest = pd.read_parquet(root / "processed" / "manifest.parquet")
    return {s: hashlib.sha256(",".join(sorted(set(
        manifest.loc[manifest["split"] == s, "subject"]))).encode()).hexdigest()[:16]
        for s in ("val",)}  # promotion never reads the test split


def _key(*parts) -> str:
    """What two scores must share to be compared (atlas, target, task, subjects)."""
    import hashlib

    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


@dataclass
class Candidate:
    """A model's validation score, what a paired comparison re-scores, and its gate."""
    metric: str
    value: float
    higher: bool
    key: str  # atlas, target, task, validation subjects
    evidence: dict | None  # promotion.subject_scores / promotion.predictions
    floor: dict | None  # {"name", "value", "low", "high", "verdict"}: model minus its best
    # baseline on validation; None when no baseline was measured


GATE_DECISIONS = {"not learned": "below_baseline", "worse": "below_baseline",
                  "undecided": "baseline_undecided"}


def _candidate(name, version, c: Candidate, gate: bool):
    """Promote, hold back when not shown above the baseline, or keep the champion when not
    comparable."""
    from .. import promotion

    score = dict(metric=c.metric, value=c.value, higher_is_better=c.higher, split=c.key,
                 evidence=c.evidence)
    if gate and c.floor is None:  # no floor was measured: nothing says the model beats it
        return promotion.hold_back(name, version.version, "no_baseline",
                                   f"{c.metric} {c.value:.4g}: its baseline could not be "
                                   "fitted, so the gate cannot pass", **score)
    verdict = None if c.floor is None else c.floor.get("verdict")
    if gate and verdict not in ("learned", "better"):
        f = c.floor
        return promotion.hold_back(
            name, version.version, GATE_DECISIONS.get(verdict, "baseline_undecided"),
            f"{c.metric} {c.value:.4g}: minus its best baseline ({f.get('name')}) "
            f"{promotion.fmt_interval({**f, 'verdict': verdict or 'no interval'})} on the "
            "validation subjects: not shown above it", **score)
    try:
        return promotion.promote(name, version.version, c.metric, c.value, c.higher,
                                 split=c.key, evidence=c.evidence)
    except ValueError as exc:  # the champion was scored on other subjects, atlas or target
        return promotion.note_decision(name, version.version, "not_comparable", str(exc))


def _decide(name: str, fingerprint: str, log, decide) -> dict:
    """One candidate. A version with this fingerprint and a decision: `unchanged`. One without
    a decision (a register killed between logging it and deciding) is decided now, not logged
    again; otherwise `log()` registers a new version. `decide(version)` -> the decision."""
    from .. import registry

    known = registry.find_version(name, fingerprint)
    if known is not None and known.tags.get(registry.DECISION):
        return {"decision": "unchanged", "candidate_version": str(known.version),
                "champion_version": registry.champion_version(name)}
    return decide(known if known is not None else log())


def _pretrained_candidate(folder: Path, split: dict) -> Candidate | None:
    """A pretrained model on the common-mask yardstick (None: it has no common-mask score, as
    with the parcel or future masking strategies)."""
    import json

    from .. import promotion

    m = json.loads((folder / "metrics.json").read_text())
    atlas = json.loads((folder / "config.json").read_text()).get("atlas_hash")
    if "val_common_r2" not in m:
        return None
    by_subject = m.get("val_common_r2_by_subject")
    floor = None
    if m.get("val_common_r2_best_baseline") is not None:
        floor = {"name": m.get("val_common_best_baseline"), "value": m.get("val_common_r2_gain"),
                 "low": m.get("val_common_r2_gain_low", float("nan")),
                 "high": m.get("val_common_r2_gain_high", float("nan")),
                 "verdict": m.get("val_common_verdict")}
    return Candidate("val_common_r2", m["val_common_r2"], True,
                     _key(atlas, "common-mask", split["val"]),
                     promotion.subject_scores(by_subject) if by_subject else None, floor)


def _pretrained(cfg: RegisterConfig, root: Path, split: dict) -> dict:
    """Every mask ratio's model, in params order, on the common-mask yardstick."""
    from .. import promotion, registry

    out = {}
    for r in cfg.mask_ratios:
        folder = root / "models" / f"pretrain-{r:g}"
        fp = registry.pretrained_fingerprint(folder)

        def decide(version, folder=folder):  # read only for a version still to decide
            c = _pretrained_candidate(folder, split)
            if c is None:
                return promotion.note_decision("brainlm-pretrain", version.version,
                                               "not_comparable",
                                               "no common-mask validation R^2")
            return _candidate("brainlm-pretrain", version, c, cfg.gate)

        out[f"brainlm-pretrain@{r:g}"] = _decide(
            "brainlm-pretrain", fp, lambda folder=folder, r=r, fp=fp: registry.log_pretrained(
                folder, repo_root=root, tags={"mask_ratio": str(r), registry.FINGERPRINT: fp},
                run_id=registry.training_run("pretrain", fp)), decide)
    return out


def _finetuned_candidate(cfg: RegisterConfig, root: Path, split: dict) -> Candidate:
    """The fine-tuned model on the validation split: its score and best baseline from
    `evaluate` (results.json, comparisons.json), its validation predictions as evidence."""
    import json

    run_dir, ev = root / "runs" / "finetune", root / "runs" / "evaluation"
    rows = [r for r in json.loads((ev / "results.json").read_text())
            if r.get("split") == "val" and r["metric"] == cfg.metric]
    score = {r["method"]: r["value"] for r in rows}
    if "brainlm" not in score:
        raise ConfigError(f"{ev / 'results.json'}: no validation brainlm row for "
                          f"register.metric '{cfg.metric}' (evaluate again: promotion "
                          "chooses on the validation split)")
    vs = [c for c in json.loads((ev / "comparisons.json").read_text())
          if c.get("split") == "val" and c.get("metric") == cfg.metric]
    best = max(vs, key=lambda c: c["baseline_value"] if cfg.higher_is_better
               else -c["baseline_value"], default=None)
    floor = None if best is None else {"name": best["baseline"], **{
        k: best[k] for k in ("value", "low", "high", "verdict")}}
    meta = json.loads((run_dir / "finetune.json").read_text())
    atlas = json.loads((root / "processed" / "store.json").read_text()).get("atlas_hash")
    c = meta["config"]
    return Candidate(cfg.metric, score["brainlm"], cfg.higher_is_better,
                     _key(atlas, c.get("target"), c.get("task"), split["val"]),
                     _validation_predictions(run_dir, c.get("task"), cfg.metric,
                                             meta.get("classes")), floor)


def _validation_predictions(run_dir: Path, task, metric: str, classes) -> dict | None:
    """The run's validation predictions as promotion evidence (None for forecasting, whose
    forecasts are not kept per recording)."""
    import pandas as pd

    from .. import promotion

    path = run_dir / "predictions.parquet"
    if task not in ("regression", "classification") or not path.is_file():
        return None
    p = pd.read_parquet(path)
    p = p[p["split"] == "val"]
    if task == "classification":
        preds = p[[f"proba_{c}" for c in classes]].to_numpy(float).tolist()
        truth = p["y_true"].astype(str).tolist()
    else:
        preds, truth = p["y_pred"].astype(float).tolist(), p["y_true"].astype(float).tolist()
    return promotion.predictions(task, metric, classes, zip(
        p["recording_id"].astype(str), p["subject"].astype(str), truth, preds))


def _finetuned(cfg: RegisterConfig, root: Path, split: dict) -> dict:
    from .. import registry

    run_dir = root / "runs" / "finetune"
    name = registry.finetuned_name(run_dir)
    fp = registry.finetuned_fingerprint(run_dir)
    candidate = _finetuned_candidate(cfg, root, split)  # checked before anything is logged
    return {name: _decide(
        name, fp, lambda: registry.log_finetuned(
            run_dir, repo_root=root, tags={registry.FINGERPRINT: fp},
            run_id=registry.training_run("finetune", fp)),
        lambda version: _candidate(name, version, candidate, cfg.gate))}


def run(cfg: RegisterConfig, tags: dict | None = None) -> dict:
    from ..fileio import exclusive
    from ..tracking import job_run

    root = Path(cfg.root)
    split = _split_hashes(root)
    # one register at a time per project: two would both see "no version yet" and both log
    with exclusive(root / "mlflow" / "register", "registered"), \
            job_run(NAME, "register", cfg, tags) as tracker:
        decisions = {**_pretrained(cfg, root, split), **_finetuned(cfg, root, split)}
        values = {k: {"decision": d["decision"], "champion_version": str(d["champion_version"])}
                  for k, d in decisions.items()}
        tracker.tags({"decision." + k.replace("@", ":"): v["decision"]  # MLflow: no '@'
                      for k, v in values.items()})
    return values
