"""Job `predict`: a fine-tuned model (a run folder or `models:/NAME@ALIAS`) scores a new cohort.

The recordings (4-D NIfTI or parcellated tables) go through the same preprocessing as the
training data: parcellated with the model's atlas and settings, scaled with the model's scaler
(refused, with the reason, on another atlas, TR or parcel count). Before predicting, the scaled
cohort is compared with the training distribution by a Great Expectations suite
(`data.validate.drift_check`): on training data every parcel's median is 0 and IQR 1 after
scaling, so a parcel whose pooled median or IQR moved beyond the tolerances has drifted; the
drift is written in the report beside the predictions and said as a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import check_output
from .options import Option

NAME = "predict"
METRICS = None  # not a pipeline stage


@dataclass
class PredictConfig:
    model: str  # a fine-tuning run folder, or models:/NAME@ALIAS (or /VERSION)
    inputs: list
    out: Path  # predictions .parquet; the report beside it
    atlas: str | None = None  # default: the atlas the model was trained on
    input_tr: float | None = None  # else header or JSON sidecar
    coords: Path | None = None  # parcel coordinates for already-parcellated tables
    participants: Path | None = None
    median_tol: float = 0.5  # |pooled median| of a scaled parcel beyond this: drift
    iqr_tol: float = 0.5  # |pooled IQR - 1| beyond this: drift
    workers: int = 1
    cache_dir: Path | None = None
    allow_fallback_atlas: bool = False


Config = PredictConfig
OPTIONS = [
    Option("model", help="fine-tuning run folder or models:/NAME@ALIAS"),
    Option("inputs", "--input", "recordings: folder(s) or files (NIfTI or tables)"),
    Option("out", help="predictions .parquet (the drift report beside it, .report.json)"),
    Option("atlas", help="default: the model's"),
    Option("input_tr", help="override the TR of the inputs", low=0.05, high=30),
    Option("coords", help="parcel coordinates for already-parcellated tables"),
    Option("participants", help="phenotype table (default: participants.tsv beside the "
           "inputs)"),
    Option("median_tol", positive=True),
    Option("iqr_tol", positive=True),
    Option("workers", positive=True),
    Option("cache_dir", help="parcellation cache (default: the user cache)"),
    Option("allow_fallback_atlas", help="use the offline generated atlas when A424 cannot be "
           "found"),
]
NOT_OPTIONS: dict = {}


def load_finetuned(model: str, folder):
    """A `predictor.FinetunedModel` from a run folder or a registered model URI (downloaded
    into `folder` and checked to be this project's pyfunc before anything of it is read:
    `brainlm.registered`)."""
    if str(model).startswith("models:/"):
        from ..registered import load_registered_task
        from ..registry import _use_tracking_uri, tracking_uri

        uri = tracking_uri()
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise ConfigError(f"{model}: no registry at {uri} (this folder is in no project "
                              "with a store): run from the project, or set MLFLOW_TRACKING_URI")
        _use_tracking_uri()
        return load_registered_task(str(model), folder)
    from ..predictor import FinetunedModel

    return FinetunedModel(model)


def _preprocess(cfg: PredictConfig, model, folder: Path):
    """The cohort as the training data were made: a temporary store scaled with the model's
    scaler (whose atlas, TR and settings it checks)."""
    from ..data.parcellate import ParcellationSettings
    from ..data.pipeline import PreprocessConfig, run_preprocess
    from ..data.store import BrainStore

    scaler = model.scaler
    settings = dict(scaler.meta.get("settings") or {})
    settings.pop("target_tr", None)
    if "confounds" in settings:
        settings["confounds"] = tuple(settings["confounds"])
    summary = run_preprocess(PreprocessConfig(
        inputs=[Path(p) for p in cfg.inputs], out=folder,
        atlas=cfg.atlas or scaler.meta.get("atlas") or "A424",
        settings=ParcellationSettings(target_tr=float(scaler.meta["tr"]),
                                      min_timepoints=model.window, **settings),
        input_tr=cfg.input_tr, participants=cfg.participants, coords=cfg.coords,
        fractions=(1.0, 0.0, 0.0), workers=cfg.workers, cache_dir=cfg.cache_dir,
        scaler=model.scaler_path, allow_fallback_atlas=cfg.allow_fallback_atlas,
        progress=False))
    return summary, BrainStore(folder)


def _check_out(out: Path, inputs) -> None:
    """A .parquet file (its report beside it as .report.json) that is none of the inputs."""
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: give a .parquet file (the drift report is written "
                          "beside it as .report.json)")
    for path in (out, out.with_suffix(".report.json")):
        if path.is_dir():
            raise ConfigError(f"--out {out}: {path} is a folder")
    for item in map(Path, inputs):
        if out.resolve() == item.resolve():
            raise ConfigError(f"--out {out} is one of the --input recordings: it would be "
                              "replaced by the predictions")
    check_output(out, inputs)


def run(cfg: PredictConfig, tags: dict | None = None) -> dict:
    import json
    import tempfile

    from ..data.validate import drift_check
    from ..fileio import atomic_path, write_bytes_atomic
    from ..tracking import job_run

    if not cfg.inputs:
        raise ConfigError("predict: no --input recordings")
    out = Path(cfg.out)
    _check_out(out, cfg.inputs)
    with job_run(NAME, f"predict-{out.stem}", cfg, tags) as tracker, \
            tempfile.TemporaryDirectory(prefix="brainlm-predict-") as tmp:
        (Path(tmp) / "model").mkdir()
        model = load_finetuned(cfg.model, Path(tmp) / "model")
        summary, store = _preprocess(cfg, model, Path(tmp) / "store")
        rows = store.recordings()
        xs = [np.asarray(store.load(r)) for _, r in rows.iterrows()]
        report = {"model": str(cfg.model), "recordings": len(xs),
                  "quarantined": [{"path": p, "reason": r} for p, r in summary.quarantined],
                  "drift": drift_check(xs, cfg.median_tol, cfg.iqr_tol)}
        table = model.predict(xs, scaled=True)
        table.insert(0, "source_path", rows["source_path"].to_numpy())
        table.insert(0, "subject", rows["subject"].to_numpy())
        table.insert(0, "recording_id", rows["recording_id"].to_numpy())
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as path:
            table.to_parquet(path, index=False)
        write_bytes_atomic(out.with_suffix(".report.json"),
                           json.dumps(report, indent=2).encode())
        n_drift = len(report["drift"]["drifted_parcels"])
        values = {"recordings": len(xs), "quarantined": len(summary.quarantined),
                  "drifted_parcels": n_drift}
        tracker.summary(values)
    if n_drift:
        warnings.warn(f"{n_drift} of {report['drift']['n_parcels']} parcels drifted from the "
                      f"training distribution (median beyond {cfg.median_tol} or IQR beyond "
                      f"1 +/- {cfg.iqr_tol} after scaling): see {out.with_suffix('.report.json')}")
    print(f"brainlm predict: {len(xs)} recordings ({len(summary.quarantined)} quarantined) -> "
          f"{out}")
    return values
