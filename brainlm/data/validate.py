"""Great Expectations checks on a processed store, run as a checkpoint with Data Docs.

GX validates small summary tables rather than the [parcels, time] arrays themselves:
a per-parcel table (median, IQR, non-finite count, max |x| per split), the recordings, the
splits and the subjects. Column-by-column validation of a 424-wide matrix takes tens of
seconds; the summaries take a fraction of one and say the same things. Beside validation.json
goes validation.html (validation_report): every expectation with its bounds and what GX
measured, readable offline, unlike the Data Docs index.

Two kinds of per-parcel distribution checks, kept apart:
- `scaler_self_check`: the training split's median ~0 and IQR ~1. The robust scaler was fitted
  on exactly these values, so they hold by construction; a failure means a broken scaler or
  store, a pass says nothing about the data.
- `shift`: the validation and test splits against the training distribution, in the training
  scaler's units (training median 0, IQR 1 per parcel): each parcel's median within +/-m and
  its IQR within [1/r, r]; a split fails when more than shift_max_fraction of its parcels are
  beyond a bound (GX's `mostly`). A split is a sample of a few subjects: its parcel medians and
  IQRs scatter with the subjects (a loud subject is loud in every parcel), more the fewer they
  are. So m and r are the stated tolerances (shift_median_tol, shift_iqr_ratio) widened, where
  needed, to shift_z standard errors of a split of that size: the training subjects' spread of
  their own parcel medians and log IQRs (the median over parcels of the SD) times
  sqrt(1/n_split + 1/n_train) (`shift_bounds`).
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
    median_tol: float = 0.1  # scaler self-check: |training median| per parcel
    iqr_tol: float = 0.2  # scaler self-check: |training IQR - 1| per parcel
    # shift of val and test from training (training scaler units; README, Great Expectations):
    # a parcel's median within +/-bound, its IQR within [1/bound, bound], where each bound is
    # the tolerance below, widened to shift_z standard errors of the statistic for a split of
    # that many subjects where sampling subjects moves it more
    shift_median_tol: float = 0.5  # |median| per parcel, in training IQRs
    shift_iqr_ratio: float = 1.5  # IQR per parcel within [1/ratio, ratio] of the training IQR
    shift_z: float = 4.0  # between-subject standard errors a bound is at least
    shift_max_fraction: float = 0.1  # a split fails when more of its parcels are beyond
    max_abs: float = 100.0  # bound on |scaled value|, every split
    n_parcels: int | None = None  # expected parcel count (default: the store's own)
    window: int = 200  # every recording holds at least one window
    max_values: int = 200_000  # per parcel and split, a seeded subsample beyond this


SPLITS = ("train", "val", "test")
SHIFT_SPLITS = ("val", "test")  # compared with train, the split the scaler was fitted on

SELF_CHECK_NOTE = (
    "Scaler self-check, not evidence about the data: the robust scaler was fitted on these "
    "training values, so median 0 and IQR 1 per parcel hold by construction (a failure means "
    "a broken scaler or store). Whether the data moved is the `shift` suite's question.")
SHIFT_NOTE = (
    "Shift of the {split} split ({n} subjects) from the training distribution, in the training "
    "scaler's units (training median 0, IQR 1 per parcel): the split fails when more than "
    "{pct:g}% of its parcels lie beyond the bounds. Bounds: the stated tolerances (|median| "
    "<= {m:g}, IQR ratio <= {r:g}), widened to {z:g} between-subject standard errors of a "
    "split of {n} subjects where that is wider.")


def _split_values(store, rows, th: Thresholds, rng):
    """One split's recordings pooled, [P, n] float64 (a seeded subsample of timepoints beyond
    max_values), and the values its statistics use: the same with each recording's uncovered
    parcels blank (NaN), as the scaler left them out (the pooled array itself when none)."""
    labels = store.parcels["label"].to_numpy()
    blocks, seen, any_blank = [], [], False
    for _, r in rows.iterrows():
        x = np.asarray(store.load(r), dtype=np.float64)
        missing = r.get("uncovered")
        blank = np.isin(labels, np.asarray(missing, dtype=labels.dtype)) \
            if isinstance(missing, (list, tuple, np.ndarray)) and len(missing) else None
        blocks.append(x)
        seen.append(x if blank is None else np.where(blank[:, None], np.nan, x))
        any_blank |= blank is not None
    pooled = np.concatenate(blocks, axis=1)
    stats = np.concatenate(seen, axis=1) if any_blank else pooled
    if pooled.shape[1] > th.max_values:
        keep = np.sort(rng.choice(pooled.shape[1], th.max_values, False))
        stats = stats[:, keep] if any_blank else None
        pooled = pooled[:, keep]
        stats = pooled if stats is None else stats
    return pooled, stats


def summary_tables(store, th: Thresholds, seed: int = 0) -> dict:
    """The four tables the suites validate, as pandas DataFrames. `parcels` holds one row per
    split and parcel; its median and IQR are in the training scaler's units."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    has_data = store.parcels["has_data"].to_numpy(bool)
    parcel_rows = []
    for split in SPLITS:
        rows = store.recordings(split)
        if not len(rows):
            continue
        pooled, stats = _split_values(store, rows, th, rng)
        finite = np.isfinite(pooled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, med, q75 = np.nanpercentile(np.where(np.isfinite(stats), stats, np.nan),
                                             [25, 50, 75], axis=1)
        for p in range(store.n_parcels):
            # statistics only where the scaler had data (elsewhere every value is 0)
            known = has_data[p] and np.isfinite(med[p])
            parcel_rows.append({
                "split": split, "parcel": int(store.parcels["label"].iat[p]),
                "median": float(med[p]) if known else None,
                "iqr": float(q75[p] - q25[p]) if known else None,
                "n_nonfinite": int((~finite[p]).sum()),
                "max_abs": float(np.abs(np.where(finite[p], pooled[p], 0)).max())})
    parcels = pd.DataFrame(parcel_rows)
    kept = store.recordings()
    recordings = kept[["recording_id", "subject", "split", "n_parcels", "n_timepoints"]].copy()
    recordings[["n_parcels", "n_timepoints"]] = recordings[["n_parcels", "n_timepoints"]].astype(
        "int64")
    splits = pd.DataFrame({"split": list(SPLITS),
                           "n_recordings": [int((kept["split"] == s).sum()) for s in SPLITS],
                           "n_subjects": [int(kept.loc[kept["split"] == s, "subject"].nunique())
                                          for s in SPLITS]})
    subjects = kept.groupby("subject")["split"].nunique().rename("n_splits").reset_index()
    return {"parcels": parcels, "recordings": recordings, "splits": splits,
            "subjects": subjects}


# the summary table each suite validates
SUITE_TABLES = {"scaler_self_check": "parcels", "shift": "parcels", "parcels": "parcels",
                "recordings": "recordings", "splits": "splits", "subjects": "subjects"}
# columns that name the row behind an unexpected value, per summary table
ROW_KEYS = {"parcels": ["split", "parcel"], "recordings": ["recording_id"],
            "splits": ["split"], "subjects": ["subject"]}


def _suites(th: Thresholds, n_parcels: int, bounds: dict) -> dict:
    """Suite name -> its expectations (each suite validates SUITE_TABLES[name]); `bounds`:
    shift_bounds per held-out split."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def between(column, lo=None, hi=None, **kw):
        return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi, **kw)

    self_check = {"row_condition": Column("split") == "train", "notes": SELF_CHECK_NOTE,
                  "meta": {"check": "scaler_self_check", "split": "train",
                           "evidence_about_data": False}}
    shift = []
    for split in SHIFT_SPLITS:
        kw = {"row_condition": Column("split") == split, "mostly": 1 - th.shift_max_fraction,
              "notes": SHIFT_NOTE.format(
                  split=split, n=bounds[split]["n_subjects"], pct=100 * th.shift_max_fraction,
                  m=th.shift_median_tol, r=th.shift_iqr_ratio, z=th.shift_z),
              "meta": {"check": "shift", "split": split, "evidence_about_data": True}}
        shift += [between("median", *bounds[split]["median"], **kw),
                  between("iqr", *bounds[split]["iqr"], **kw)]
    label = "Scaler self-check (holds by construction, not evidence about the data): training"
    return {
        "scaler_self_check": [
            between("median", -th.median_tol, th.median_tol, **self_check,
                    description=f"{label} median within ±{th.median_tol:g} in every parcel"),
            between("iqr", 1 - th.iqr_tol, 1 + th.iqr_tol, **self_check,
                    description=f"{label} IQR within 1 ± {th.iqr_tol:g} in every parcel")],
        "shift": shift,
        "parcels": [between("n_nonfinite", 0, 0), between("max_abs", 0, th.max_abs)],
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
    """Run the suites as GX checkpoints, build Data Docs, write validation.json and a
    self-contained validation.html (every expectation, its bounds and what GX measured, and
    the shift of each held-out split).

    Raises ValidationFailed (after writing everything) when an expectation fails.
    """
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
    spread = training_spread(store, th)
    n_subjects = tables["splits"].set_index("split")["n_subjects"]
    bounds = {s: shift_bounds(spread, int(n_subjects[s]), th) for s in SHIFT_SPLITS}
    results, failures, measured, docs = _run_suites(out, _suites(th, n_parcels, bounds), tables)
    shift = shift_summary(tables, th, bounds, measured["shift"])
    self_check = _self_check_summary(tables["parcels"], results["scaler_self_check"])
    report = write_report(out / "validation.html", {
        "store": str(store_path), "n_parcels": store.n_parcels, "success": not failures,
        "thresholds": asdict(th) | {"n_parcels": n_parcels},
        "data_docs": docs.relative_to(out).as_posix(), "shift": shift},
        measured, {name: tables[SUITE_TABLES[name]] for name in measured})
    summary = {"success": not failures, "tables": results, "failures": failures,
               "data_docs": str(docs), "report": str(report),
               "scaler_self_check": self_check, "shift": shift,
               "n_recordings": int(len(tables["recordings"]))}
    write_bytes_atomic(out / "validation.json", json.dumps(summary, indent=2).encode())
    if failures:
        raise ValidationFailed(f"{store_path}: {len(failures)} expectation(s) failed:\n  "
                               + "\n  ".join(failures) + f"\nData Docs: {docs}"
                               + f"\nReport: {report}")
    return summary


def _run_suites(out: Path, suites: dict, tables: dict):
    """Each suite as a GX checkpoint of a file context in `out` (Data Docs built there).
    Returns ({suite: success}, failure lines, {suite: result rows}, Data Docs index path)."""
    import great_expectations as gx

    context = gx.get_context(mode="file", project_root_dir=str(out))
    source = context.data_sources.add_or_update_pandas("brainlm_store")
    results, failures, measured = {}, [], {}
    for name, expectations in suites.items():
        asset = next((a for a in source.assets if a.name == name), None) or \
            source.add_dataframe_asset(name)
        batch = next((b for b in asset.batch_definitions if b.name == "whole"), None) or \
            asset.add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"scaled_{name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"validate_{name}", data=batch, suite=suite))
        checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=f"store_{name}", validation_definitions=[definition],
            # the rows behind each unexpected value (split and parcel label, recording...);
            # every one of them for the shift suite, whose failure names its parcels
            result_format={"result_format": "COMPLETE" if name == "shift" else "SUMMARY",
                           "unexpected_index_column_names": ROW_KEYS[SUITE_TABLES[name]]}))
        result = checkpoint.run(batch_parameters={"dataframe": tables[SUITE_TABLES[name]]})
        results[name] = bool(result.success)
        measured[name] = _result_rows(name, result, failures)
    context.build_data_docs()  # once, every suite's results (no per-checkpoint rebuild)
    return results, failures, measured, out / "gx" / "uncommitted" / "data_docs" / \
        "local_site" / "index.html"


def _result_rows(name: str, result, failures: list) -> list:
    """GX's per-expectation results of one checkpoint run as plain dicts (type, kwargs, meta,
    notes, success, result, exception) for the report; appends a line per failure to
    `failures` (for a shift check: the split, how many parcels and which)."""
    rows = []
    for run in result.run_results.values():
        for r in run.results:
            cfg = r.expectation_config
            row = {"type": cfg.type, "kwargs": dict(cfg.kwargs), "meta": dict(cfg.meta or {}),
                   "notes": cfg.notes, "success": bool(r.success),
                   "result": dict(r.result or {}), "exception": _exception(r.exception_info)}
            rows.append(row)
            if r.success:
                continue
            if row["meta"].get("check") == "shift":
                failures.append(_shift_failure(row))
                continue
            bad = r.result.get("partial_unexpected_list") or r.result.get("observed_value")
            failures.append(f"{name}: {cfg.type}({cfg.kwargs.get('column', '')}) "
                            f"failed, e.g. {str(bad)[:80]}")
    return rows


def _shift_failure(row: dict, shown: int = 20) -> str:
    """One line naming the split, the statistic, its bounds and the parcels beyond them."""
    kw, res = row["kwargs"], row["result"]
    column, split = kw.get("column"), row["meta"].get("split")
    beyond = sorted(int(u["parcel"]) for u in res.get("unexpected_index_list")
                    or res.get("partial_unexpected_index_list") or [])
    listed = ", ".join(map(str, beyond[:shown])) + (
        f" and {len(beyond) - shown} more" if len(beyond) > shown else "")
    allowed = 100 * (1 - kw.get("mostly", 1.0))
    return (f"shift: {row['type']}({column}) failed for the {split} split: "
            f"{res.get('unexpected_count')} of {res.get('element_count')} parcels beyond "
            f"{kw.get('min_value'):.4g} <= {column} <= {kw.get('max_value'):.4g} "
            f"(training scaler units; at most {allowed:.4g}% may be): parcels {listed}")


def training_spread(store, th: Thresholds) -> dict:
    """How much training subjects differ from one another, in scaler units: per parcel the SD
    over training subjects of each subject's median and log IQR, then the median over parcels
    (None with fewer than two training subjects)."""
    has_data = store.parcels["has_data"].to_numpy(bool)
    rows = store.recordings("train")
    medians, log_iqrs = [], []
    rng = np.random.default_rng(0)
    for _, group in rows.groupby("subject", sort=True):
        _, values = _split_values(store, group, th, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, med, q75 = np.nanpercentile(np.where(np.isfinite(values), values, np.nan),
                                             [25, 50, 75], axis=1)
            medians.append(np.where(has_data, med, np.nan))
            log_iqrs.append(np.where(has_data & (q75 > q25), np.log(q75 - q25), np.nan))
    out = {"n_subjects": len(medians), "median_sd": None, "log_iqr_sd": None}
    if len(medians) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for key, values in (("median_sd", medians), ("log_iqr_sd", log_iqrs)):
                sd = float(np.nanmedian(np.nanstd(np.array(values), axis=0, ddof=1)))
                out[key] = sd if np.isfinite(sd) else None
    return out


def shift_bounds(spread: dict, n_subjects: int, th: Thresholds) -> dict:
    """The bounds of a held-out split of `n_subjects`: the stated tolerances, widened to
    shift_z standard errors of the split's statistic where the training subjects' spread
    (training_spread) says sampling that few subjects moves it more."""
    n_train = spread["n_subjects"]
    factor = float(np.sqrt(1 / n_subjects + 1 / n_train)) if n_subjects and n_train else None
    se = {key: (spread[key] * factor if factor and spread[key] is not None else None)
          for key in ("median_sd", "log_iqr_sd")}
    median = max(th.shift_median_tol, th.shift_z * (se["median_sd"] or 0.0))
    log_iqr = max(float(np.log(th.shift_iqr_ratio)), th.shift_z * (se["log_iqr_sd"] or 0.0))
    return {"median": [-median, median], "iqr": [float(np.exp(-log_iqr)), float(np.exp(log_iqr))],
            "n_subjects": n_subjects, "n_train_subjects": n_train,
            "se_median": se["median_sd"], "se_log_iqr": se["log_iqr_sd"],
            "widened": {"median": median > th.shift_median_tol,
                        "iqr": log_iqr > float(np.log(th.shift_iqr_ratio))}}


def shift_summary(tables: dict, th: Thresholds, bounds: dict, rows: list) -> dict:
    """Per held-out split: its subjects, the bounds and how they came about, the spread of its
    parcel medians and IQRs (training scaler units), the parcel labels beyond each bound and
    the verdict GX gave."""
    parcels, splits = tables["parcels"], tables["splits"].set_index("split")
    out = {"what": "shift of the held-out splits from the training distribution, in the "
                   "training scaler's units (training median 0, IQR 1 per parcel)",
           "tolerances": {"median": th.shift_median_tol, "iqr_ratio": th.shift_iqr_ratio,
                          "z": th.shift_z},
           "max_fraction_beyond": th.shift_max_fraction, "splits": {}}
    for split in SHIFT_SPLITS:
        mine = parcels[(parcels["split"] == split) & parcels["median"].notna()]
        verdicts = [r["success"] for r in rows if r["meta"].get("split") == split]
        b = bounds[split]
        entry = {"n_subjects": b["n_subjects"], "n_train_subjects": b["n_train_subjects"],
                 "n_recordings": int(splits.at[split, "n_recordings"]),
                 "n_parcels": int(len(mine)), "se_median": b["se_median"],
                 "se_log_iqr": b["se_log_iqr"], "success": bool(verdicts) and all(verdicts)}
        shifted = np.zeros(len(mine), bool)
        for column in ("median", "iqr"):
            lo, hi = b[column]
            values = mine[column].astype(float).to_numpy()
            off = (values < lo) | (values > hi)
            shifted |= off
            entry[column] = {
                "bounds": [lo, hi], "widened_by_sampling": b["widened"][column],
                "min": _num(values, np.min), "median": _num(values, np.median),
                "max": _num(values, np.max), "n_beyond": int(off.sum()),
                "fraction_beyond": float(off.mean()) if len(off) else 0.0,
                "parcels_beyond": [int(p) for p in mine["parcel"].to_numpy()[off]]}
        entry["fraction_shifted"] = float(shifted.mean()) if len(shifted) else 0.0
        out["splits"][split] = entry
    return out


def _num(values, fn):
    return float(fn(values)) if len(values) else None


def _self_check_summary(parcels, success: bool) -> dict:
    """The training split's medians and IQRs, labelled as what they are."""
    train = parcels[(parcels["split"] == "train") & parcels["median"].notna()]
    return {"what": SELF_CHECK_NOTE, "evidence_about_data": False, "success": bool(success),
            "train_median_max_abs": _num(np.abs(train["median"].astype(float)), np.max),
            "train_iqr_max_dev": _num(np.abs(train["iqr"].astype(float) - 1), np.max)}


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
