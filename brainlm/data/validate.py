"""Great Expectations checks on a processed store, run as a checkpoint with Data Docs.

GX validates small summary tables rather than the [parcels, time] arrays themselves:
a per-parcel table (median, IQR, non-finite count, max |x| per split), the recordings, the
splits and the subjects. Column-by-column validation of a 424-wide matrix takes tens of
seconds; the summaries take a fraction of one and say the same things. Beside validation.json
goes validation.html (validation_report): every expectation with its bounds and what GX
measured, readable offline, unlike the Data Docs index.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import BrainLMError, ConfigError
from .validation_report import write_report


class ValidationFailed(BrainLMError):
    """The store breaks an expectation; the message lists them and names the Data Docs."""


@dataclass
class Thresholds:
    median_tol: float = 0.1  # |training median| per parcel
    iqr_tol: float = 0.2  # |training IQR - 1| per parcel
    max_abs: float = 100.0  # bound on |scaled value|, every split
    n_parcels: int | None = None  # expected parcel count (default: the store's own)
    window: int = 200  # every recording holds at least one window
    max_values: int = 200_000  # per parcel and split, a seeded subsample beyond this


def summary_tables(store, th: Thresholds, seed: int = 0) -> dict:
    """The four tables the suite validates, as pandas DataFrames."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    has_data = store.parcels["has_data"].to_numpy(bool)
    parcel_rows = []
    for split in ("train", "val", "test"):
        rows = store.recordings(split)
        if not len(rows):
            continue
        blocks = [np.asarray(store.load(r), dtype=np.float64) for _, r in rows.iterrows()]
        pooled = np.concatenate(blocks, axis=1)
        if pooled.shape[1] > th.max_values:
            pooled = pooled[:, np.sort(rng.choice(pooled.shape[1], th.max_values, False))]
        finite = np.isfinite(pooled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, med, q75 = np.nanpercentile(np.where(finite, pooled, np.nan), [25, 50, 75],
                                             axis=1)
        for p in range(store.n_parcels):
            parcel_rows.append({
                "split": split, "parcel": int(store.parcels["label"].iat[p]),
                # training statistics are only expected where the scaler had data
                "median": float(med[p]) if has_data[p] else None,
                "iqr": float(q75[p] - q25[p]) if has_data[p] else None,
                "n_nonfinite": int((~finite[p]).sum()),
                "max_abs": float(np.abs(np.where(finite[p], pooled[p], 0)).max())})
    parcels = pd.DataFrame(parcel_rows)
    kept = store.recordings()
    recordings = kept[["recording_id", "subject", "split", "n_parcels", "n_timepoints"]].copy()
    recordings[["n_parcels", "n_timepoints"]] = recordings[["n_parcels", "n_timepoints"]].astype(
        "int64")
    splits = pd.DataFrame({"split": ["train", "val", "test"],
                           "n_recordings": [int((kept["split"] == s).sum())
                                            for s in ("train", "val", "test")]})
    subjects = kept.groupby("subject")["split"].nunique().rename("n_splits").reset_index()
    return {"parcels": parcels, "recordings": recordings, "splits": splits,
            "subjects": subjects}


# columns that name the row behind an unexpected value, per summary table
ROW_KEYS = {"parcels": ["split", "parcel"], "recordings": ["recording_id"],
            "splits": ["split"], "subjects": ["subject"]}


def _suites(gx, th: Thresholds, n_parcels: int) -> dict:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def between(column, lo=None, hi=None, **kw):
        return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi, **kw)

    train_only = {"row_condition": Column("split") == "train"}
    return {
        "parcels": [
            between("median", -th.median_tol, th.median_tol, **train_only),
            between("iqr", 1 - th.iqr_tol, 1 + th.iqr_tol, **train_only),
            between("n_nonfinite", 0, 0),
            between("max_abs", 0, th.max_abs),
        ],
        "recordings": [
            between("n_parcels", n_parcels, n_parcels),
            between("n_timepoints", th.window, None),
            gxe.ExpectColumnValuesToBeUnique(column="recording_id"),
        ],
        "splits": [
            between("n_recordings", 1, None),
            gxe.ExpectTableRowCountToEqual(value=3),
        ],
        "subjects": [between("n_splits", 1, 1)],
    }


