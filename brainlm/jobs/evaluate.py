"""Job `evaluate`: a fine-tuning run's validation- and test-split metrics with subject-level
bootstrap CIs, beside baselines fitted on the same training recordings, and BrainLM minus each
baseline paired over subjects (MLflow: `<method>_<metric>` and `vs_<baseline>_<metric>` with
`_low` / `_high` for test, the same names prefixed `val_` for validation; tags
`verdict.[val_]vs_<baseline>.<metric>` = better / worse / undecided)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import Option

NAME = "evaluate"


@dataclass
class EvaluateConfig:
    run: Path  # output folder of a finetune job
    out: Path | None = None  # default: <run>/evaluation
    n_boot: int = 1000
    seed: int = 0


Config = EvaluateConfig
OPTIONS = [
    Option("run", help="output folder of brainlm finetune"),
    Option("out", help="default: RUN/evaluation"),
    Option("n_boot", positive=True, high=100_000,
           help="bootstrap resamples of the validation and test subjects"),
    Option("seed", low=0),
]
NOT_OPTIONS: dict = {}


def from_params(params: dict, root: Path) -> EvaluateConfig:
    from . import block
    from .options import from_block

    return from_block(EvaluateConfig, OPTIONS, block(params, NAME), NAME, fixed={
        "run": root / "runs" / "finetune", "out": root / "runs" / "evaluation"})


def run(cfg: EvaluateConfig, tags: dict | None = None) -> dict:
    from ..evaluate import evaluate_run
    from ..evaluate.comparisons import tracking_values
    from ..tracking import job_run

    out = cfg.out or Path(cfg.run) / "evaluation"
    with job_run(NAME, f"evaluate-{Path(cfg.run).name}", cfg, tags, out=out) as tracker:
        result = evaluate_run(cfg.run, cfg.out, n_boot=cfg.n_boot, seed=cfg.seed)
        values = tracking_values(result["rows"], result["comparisons"])
        tracker.summary(values)
    print(result["table"])
    print(f"brainlm evaluate: {result['paths']['markdown']}")
    return values
