"""Job `compare`: the pretrained models of every mask ratio on one yardstick (table, plot,
MLflow run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NAME = "compare"


@dataclass
class CompareConfig:
    models: Path  # holds pretrain-<ratio>/ folders
    out: Path
    mask_ratios: tuple  # params.yaml's


Config = CompareConfig
OPTIONS: list = []  # a pipeline stage only (brainlm stage compare)


def from_params(params: dict, root: Path) -> CompareConfig:
    from . import shared

    return CompareConfig(models=root / "models", out=root / "runs" / "compare",
                         mask_ratios=tuple(float(r) for r in shared(params, "mask_ratios")))


def run(cfg: CompareConfig, tags: dict | None = None) -> dict:
    from ..analysis.mask_ratios import compare
    from ..tracking import job_run

    with job_run(NAME, "mask-ratios", cfg, tags) as tracker:
        rows = compare({r: Path(cfg.models) / f"pretrain-{r:g}" for r in cfg.mask_ratios},
                       cfg.out)
        for row in rows:
            tracker.metrics({k: v for k, v in row.items() if isinstance(v, float)
                             and k != "mask_ratio"}, step=int(round(row["mask_ratio"] * 100)))
        tracker.artifacts(cfg.out, "compare")
    values = {f"{k}@{r['mask_ratio']:g}": r[k] for r in rows
              for k in ("val_common_r2", "val_common_r2_gain", "val_common_r2_gain_low",
                        "val_common_r2_gain_high", "val_common_verdict")
              if r.get(k) is not None}
    print((Path(cfg.out) / "mask_ratios.md").read_text())
    return values
