"""Positive controls: did the evaluation find an effect that is known to be there?

On a brainlm synthetic cohort the generator plants effects (age, sex) at a strength FC +
linear must recover. A failed control means the data or the pipeline is broken and no model
score can be trusted, so the control judges the pipeline, not the model; BrainLM's score is
reported beside it. Other data has no ground truth and so no control.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .baselines import FCBaseline, TrainMean
from .metrics import classification_metrics, regression_metrics
from .report import _fmt


def find_ground_truth(store) -> tuple[dict, Path] | None:
    """The synthetic generator's ground_truth.json behind a store, or None for other data.

    Looked for in the folders above the recordings' source paths (as written at preprocess
    time, relative to the working directory or to the store's parent); it counts only if it
    names every subject of the store, so an unrelated file cannot switch the controls on."""
    m = store.manifest
    subjects = set(m.loc[m["status"] == "ok", "subject"].astype(str))
    paths = m.loc[m["status"] == "ok", "source_path"].dropna().astype(str).unique()[:3]
    tried = set()
    for source in paths:
        for base in (Path.cwd(), Path(store.path).resolve().parent):
            for folder in (base / source).parents:
                candidate = folder / "ground_truth.json"
                if candidate in tried:
                    continue
                tried.add(candidate)
                try:
                    truth = json.loads(candidate.read_text())
                    named = {str(r["participant_id"]) for r in truth.get("subjects", [])}
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if subjects and subjects <= named and "effects" in truth:
                    return truth, candidate
    return None


def positive_controls(rows: list[dict], target: str, task: str, truth: dict | None,
                      where: str = "") -> tuple[dict, str]:
    """Whether the planted effect for `target` was found: FC + linear on the test split must
    reach the threshold the synthetic cohort promises (age R^2 >= 0.5, sex ROC-AUC >= 0.8;
    brainlm.data.synthetic.POSITIVE_CONTROLS, as stated in its ground_truth.json). BrainLM's
    score on the same metric is reported beside it, whatever it is; the control judges the
    pipeline and the data (a failed control means the evaluation cannot be trusted), not the
    model. Returns (a JSON-able summary, a markdown section)."""
    from ..data.synthetic import POSITIVE_CONTROLS

    head = "## Positive control\n\n"
    if truth is None:
        summary = {"status": "none", "target": target,
                   "reason": "not a brainlm synthetic cohort (no ground_truth.json naming its "
                             "subjects): no planted effect, so no positive control"}
        return summary, head + summary["reason"] + ".\n"
    declared = (truth.get("effects") or {}).get("positive_controls")
    controls = POSITIVE_CONTROLS if declared is None else declared
    control = controls.get(target)
    if not control or control.get("task") != task:
        summary = {"status": "none", "target": target,
                   "reason": f"synthetic cohort, but no positive control is declared for "
                             f"{target!r} ({task}); controls: "
                             + ", ".join(f"{k} ({v['metric']} >= {v['threshold']:g})"
                                         for k, v in controls.items() if v)}
        return summary, head + summary["reason"] + ".\n"
    metric, threshold, method = control["metric"], float(control["threshold"]), control["method"]

    def row(m):
        return next((r for r in rows if r["method"] == m and r["metric"] == metric), None)

    base, model = row(method), row("brainlm")
    value = None if base is None else base["value"]
    if value is None or not np.isfinite(value):
        status = "undetermined"  # e.g. ROC-AUC with one class among the test subjects
    else:
        status = "passed" if value >= threshold else "failed"

    def ci(r):
        return None if r is None else {k: r.get(k) for k in ("value", "low", "high")}

    summary = {"status": status, "target": target, "metric": metric, "threshold": threshold,
               "method": method, "baseline": ci(base), "brainlm": ci(model),
               "n_subjects": None if base is None else base.get("n_subjects"),
               "ground_truth": where}
    verdict = {"passed": "PASSED", "failed": "FAILED",
               "undetermined": "UNDETERMINED (metric undefined on this test split)"}[status]
    lines = [head.rstrip("\n"), "",
             f"Planted effect: {target} (ground truth: {where or 'ground_truth.json'}). "
             f"Control: {method} on the test split reaches {metric} >= {threshold:g}.", "",
             "| method | metric | value | 95 % CI | threshold | control |",
             "|---|---|---|---|---|---|"]
    for name, r, mark in ((method, base, verdict), ("brainlm", model, "reported beside it")):
        if r is not None:
            lines.append(f"| {name} | {metric} | {_fmt(r['value'])} | [{_fmt(r.get('low'))}, "
                         f"{_fmt(r.get('high'))}] | {threshold:g} | {mark} |")
    if status == "failed":
        lines += ["", f"The control FAILED: {method} did not find an effect the cohort plants "
                      "at this strength; check the data and the pipeline before reading any "
                      "model score."]
    return summary, "\n".join(lines) + "\n"


def synthetic_control_scores(cohort, fractions=(0.6, 0.2, 0.2), split_seed: int = 0,
                             targets=("age", "sex")) -> dict:
    """The positive controls computed straight from a SyntheticCohort as the pipeline would:
    percent signal change after linear detrending, subject split (assign_splits), robust
    scaling fitted on the training subjects, FCBaseline fitted on train and scored on test
    (plus the train-mean / majority floor). {target: {"value", "floor", "threshold",
    "passed", "n_train", "n_test"}}; used by the tests and benchmarks/synthetic_realism.py."""
    from scipy import signal as sps

    from ..data.scale import RobustScaler
    from ..data.split import assign_splits
    from ..data.synthetic import POSITIVE_CONTROLS

    raw = cohort.signals.astype(np.float64)
    x = 100.0 * sps.detrend(raw, axis=2) / raw.mean(axis=2, keepdims=True)
    ph = cohort.participants
    ids = ph["participant_id"].astype(str).tolist()
    split = assign_splits(ids, fractions, seed=split_seed)
    side = np.array([split[i] for i in ids])
    tr, te = np.flatnonzero(side == "train"), np.flatnonzero(side == "test")
    scaler = RobustScaler.fit([x[i] for i in tr])
    xs = [scaler.transform(xi) for xi in x]
    groups = np.asarray(ids)
    out = {}
    for target in targets:
        c = POSITIVE_CONTROLS[target]
        y = ph[target].to_numpy()
        y = y.astype(np.float64) if c["task"] == "regression" else y.astype(str)
        scores = []
        for model in (FCBaseline(c["task"]), TrainMean(c["task"])):
            model.fit([xs[i] for i in tr], y[tr], groups=groups[tr])
            test = [xs[i] for i in te]
            if c["task"] == "regression":
                scores.append(regression_metrics(y[te], model.predict(test))[c["metric"]])
            else:
                scores.append(classification_metrics(y[te], model.predict_proba(test),
                                                     model.classes_)[c["metric"]])
        out[target] = {"value": scores[0], "floor": scores[1], "metric": c["metric"],
                       "threshold": c["threshold"],
                       "passed": bool(np.isfinite(scores[0]) and scores[0] >= c["threshold"]),
                       "n_train": len(tr), "n_test": len(te)}
    return out

