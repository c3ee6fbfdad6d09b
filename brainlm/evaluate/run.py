"""`brainlm evaluate`: a fine-tuning run scored beside its baselines on the validation and test
splits, BrainLM against each baseline paired over subjects, and the positive control.

The run's own predictions are only comparable to baselines fitted on exactly its training
recordings and scored on exactly its validation and test recordings, so everything here is
rebuilt from the run's store and checked against what the run wrote (a rebuilt store is
refused, not scored). Every method is fitted on the training split only; both held-out splits
are scored: the registry chooses on validation, the test split is reported, never used to
choose.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import write_bytes_atomic
from .baselines import FCBaseline, RawROIMLP, TangentBaseline, TrainMean
from .comparisons import comparisons_section, paired_comparisons, write_comparisons
from .controls import find_ground_truth, positive_controls
from .forecasting import LinearAR, parcel_mean, persistence
from .metrics import forecast_metrics, score_rows, subject_split_check
from .report import _jsonable, plot_comparison, plot_forecast, report_text, write_results


def _open_run(run_dir):
    """(run folder, finetune.json, its store), checked: a finished run on an unchanged store
    with a test split."""
    from ..data.store import BrainStore, store_fingerprint

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
    store = BrainStore(meta["store"])
    if meta.get("store_fingerprint") not in (None, store_fingerprint(meta["store"])):
        raise ConfigError(f"{meta['store']}: the store was written again since {run} was "
                          "fine-tuned on it (its settings, phenotypes or scaler differ): "
                          "fine-tune again, or evaluate on the store the run saw")
    if not len(store.recordings("test")):
        raise ConfigError(f"{meta['store']}: the test split is empty; nothing to evaluate")
    return run, meta, store


def evaluate_run(run_dir, out_dir=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """`brainlm evaluate`: a fine-tuning run's validation and test predictions beside the
    baselines, all fitted on the run's training recordings only, with subject-level bootstrap
    CIs and the training-mean / majority floor as a row; BrainLM minus each baseline as a
    paired bootstrap over subjects with its verdict (comparisons.json). results.md: the test
    table, a validation table, the comparisons, then the positive control (synthetic cohorts:
    did FC + linear find the planted effect on the test split; BrainLM beside it), also
    written as positive_control.json. Writes results.md, results.json (rows with "split"),
    comparisons.json, positive_control.json and PNG plots (of the test split)."""
    run, meta, store = _open_run(run_dir)
    cfg = meta["config"]
    out = Path(out_dir) if out_dir else run / "evaluation"
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise ConfigError(f"--out {out} exists and is not an evaluation (no results.json); "
                          "choose an empty or new folder")
    plots = {}
    try:
        if cfg["task"] == "forecast":
            scored = _forecast_predictions(run, store, meta)
            plots["forecast"] = plot_forecast(
                {m: forecast_metrics(scored[0]["y"], p)["r2_by_horizon"]
                 for m, p in scored[0]["preds"].items()}, out / "forecast_r2.png")
        else:
            scored = _subject_predictions(run, store, meta, seed)
    except (KeyError, OSError, ValueError) as exc:  # a run folder edited or cut short
        kind = "a missing entry" if isinstance(exc, KeyError) else type(exc).__name__
        raise ConfigError(f"{run}: the run's outputs cannot be read ({kind}: {exc}); "
                          "fine-tune again into this folder") from None
    rows, comparisons = _scores(scored, n_boot, seed)
    control, section = _control(rows, store, cfg)
    notes = comparisons_section(comparisons) + "\n" + section
    paths = write_results(rows, out, notes=notes)
    paths["comparisons"] = write_comparisons(comparisons, out)
    write_bytes_atomic(out / "positive_control.json",
                       (json.dumps(_jsonable(control), indent=2) + "\n").encode())
    paths["positive_control"] = out / "positive_control.json"
    plots["comparison"] = plot_comparison(rows, out / "comparison.png")
    return {"rows": rows, "comparisons": comparisons, "paths": {**paths, **plots},
            "positive_control": control, "table": report_text(rows, notes)}


def _scores(scored: list[dict], n_boot: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Every method's rows (one per metric, with its split and, for a baseline, the penalty
    inner CV chose) and BrainLM's paired comparisons with each baseline, per split."""
    rows, comparisons = [], []
    for s in scored:
        for name, pred in s["preds"].items():
            rows += [{**r, "split": s["split"], **s["extra"].get(name, {})}
                     for r in score_rows(s["task"], s["target"], name, s["y"], pred,
                                         s["groups"], classes=s["classes"], n_boot=n_boot,
                                         seed=seed)]
        comparisons += paired_comparisons(s["task"], s["target"], s["split"], s["y"],
                                          s["preds"], s["groups"], classes=s["classes"],
                                          n_boot=n_boot, seed=seed)
    return rows, comparisons


def _splits(found: set, run: Path, what: str) -> list[str]:
    """The held-out splits to score: test, and validation when the run predicted it (a run
    without validation predictions is scored on test only, with a warning: the registry,
    which chooses on validation, cannot use it)."""
    if "test" not in found:
        raise ConfigError(f"{run}: {what} holds no test predictions; fine-tune again into this "
                          "folder")
    if "val" not in found:
        warnings.warn(f"{run}: {what} holds no validation predictions, so only the test split "
                      "is scored (the registry chooses on validation: fine-tune again)",
                      stacklevel=3)
        return ["test"]
    return ["test", "val"]


