"""Job `validate`: Great Expectations checks of a processed store: the validation and test
splits' shift from the training distribution per parcel (median and IQR in the training
scaler's units), the scaler's self-check on the training split (median ~0 and IQR ~1 hold by
construction there), finite and bounded values, parcel count, window length, splits."""

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
    Option("thresholds.median_tol", help="scaler self-check: bound on |training median| per "
           "parcel (holds by construction)", positive=True),
    Option("thresholds.iqr_tol", help="scaler self-check: bound on |training IQR - 1| per "
           "parcel (holds by construction)", positive=True),
    Option("thresholds.shift_median_tol", help="shift: bound on |median| of a validation or "
           "test parcel, in training IQRs (widened by --shift-z)", positive=True),
    Option("thresholds.shift_iqr_ratio", help="shift: a validation or test parcel's IQR lies "
           "within [1/ratio, ratio] of the training IQR (widened by --shift-z)", low=1.0),
    Option("thresholds.shift_z", help="shift: a bound is at least this many between-subject "
           "standard errors of a split of that many subjects", positive=True),
    Option("thresholds.shift_max_fraction", help="shift: a split fails when more than this "
           "fraction of its parcels is beyond a bound", low=0.0, high=1.0),
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
                  "self_check_train_median_max_abs":
                      summary["scaler_self_check"]["train_median_max_abs"]}
        for split, entry in summary["shift"]["splits"].items():
            values[f"{split}_shift_fraction"] = entry["fraction_shifted"]
            values[f"{split}_median_max_abs"] = max(abs(entry["median"]["min"] or 0.0),
                                                    abs(entry["median"]["max"] or 0.0))
            values[f"{split}_iqr_max"] = entry["iqr"]["max"]
            values[f"{split}_iqr_min"] = entry["iqr"]["min"]
        tracker.summary(values)
    shifts = ", ".join(f"{s} {100 * e['fraction_shifted']:.3g}% of parcels beyond"
                       for s, e in summary["shift"]["splits"].items())
    print(f"brainlm validate: all checks passed on {summary['n_recordings']} recordings "
          f"(shift from training: {shifts}); Data Docs: {summary['data_docs']}; "
          f"report: {summary['report']}")
    return values
