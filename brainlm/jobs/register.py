"""Job `register`: the pipeline's pretrained and fine-tuned models into the MLflow registry,
each promoted to `champion` only if it beats the current one on the same subjects (the
pretrained model of the fine-tuned mask ratio on validation R^2, the fine-tuned model on the
params' test metric)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NAME = "register"


@dataclass
class RegisterConfig:
    root: Path  # the project: models/, runs/, processed/
    mask_ratios: tuple  # params.yaml's: every pretrained model is registered
    finetune_mask_ratio: float  # params.yaml's: the pretrained model that competes
    metric: str = "r2"  # the fine-tuned model's test metric (results.json)
    higher_is_better: bool = True


Config = RegisterConfig
OPTIONS: list = []  # a pipeline stage only (brainlm stage register)


def from_params(params: dict, root: Path) -> RegisterConfig:
    from . import block, shared

    reg = block(params, NAME)
    unknown = set(reg) - {"metric", "higher_is_better"}
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"params.yaml register: unknown setting(s) {', '.join(sorted(unknown))}"
                          " (known: higher_is_better, metric)")
    return RegisterConfig(root=root, mask_ratios=tuple(float(r) for r in
                                                       shared(params, "mask_ratios")),
                          finetune_mask_ratio=float(shared(params, "finetune_mask_ratio")),
                          **reg)


def _split_hashes(root: Path) -> dict:
    import hashlib

    import pandas as pd

    manifest = pd.read_parquet(root / "processed" / "manifest.parquet")
    return {s: hashlib.sha256(",".join(sorted(set(
        manifest.loc[manifest["split"] == s, "subject"]))).encode()).hexdigest()[:16]
        for s in ("val", "test")}


def run(cfg: RegisterConfig, tags: dict | None = None) -> dict:
    """Register what changed; an unchanged model (same fingerprint: weights, scaler, data)
    keeps its version and gets the decision `unchanged`, so a rerun never churns versions."""
    import json

    from .. import registry
    from ..tracking import job_run

    root = Path(cfg.root)
    split = _split_hashes(root)

    def decide(name, version, metric, value, higher, on):
        try:
            return registry.promote(name, version, metric, value, higher, split=split[on])
        except ValueError as exc:  # the champion was scored on other subjects
            return {"decision": "not_comparable", "champion_version": None, "reason": str(exc)}

    def unchanged(name, version):
        return {"decision": "unchanged", "candidate_version": str(version.version),
                "champion_version": registry.champion_version(name)}

    decisions = {}
    with job_run(NAME, "register", cfg, tags) as tracker:
        for r in cfg.mask_ratios:
            folder = root / "models" / f"pretrain-{r:g}"
            known = registry.find_version("brainlm-pretrain",
                                          registry.pretrained_fingerprint(folder))
            version = known or registry.log_pretrained(folder, repo_root=root,
                                                       tags={"mask_ratio": str(r)})
            if r != cfg.finetune_mask_ratio:
                continue
            val = json.loads((folder / "metrics.json").read_text())
            decisions["brainlm-pretrain"] = unchanged("brainlm-pretrain", known) if known \
                else decide("brainlm-pretrain", version.version, "val_r2", val["val_r2"], True,
                            "val")
        run_dir = root / "runs" / "finetune"
        name = registry.finetuned_name(run_dir)
        known = registry.find_version(name, registry.finetuned_fingerprint(run_dir))
        if known:
            decisions[name] = unchanged(name, known)
        else:
            rows = json.loads((root / "runs" / "evaluation" / "results.json").read_text())
            value = next(r["value"] for r in rows if r["method"] == "brainlm"
                         and r["metric"] == cfg.metric)
            version = registry.log_finetuned(run_dir, repo_root=root)
            decisions[name] = decide(name, version.version, cfg.metric, value,
                                     cfg.higher_is_better, "test")
        values = {k: {"decision": d["decision"], "champion_version": str(d["champion_version"])}
                  for k, d in decisions.items()}
        tracker.tags({f"decision.{k}": v["decision"] for k, v in values.items()})
    return values