def _forecast_predictions(run: Path, store, meta: dict) -> list[dict]:
    """The run's forecasts of the validation and test windows beside persistence, parcel
    means, a linear AR model and the training mean (fitted on the training windows)."""
    from ..data.windows import window_batches

    window, horizon = int(meta["window"]), int(meta["horizon"])
    arrays = np.load(run / "forecast.npz", allow_pickle=False)

    def windows(split):
        found = [x.numpy() for x, _ in window_batches(store, store.recordings(split), window,
                                                      window, 64)]
        return np.concatenate(found)

    train_w = windows("train")
    ar = LinearAR(order=min(10, window - horizon)).fit(train_w[..., :-horizon],
                                                      train_w[..., -horizon:])
    floor = train_w[..., -horizon:].mean(axis=0)
    scored = []
    for split in _splits({f.split("_")[0] for f in arrays.files}, run, "forecast.npz"):
        y, pred, groups = (arrays[f"{split}_{k}"] for k in ("true", "pred", "subject"))
        held = windows(split)
        if held.shape[0] != y.shape[0] or not np.allclose(held[..., -horizon:], y):
            raise ConfigError(f"{run}: the store's {split} windows differ from the run's")
        subject_split_check(store.recordings("train")["subject"], groups)
        context = held[..., :-horizon]
        preds = {"brainlm": pred, "persistence": persistence(context, horizon),
                 "parcel_mean": parcel_mean(context, horizon),
                 "linear_ar": ar.predict(context),
                 "train_mean": np.broadcast_to(floor, y.shape)}
        scored.append({"split": split, "task": "forecast", "target": "future",
                       "classes": None, "y": y, "groups": groups, "preds": preds, "extra": {}})
    return scored


def _held_out(run: Path, store, preds, target: str, task: str, classes, train) -> list[dict]:
    """BrainLM's predictions of each labelled held-out split (test, then validation), checked
    to cover exactly the store's recordings of that split."""
    from ..data.windows import prepare_target

    scored = []
    for split in _splits(set(preds["split"]), run, "predictions.parquet"):
        rows, y, _ = prepare_target(store.recordings(split), target, task, str(run))
        p = preds[preds["split"] == split].set_index("recording_id")
        if set(rows["recording_id"]) != set(p.index):
            raise ConfigError(f"{run}: its {split} predictions do not cover the store's "
                              f"labelled {split} recordings (was the store rebuilt since?)")
        subject_split_check(train["subject"], rows["subject"])
        p = p.loc[rows["recording_id"]]
        model = (p[[f"proba_{c}" for c in classes]].to_numpy() if task == "classification"
                 else p["y_pred"].to_numpy(np.float64))
        y = y.astype(str) if task == "classification" else y.astype(np.float64)
        scored.append({"split": split, "task": task, "target": target, "classes": classes,
                       "y": y, "groups": rows["subject"].to_numpy(), "rows": rows,
                       "preds": {"brainlm": model}, "extra": {}})
    return scored


def _subject_predictions(run: Path, store, meta: dict, seed: int) -> list[dict]:
    """The run's predictions of a subject variable on the validation and test splits, then
    the baselines', fitted on the training recordings and predicted on the same held-out
    recordings; a baseline that cannot be fitted is skipped with a warning."""
    import pandas as pd

    from ..data.windows import prepare_target

    cfg = meta["config"]
    task, target, classes = cfg["task"], cfg["target"], meta["classes"]
    train, y_train, _ = prepare_target(store.recordings("train"), target, task, str(run))
    scored = _held_out(run, store, pd.read_parquet(run / "predictions.parquet"), target, task,
                       classes, train)
    labels = y_train.astype(str) if task == "classification" else y_train.astype(np.float64)
    window = int(meta["window"])
    block = meta.get("patch_size") or next(b for b in (20, 10, 5, 1) if window % b == 0)
    null = TrainMean(task)
    baselines = (FCBaseline(task, seed=seed), TangentBaseline(task, seed=seed),
                 RawROIMLP(task, seed=seed, block=block, window=window), null)
    xs_train = [np.asarray(store.load(r)) for _, r in train.iterrows()]
    held = [[np.asarray(store.load(r)) for _, r in s["rows"].iterrows()] for s in scored]
    for baseline in baselines:
        try:
            baseline.fit(xs_train, labels, groups=train["subject"].to_numpy())
            preds = [_baseline_output(baseline, xs, task, classes) for xs in held]
        except (ValueError, np.linalg.LinAlgError, ConfigError) as exc:  # too few to fit
            warnings.warn(f"{run}: baseline {baseline.name} skipped, it cannot be fitted on "
                          f"these {len(xs_train)} training recordings ({exc})", stacklevel=2)
            continue
        for s, p in zip(scored, preds):
            s["preds"][baseline.name] = p
            s["extra"][baseline.name] = getattr(baseline, "penalty_", None) or {}
    return scored


def _baseline_output(baseline, xs, task: str, classes):
    """Values, or class probabilities in the run's class order."""
    if task != "classification":
        return baseline.predict(xs)
    order = [list(baseline.classes_).index(c) for c in classes]
    return baseline.predict_proba(xs)[:, order]


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
    for r in rows:  # the control's (test) row says so in results.json too
        if control["status"] != "none" and r["method"] == control["method"] and \
                r["metric"] == control["metric"] and r.get("split", "test") == "test":
            r.update(positive_control=control["status"], control_threshold=control["threshold"])
    return control, section
