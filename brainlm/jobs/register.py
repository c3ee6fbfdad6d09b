"""Job `register`: the pipeline's pretrained and fine-tuned models into the MLflow registry,
each promoted to `champion` only if it is comparable with the champion and beats it, and beats
its baseline.

- Every mask ratio's pretrained model is a candidate for `brainlm-pretrain`, on one yardstick:
  validation R^2 at the common mask (the same masks for every ratio); it must also beat the best
  reconstruction baseline there (gain > 0).
- The fine-tuned model competes on the params' test metric; it must also beat FC + linear on
  the same test subjects.
- Comparable means the same atlas, target, task and subjects (a key of them is tagged on each
  version); otherwise the decision is `not_comparable` and the champion stays. A model below its
  baseline is the `challenger` with decision `below_baseline` (`gate: false` turns this off).
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
    metric: str = "r2"  # the fine-tuned model's test metric (results.json)
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
        for s in ("val", "test")}


def _key(*parts) -> str:
    """What two scores must share to be compared (atlas, target, task, subjects)."""
    import hashlib

    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _candidate(name, version, metric, value, higher, key, baseline, gate):
    """Promote, hold back below the baseline, or keep the champion when not comparable."""
    from .. import registry

    if gate and baseline is None:  # no floor was measured: nothing says the model beats it
        return registry.hold_back(name, version.version, "no_baseline",
                                  f"{metric} {value:.4g}: its baseline could not be fitted, so "
                                  "the gate cannot pass")
    if gate and not (value > baseline if higher else value < baseline):
        return registry.hold_back(name, version.version, "below_baseline",
                                  f"{metric} {value:.4g} does not beat its baseline "
                                  f"({baseline:.4g})")
    try:
        return registry.promote(name, version.version, metric, value, higher, split=key)
    except ValueError as exc:  # the champion was scored on other subjects, atlas or target
        return registry.note_decision(name, version.version, "not_comparable", str(exc))


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


def _pretrained(cfg: RegisterConfig, root: Path, split: dict) -> dict:
    """Every mask ratio's model, in params order, on the common-mask yardstick."""
    import json

    from .. import registry

    out = {}
    for r in cfg.mask_ratios:
        folder = root / "models" / f"pretrain-{r:g}"
        fp = registry.pretrained_fingerprint(folder)

        def decide(version, folder=folder):  # read only for a version still to decide
            m = json.loads((folder / "metrics.json").read_text())
            atlas = json.loads((folder / "config.json").read_text()).get("atlas_hash")
            if "val_common_r2" not in m:  # no common-mask score (a parcel or future strategy)
                return registry.note_decision("brainlm-pretrain", version.version,
                                              "not_comparable", "no common-mask validation R^2")
            return _candidate("brainlm-pretrain", version, "val_common_r2", m["val_common_r2"],
                              True, _key(atlas, "common-mask", split["val"]),
                              m["val_common_r2_best_baseline"], cfg.gate)

        out[f"brainlm-pretrain@{r:g}"] = _decide(
            "brainlm-pretrain", fp, lambda folder=folder, r=r, fp=fp: registry.log_pretrained(
                folder, repo_root=root, tags={"mask_ratio": str(r), registry.FINGERPRINT: fp},
                run_id=registry.training_run("pretrain", fp)), decide)
    return out


def _finetuned(cfg: RegisterConfig, root: Path, split: dict) -> dict:
    import json

    from .. import registry

    run_dir = root / "runs" / "finetune"
    name = registry.finetuned_name(run_dir)
    fp = registry.finetuned_fingerprint(run_dir)
    results = root / "runs" / "evaluation" / "results.json"
    rows = json.loads(results.read_text())
    score = {r["method"]: r["value"] for r in rows if r["metric"] == cfg.metric}
    if "brainlm" not in score:
        raise ConfigError(f"{results}: no brainlm row for register.metric '{cfg.metric}' (have: "
                          f"{', '.join(sorted({r['metric'] for r in rows}))})")
    meta = json.loads((run_dir / "finetune.json").read_text())["config"]
    atlas = json.loads((root / "processed" / "store.json").read_text()).get("atlas_hash")
    key = _key(atlas, meta.get("target"), meta.get("task"), split["test"])
    return {name: _decide(
        name, fp, lambda: registry.log_finetuned(
            run_dir, repo_root=root, tags={registry.FINGERPRINT: fp},
            run_id=registry.training_run("finetune", fp)),
        lambda version: _candidate(name, version, cfg.metric, score["brainlm"],
                                   cfg.higher_is_better, key, score.get("fc_linear"), cfg.gate))}


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