def validate_store(store_path, out_dir=None, thresholds: Thresholds | None = None) -> dict:
    """Run the suite as a GX checkpoint, build Data Docs, write validation.json and a
    self-contained validation.html (every expectation, its bounds and what GX measured).

    Raises ValidationFailed (after writing everything) when an expectation fails.
    """
    import great_expectations as gx

    from ..data.store import BrainStore
    from ..fileio import write_bytes_atomic

    th = thresholds or Thresholds()
    store = BrainStore(store_path)
    n_parcels = th.n_parcels or store.n_parcels
    out = Path(out_dir) if out_dir else Path(store_path).resolve().parent / "validation"
    inside = Path(store_path).resolve()
    if out.resolve() == inside or inside in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the store {store_path}: the store is written "
                          "whole by preprocess (and versioned as it is); write the report "
                          "beside it")
    out.mkdir(parents=True, exist_ok=True)
    tables = summary_tables(store, th)
    context = gx.get_context(mode="file", project_root_dir=str(out))
    source = context.data_sources.add_or_update_pandas("brainlm_store")
    definitions = []
    for name, expectations in _suites(gx, th, n_parcels).items():
        asset = next((a for a in source.assets if a.name == name), None) or \
            source.add_dataframe_asset(name)
        batch = next((b for b in asset.batch_definitions if b.name == "whole"), None) or \
            asset.add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"scaled_{name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definitions.append(context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"validate_{name}", data=batch, suite=suite)))
    results, failures, measured = {}, [], {}
    for name, definition in zip(_suites(gx, th, n_parcels), definitions):
        checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=f"store_{name}", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            # the rows behind each unexpected value (split and parcel label, recording...)
            result_format={"result_format": "SUMMARY",
                           "unexpected_index_column_names": ROW_KEYS[name]}))
        result = checkpoint.run(batch_parameters={"dataframe": tables[name]})
        results[name] = bool(result.success)
        measured[name] = _result_rows(name, result, failures)
    context.build_data_docs()
    docs = Path(out) / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    report = write_report(out / "validation.html", {
        "store": str(store_path), "n_parcels": store.n_parcels, "success": not failures,
        "thresholds": asdict(th) | {"n_parcels": n_parcels},
        "data_docs": docs.relative_to(out).as_posix()}, measured, tables)
    summary = {"success": not failures, "tables": results, "failures": failures,
               "data_docs": str(docs), "report": str(report),
               "train_median_max_abs": float(np.nanmax(np.abs(
                   tables["parcels"].query("split == 'train'")["median"].astype(float)))),
               "n_recordings": int(len(tables["recordings"]))}
    write_bytes_atomic(out / "validation.json", json.dumps(summary, indent=2).encode())
    if failures:
        raise ValidationFailed(f"{store_path}: {len(failures)} expectation(s) failed:\n  "
                               + "\n  ".join(failures) + f"\nData Docs: {docs}"
                               + f"\nReport: {report}")
    return summary


def _result_rows(name: str, result, failures: list) -> list:
    """GX's per-expectation results of one checkpoint run as plain dicts (type, kwargs,
    success, result, exception) for the report; appends a line per failure to `failures`."""
    rows = []
    for run in result.run_results.values():
        for r in run.results:
            cfg = r.expectation_config
            rows.append({"type": cfg.type, "kwargs": dict(cfg.kwargs),
                         "success": bool(r.success), "result": dict(r.result or {}),
                         "exception": _exception(r.exception_info)})
            if not r.success:
                bad = r.result.get("partial_unexpected_list") or r.result.get("observed_value")
                failures.append(f"{name}: {cfg.type}({cfg.kwargs.get('column', '')}) "
                                f"failed, e.g. {str(bad)[:80]}")
    return rows


def _exception(info) -> dict:
    """GX's exception_info is one {raised_exception, exception_message...} dict, or such dicts
    keyed by metric; the one that raised (if any)."""
    info = dict(info or {})
    if "raised_exception" in info:
        return info
    return next((v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")),
                {})


def drift_check(xs: list, median_tol: float, iqr_tol: float) -> dict:
    """New scaled recordings against the training distribution, as a GX suite: after scaling,
    training data have median 0 and IQR 1 in every parcel, so the pooled median and IQR of a
    new cohort's parcel beyond the tolerances is drift. Returns the per-parcel statistics and
    the parcels each expectation flagged (an ephemeral context: nothing is written)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    pooled = np.concatenate([np.asarray(x, np.float64) for x in xs], axis=1)
    q25, median, q75 = np.percentile(pooled, [25, 50, 75], axis=1)
    stats = pd.DataFrame({"parcel": np.arange(len(median)), "median": median,
                          "iqr": q75 - q25})
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("cohort").add_dataframe_asset(
        "parcels").add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(gx.ExpectationSuite(name="drift_from_training"))
    for column, lo, hi in (("median", -median_tol, median_tol), ("iqr", 1 - iqr_tol,
                                                                  1 + iqr_tol)):
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=lo,
                                                                max_value=hi))
    result = context.validation_definitions.add(gx.ValidationDefinition(
        name="drift", data=batch, suite=suite)).run(
        batch_parameters={"dataframe": stats},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["parcel"]})
    flagged = {r.expectation_config.kwargs["column"]: sorted(
        int(u["parcel"]) for u in r.result.get("unexpected_index_list") or [])
        for r in result.results}
    return {"suite": "drift_from_training", "success": bool(result.success),
            "median_tol": median_tol, "iqr_tol": iqr_tol, "n_parcels": int(len(median)),
            "median_moved": flagged.get("median", []), "iqr_moved": flagged.get("iqr", []),
            "drifted_parcels": sorted(set(flagged.get("median", []))
                                      | set(flagged.get("iqr", []))),
            "median": [round(float(v), 4) for v in median],
            "iqr": [round(float(v), 4) for v in q75 - q25]}
