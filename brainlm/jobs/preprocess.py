"""Job `preprocess`: recordings -> parcellated, split by subject, scaled, stored."""

from __future__ import annotations

from pathlib import Path

from ..data.parcellate import ENGINES, STANDARDIZE
from ..data.pipeline import PreprocessConfig
from .options import Option, fractions, names

NAME = "preprocess"
Config = PreprocessConfig
OPTIONS = [
    Option("inputs", "--input", "folder(s) or files"),
    Option("out", help="store folder"),
    Option("atlas", help="A424 (default) or a label NIfTI path"),
    Option("settings.target_tr", "--tr", "target TR in seconds: every recording is resampled "
           "to it", low=0.05, high=10),
    Option("input_tr", help="override the TR of the inputs (else header or JSON sidecar)",
           low=0.05, high=30),
    Option("workers", help="parallel processes", positive=True),
    Option("settings.min_timepoints", "--window",
           "model window; shorter recordings are quarantined", positive=True),
    Option("settings.engine", choices=ENGINES, help="nilearn: the reference"),
    Option("settings.standardize", choices=STANDARDIZE),
    Option("settings.detrend", "--no-detrend"),
    Option("settings.high_pass", help="Hz", positive=True),
    Option("settings.low_pass", help="Hz", positive=True),
    Option("settings.confounds", help="comma-separated columns of fMRIPrep's "
           "*_desc-confounds_timeseries.tsv to regress out", parse=names),
    Option("settings.max_uncovered", help="quarantine a recording when more than this fraction "
           "of parcels has no signal", low=0.0, high=1.0),
    Option("participants", help="phenotype table (default: participants.tsv in the input "
           "folder)"),
    Option("coords", help="parcel coordinates (x y z per row) for already-parcellated tables"),
    Option("fractions", "--split", "train,val,test fractions of subjects", parse=fractions),
    Option("seed", low=0),
    Option("scaler", help="apply this scaler.safetensors (from an earlier store) instead of "
           "fitting one: for data seen only at inference"),
    Option("cache_dir", help="parcellation cache (default: the user cache)"),
    Option("allow_fallback_atlas", help="use the offline generated atlas when A424 cannot be "
           "found"),
    Option("progress", "--no-progress"),
]
NOT_OPTIONS: dict = {}


def from_params(params: dict, root: Path) -> PreprocessConfig:
    from . import block
    from .options import from_block

    return from_block(PreprocessConfig, OPTIONS, block(params, NAME), NAME, fixed={
        "inputs": [root / "data"], "out": root / "processed", "allow_fallback_atlas": True,
        "progress": False})


def summary_values(summary) -> dict:
    return {"atlas": summary.atlas, "recordings_kept": summary.n_kept,
            "quarantined": len(summary.quarantined),
            **{f"subjects_{k}": v[0] for k, v in summary.per_split.items()}}


def run(cfg: PreprocessConfig, tags: dict | None = None, parcellate=None) -> dict:
    """`parcellate(plan, settings) -> (results, problems)` replaces the process pool (the
    Prefect flow maps one task per recording); the rest is the same whoever runs it."""
    from ..data.pipeline import assemble, plan_preprocess, run_preprocess
    from ..tracking import job_run

    with job_run(NAME, f"preprocess-{Path(cfg.out).name}", cfg, tags) as tracker:
        if parcellate is None:
            summary = run_preprocess(cfg)
        else:
            plan = plan_preprocess(cfg)
            results, problems = parcellate(plan, cfg.settings)
            summary = assemble(cfg, plan, results, {**plan.problems, **problems})
        values = summary_values(summary)
        tracker.summary(values)
    print(summary.format())
    return values
