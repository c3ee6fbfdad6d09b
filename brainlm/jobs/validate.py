"""Job `validate`: Great Expectations checks of a processed store (training medians ~0 and
IQRs ~1 per parcel, finite and bounded values, parcel count, window length, splits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.validate import Thresholds
from .options import Option

NAME = "validate"


@dataclass
class ValidateConfig:
    data: Path
    out: Path | None = None  # GX project and validation.json; default: validation/ beside data
    thresholds: Thresholds = field(default_factory=Thresholds)


Config = ValidateConfig
OPTIONS = [
    Option("data", help="store folder"),
    Option("out", help="GX project and validation.json (default: validation/ beside the "
           "store)"),
    Option("thresholds.window", "--window", positive=True),
    Option("thresholds.n_parcels", "--parcels", "expected parcel count (default: the store's)",
           positive=True),
    Option("thresholds.median_tol", positive=True),
    Option("thresholds.iqr_tol", positive=True),
    Option("thresholds.max_abs", positive=True),
    Option("thresholds.max_values", help="values per parcel and split checked (a seeded "
           "subsample beyond this)", positive=True),
]
NOT_OPTIONS: dict = {}


def from_params(params: dict, root: Path) -> ValidateConfig:
    from . import block
    from . import preprocess as preprocess_job
    from .options import from_block

    window = preprocess_job.from_params(params, root).settings.min_timepoints
    return from_block(ValidateConfig, OPTIONS, block(params, NAME), NAME, fixed={
        "data": root / "processed", "out": root / "validation", "thresholds.window": window})


def run(cfg: ValidateConfig, tags: dict | None = None) -> dict:
    import logging

    from ..data.validate import validate_store
    from ..tracking import job_run

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    with job_run(NAME, f"validate-{Path(cfg.data).name}", cfg, tags) as tracker:
        summary = validate_store(cfg.data, cfg.out, cfg.thresholds)
        values = {"success": summary["success"], "n_recordings": summary["n_recordings"],
                  "train_median_max_abs": summary["train_median_max_abs"]}
        tracker.summary(values)
    print(f"brainlm validate: all checks passed on {summary['n_recordings']} recordings; "
          f"Data Docs: {summary['data_docs']}; report: {summary['report']}")
    return values
