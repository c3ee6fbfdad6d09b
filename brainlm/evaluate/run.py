"""`brainlm evaluate`: a fine-tuning run scored beside its baselines, with the positive control.

The run's own predictions are only comparable to baselines fitted on exactly its training
recordings and scored on exactly its test recordings, so everything here is rebuilt from the
run's store and checked against what the run wrote (a rebuilt store is refused, not scored).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import write_bytes_atomic
from .baselines import FCBaseline, LinearAR, RawROIMLP, TrainMean, parcel_mean, persistence
from .controls import find_ground_truth, positive_controls
from .metrics import forecast_metrics, score_rows, subject_split_check
from .report import _jsonable, plot_comparison, plot_forecast, results_table, write_results


def evaluate_run(run_dir, out_dir=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """`brainlm evaluate`: a fine-tuning run's test predictions beside the baselines, all fitted
    on the run's training recordings and scored on exactly its test recordings, with
    subject-level bootstrap CIs, with the training-mean / majority floor as a row. results.md
    ends with the positive-control section (synthetic cohorts: did FC + linear find the planted
    effect; BrainLM beside it), also written as positive_control.json. Writes results.md,
    results.json, positive_control.json and PNG plots."""
    from ..data.store import BrainStore

    run = Path(run_dir)
    try:
        meta = json.loads((run / "finetune.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run}: not a fine-tuning run (finetune.json: {exc})") from None
    missing = {"config", "store", "window"} - set(meta if isinstance(meta, dict) else {})
    if missing or not isinstance(meta.get("config"), dict) or \
            {"task", "target"} - set(meta["config"]):
        raise ConfigError(f"{run / 'finetune.json'}: not a finished fine-tuning run (missing "
                          f"{', '.join(sorted(missing)) or 'config.task/target'})")
    cfg = meta["config"]
    store = BrainStore(meta["store"])
    from ..data.store import store_fingerprint

    if meta.get("store_fingerprint") not in (None, store_fingerprint(meta["store"])):
        raise ConfigError(f"{meta['store']}: the store was written again since {run} was "
                          "fine-tuned on it (its settings, phenotypes or scaler differ): "
                          "fine-tune again, or evaluate on the store the run saw")
    if not len(store.recordings("test")):
        raise ConfigError(f"{meta['store']}: the test split is empty; nothing to evaluate")
    out = Path(out_dir) if out_dir else run / "evaluation"
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise ConfigError(f"--out {out} exists and is not an evaluation (no results.json); "
                          "choose an empty or new folder")
    plots = {}
    try:
        if cfg["task"] == "forecast":
            rows, curves = _forecast_rows(run, store, meta, n_boot, seed)
            plots["forecast"] = plot_forecast(curves, out / "forecast_r2.png")
        else:
            rows = _subject_rows(run, store, meta, n_boot, seed)
    except (KeyError, OSError, ValueError) as exc:  # a run folder edited or cut short
        kind = "a missing entry" if isinstance(exc, KeyError) else type(exc).__name__
        raise ConfigError(f"{run}: the run's outputs cannot be read ({kind}: {exc}); "
                          "fine-tune again into this folder") from None
    control, section = _control(rows, store, cfg)
    paths = write_results(rows, out, notes=section)
    write_bytes_atomic(out / "positive_control.json",
                       (json.dumps(_jsonable(control), indent=2) + "\n").encode())
    paths["positive_control"] = out / "positive_control.json"
    plots["comparison"] = plot_comparison(rows, out / "comparison.png")
    return {"rows": rows, "paths": {**paths, **plots}, "positive_control": control,
            "table": results_table(rows) + "\n" + section}


def _forecast_rows(run: Path, store, meta: dict, n_boot: int, seed: int):
    """The run's forecasts of the test windows beside persistence, parcel means, a linear AR
    model and the training mean -> (rows, {method: R^2 by horizon step})."""
    from ..data.windows import window_batches

    window, horizon = int(meta["window"]), int(meta["horizon"])
    arrays = np.load(run / "forecast.npz", allow_pickle=False)
    y, pred, groups = arrays["test_true"], arrays["test_pred"], arrays["test_subject"]

    def windows(split):
        found = [x.numpy() for x, _ in window_batches(store, store.recordings(split), window,
                                                      window, 64)]
        return np.concatenate(found)

    test_w, train_w = windows("test"), windows("train")
    if test_w.shape[0] != y.shape[0] or not np.allclose(test_w[..., -horizon:], y):
        raise ConfigError(f"{run}: the store's test windows differ from the run's")
    subject_split_check(store.recordings("train")["subject"], groups)
    context = test_w[..., :-horizon]
    ar = LinearAR(order=min(10, window - horizon)).fit(train_w[..., :-horizon],
                                                      train_w[..., -horizon:])
    floor = np.broadcast_to(train_w[..., -horizon:].mean(axis=0), y.shape)
    methods = {"brainlm": pred, "persistence": persistence(context, horizon),
               "parcel_mean": parcel_mean(context, horizon), "linear_ar": ar.predict(context),
               "train_mean": floor}
    rows, curves = [], {}
    for name, p in methods.items():
        rows += score_rows("forecast", "future", name, y, p, groups, n_boot=n_boot, seed=seed)
        curves[name] = forecast_metrics(y, p)["r2_by_horizon"]
    return rows, curves


def _subject_rows(run: Path, store, meta: dict, n_boot: int, seed: int) -> list[dict]:
    """The run's test predictions of a subject variable, then the baselines' on the same
    recordings, one row per (method, metric)."""
    import pandas as pd

    from ..data.windows import prepare_target

    cfg = meta["config"]
    task, target, classes = cfg["task"], cfg["target"], meta["classes"]
    preds = pd.read_parquet(run / "predictions.parquet")
    preds = preds[preds["split"] == "test"].set_index("recording_id")
    train, y_train, _ = prepare_target(store.recordings("train"), target, task, str(run))
    test, y_test, _ = prepare_target(store.recordings("test"), target, task, str(run))
    if set(test["recording_id"]) != set(preds.index):
        raise ConfigError(f"{run}: its test predictions do not cover the store's labelled "
                          "test recordings (was the store rebuilt since?)")
    subject_split_check(train["subject"], test["subject"])
    groups = test["subject"].to_numpy()
    preds = preds.loc[test["recording_id"]]
    if task == "classification":
        y_true = y_test.astype(str)
        model_pred = preds[[f"proba_{c}" for c in classes]].to_numpy()
    else:
        y_true = y_test.astype(np.float64)
        model_pred = preds["y_pred"].to_numpy(np.float64)
    rows = score_rows(task, target, "brainlm", y_true, model_pred, groups, classes=classes,
                      n_boot=n_boot, seed=seed)
    labels = y_train.astype(str) if task == "classification" else y_train.astype(np.float64)
    window = int(meta["window"])
    block = meta.get("patch_size") or next(b for b in (20, 10, 5, 1) if window % b == 0)
    null = TrainMean(task)
    baselines = (("fc_linear", FCBaseline(task, seed=seed)),
                 ("raw_roi_mlp", RawROIMLP(task, seed=seed, block=block, window=window)),
                 (null.name, null))
    xs_train = [np.asarray(store.load(r)) for _, r in train.iterrows()]
    xs_test = [np.asarray(store.load(r)) for _, r in test.iterrows()]
    for name, baseline in baselines:
        try:
            baseline.fit(xs_train, labels, groups=train["subject"].to_numpy())
            if task == "classification":
                order = [list(baseline.classes_).index(c) for c in classes]
                p = baseline.predict_proba(xs_test)[:, order]
            else:
                p = baseline.predict(xs_test)
        except (ValueError, np.linalg.LinAlgError, ConfigError) as exc:  # too few to fit
            warnings.warn(f"{run}: baseline {name} skipped, it cannot be fitted on these "
                          f"{len(xs_train)} training recordings ({exc})", stacklevel=2)
            continue
        rows += score_rows(task, target, name, y_true, p, groups, classes=classes,
                           n_boot=n_boot, seed=seed)
    return rows


def _control(rows: list[dict], store, cfg: dict) -> tuple[dict, str]:
    """The positive control of the run's target (none for forecasting) and its markdown
    section; the control's own row is marked with its verdict and threshold."""
    if cfg["task"] == "forecast":
        control = {"status": "none", "target": "future",
                   "reason": "forecasting has no planted effect, so no positive control"}
        return control, "## Positive control\n\n" + control["reason"] + ".\n"
    found = find_ground_truth(store)
    control, section = positive_controls(rows, cfg["target"], cfg["task"], found and found[0],
                                         str(found[1]) if found else "")
    for r in rows:  # the control's row says so in results.json too
        if control["status"] != "none" and r["method"] == control["method"] and \
                r["metric"] == control["metric"]:
            r.update(positive_control=control["status"], control_threshold=control["threshold"])
    return control, section
