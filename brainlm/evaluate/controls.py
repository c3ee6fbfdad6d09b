"""Positive controls: did the evaluation find an effect that is known to be there?

On a brainlm synthetic cohort the generator plants effects (age, sex) at a strength FC +
linear must recover. A failed control means the data or the pipeline is broken and no model
score can be trusted, so the control judges the pipeline, not the model; BrainLM's score is
reported beside it. Other data has no ground truth and so no control.

The decision reads the 95 % subject-bootstrap interval, not the point alone (`decide`, one
rule for the evaluation report and for `synthetic_control_scores`): PASSED when the point
reaches the threshold the cohort promises AND the interval's lower bound is above chance
(R^2 0, ROC-AUC 0.5); FAILED when even the interval's upper bound is below the threshold;
UNDETERMINED otherwise (too few test subjects to tell, or the metric undefined).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .baselines import FCBaseline, TrainMean
from .metrics import bootstrap_ci, metric_fn
from .report import _fmt

# What a model with no information scores on each control metric: the interval's lower bound
# must clear it for a control to pass (a control may state its own "chance").
CHANCE = {"r2": 0.0, "pearson_r": 0.0, "roc_auc": 0.5}


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def decide(value, low, high, threshold: float, chance: float) -> tuple[str, str]:
    """The control's verdict from its point estimate and 95 % interval: (status, why).

    "passed": value >= threshold and low > chance (the effect is found at the promised
    strength, and the test subjects are enough to tell it from no effect);
    "failed": high < threshold (even the interval's top is short of the promised strength);
    "undetermined": anything else (the interval reaches below chance or straddles the
    threshold), or the metric is undefined (e.g. ROC-AUC with one class among the subjects)."""
    if not _finite(value):
        return "undetermined", "the metric is undefined on this test split"
    value = float(value)
    low = float(low) if _finite(low) else math.nan
    high = float(high) if _finite(high) else math.nan
    if value >= threshold and low > chance:
        return "passed", (f"{_fmt(value)} >= {threshold:g} and the 95 % interval's lower bound "
                          f"{_fmt(low)} is above chance ({chance:g})")
    if high < threshold:
        return "failed", (f"even the 95 % interval's upper bound {_fmt(high)} is below "
                          f"{threshold:g}")
    if math.isnan(low):
        return "undetermined", "no interval could be computed (too few test subjects)"
    if value >= threshold:
        return "undetermined", (f"{_fmt(value)} >= {threshold:g}, but the 95 % interval "
                                f"[{_fmt(low)}, {_fmt(high)}] reaches chance ({chance:g}): too "
                                "few test subjects to tell the effect from none")
    return "undetermined", (f"{_fmt(value)} < {threshold:g}, but the 95 % interval "
                            f"[{_fmt(low)}, {_fmt(high)}] reaches {threshold:g}: too few test "
                            "subjects to tell")


def _chance(control: dict) -> float:
    return float(control.get("chance", CHANCE.get(control["metric"], 0.0)))


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


def _declared(target: str, task: str, truth: dict | None) -> tuple[dict | None, dict | None]:
    """(the control for `target`, or None) and, when there is none, the summary saying why."""
    from ..data.synthetic import POSITIVE_CONTROLS

    if truth is None:
        return None, {"status": "none", "target": target,
                      "reason": "not a brainlm synthetic cohort (no ground_truth.json naming "
                                "its subjects): no planted effect, so no positive control"}
    declared = (truth.get("effects") or {}).get("positive_controls")
    controls = POSITIVE_CONTROLS if declared is None else declared
    control = controls.get(target)
    if not control or control.get("task") != task:
        return None, {"status": "none", "target": target,
                      "reason": f"synthetic cohort, but no positive control is declared for "
                                f"{target!r} ({task}); controls: "
                                + ", ".join(f"{k} ({v['metric']} >= {v['threshold']:g})"
                                            for k, v in controls.items() if v)}
    return control, None


def positive_controls(rows: list[dict], target: str, task: str, truth: dict | None,
                      where: str = "") -> tuple[dict, str]:
    """Whether the planted effect for `target` was found: FC + linear on the TEST split (rows
    whose "split" is "test" or absent; validation rows are never read) must reach the
    threshold the synthetic cohort promises (age R^2 >= 0.5, sex ROC-AUC >= 0.8;
    brainlm.data.synthetic.POSITIVE_CONTROLS, as stated in its ground_truth.json) with a 95 %
    interval above chance, as `decide` rules. BrainLM's score on the same metric is reported
    beside it, whatever it is; the control judges the pipeline and the data (a failed control
    means the evaluation cannot be trusted), not the model. Returns (a JSON-able summary, a
    markdown section)."""
    head = "## Positive control\n\n"
    control, none = _declared(target, task, truth)
    if control is None:
        return none, head + none["reason"] + ".\n"
    metric, threshold, method = control["metric"], float(control["threshold"]), control["method"]
    chance = _chance(control)
    test = [r for r in rows if r.get("split", "test") == "test"]

    def row(m):
        return next((r for r in test if r["method"] == m and r["metric"] == metric), None)

    base, model = row(method), row("brainlm")
    status, why = decide(None if base is None else base["value"],
                         None if base is None else base.get("low"),
                         None if base is None else base.get("high"), threshold, chance)

    def ci(r):
        return None if r is None else {k: r.get(k) for k in ("value", "low", "high")}

    summary = {"status": status, "why": why, "target": target, "metric": metric,
               "threshold": threshold, "chance": chance, "method": method,
               "baseline": ci(base), "brainlm": ci(model),
               "n_subjects": None if base is None else base.get("n_subjects"),
               "ground_truth": where}
    lines = [head.rstrip("\n"), "",
             f"Planted effect: {target} (ground truth: {where or 'ground_truth.json'}). "
             f"Control: {method} on the test split reaches {metric} >= {threshold:g} with a "
             f"95 % subject-bootstrap interval above chance ({chance:g}). PASSED when both "
             f"hold; FAILED when even the interval's upper bound is below {threshold:g}; "
             "UNDETERMINED otherwise (too few test subjects to tell, or the metric undefined).",
             "", "| method | metric | value | 95 % CI | threshold | control |",
             "|---|---|---|---|---|---|"]
    for name, r, mark in ((method, base, status.upper()), ("brainlm", model,
                                                           "reported beside it")):
        if r is not None:
            lines.append(f"| {name} | {metric} | {_fmt(r['value'])} | [{_fmt(r.get('low'))}, "
                         f"{_fmt(r.get('high'))}] | {threshold:g} | {mark} |")
    lines += ["", f"The control {status.upper()}: {why}."]
    if status == "failed":
        lines[-1] += (f" {method} did not find an effect the cohort plants at this strength; "
                      "check the data and the pipeline before reading any model score.")
    elif status == "undetermined":
        lines[-1] += " The control neither vouches for the pipeline nor condemns it."
    return summary, "\n".join(lines) + "\n"


def _control_scores(target: str, train: tuple, test: tuple, n_boot: int, seed: int) -> dict:
    """FCBaseline and the floor fitted on `train` and scored on `test` (each (recordings
    [P, T], targets, subjects)) for POSITIVE_CONTROLS[target]: the point, the 95 % interval
    over test subjects and the verdict by `decide`."""
    from ..data.synthetic import POSITIVE_CONTROLS

    c = POSITIVE_CONTROLS[target]
    regression = c["task"] == "regression"
    cast = (lambda y: np.asarray(y, dtype=np.float64)) if regression else \
        (lambda y: np.asarray(y).astype(str))
    (x_tr, y_tr, g_tr), (x_te, y_te, g_te) = train, test
    y_tr, y_te = cast(y_tr), cast(y_te)
    found = []
    for model in (FCBaseline(c["task"]), TrainMean(c["task"])):
        model.fit(list(x_tr), y_tr, groups=np.asarray(g_tr))
        pred = model.predict(list(x_te)) if regression else model.predict_proba(list(x_te))
        score = metric_fn(c["task"], c["metric"], getattr(model, "classes_", None))
        found.append(bootstrap_ci(score, y_te, pred, np.asarray(g_te), n_boot=n_boot,
                                  seed=seed) if not found else {"value": score(y_te, pred)})
    ci, chance = found[0], _chance(c)
    status, why = decide(ci["value"], ci["low"], ci["high"], c["threshold"], chance)
    return {"value": ci["value"], "low": ci["low"], "high": ci["high"],
            "width": ci["high"] - ci["low"], "floor": found[1]["value"], "metric": c["metric"],
            "threshold": c["threshold"], "chance": chance, "status": status, "why": why,
            "passed": status == "passed", "n_train": len(set(g_tr)), "n_test": len(set(g_te))}


def synthetic_control_scores(cohort, fractions=(0.6, 0.2, 0.2), split_seed: int = 0,
                             targets=("age", "sex"), n_boot: int = 1000,
                             seed: int = 0) -> dict:
    """The positive controls computed straight from a SyntheticCohort as the pipeline would:
    percent signal change after linear detrending, subject split (assign_splits), robust
    scaling fitted on the training subjects, FCBaseline fitted on train and scored on test
    (plus the train-mean / majority floor), the 95 % interval from `n_boot` bootstrap
    resamples of the test subjects, and the verdict by `decide` (the evaluation's rule).
    {target: {"value", "low", "high", "width", "floor", "metric", "threshold", "chance",
    "status", "why", "passed", "n_train", "n_test"}}; used by the tests and benchmarks/."""
    from scipy import signal as sps

    from ..data.scale import RobustScaler
    from ..data.split import assign_splits

    raw = cohort.signals.astype(np.float64)
    x = 100.0 * sps.detrend(raw, axis=2) / raw.mean(axis=2, keepdims=True)
    ph = cohort.participants
    ids = np.asarray(ph["participant_id"].astype(str))
    split = assign_splits(list(ids), fractions, seed=split_seed)
    side = np.array([split[i] for i in ids])
    tr, te = np.flatnonzero(side == "train"), np.flatnonzero(side == "test")
    scaler = RobustScaler.fit([x[i] for i in tr])
    xs = [scaler.transform(xi) for xi in x]

    def part(rows, target):
        return [xs[i] for i in rows], ph[target].to_numpy()[rows], ids[rows]

    return {t: _control_scores(t, part(tr, t), part(te, t), n_boot, seed) for t in targets}


def store_control_scores(store, targets=("age", "sex"), n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """The same controls on a processed store (what `brainlm preprocess` wrote from the
    NIfTI or tables): its scaled training and test recordings, its split. Same keys as
    synthetic_control_scores; used by benchmarks/control_sweep.py --pipeline."""
    rows = {s: store.recordings(s) for s in ("train", "test")}

    def part(split, target):
        r = rows[split]
        return ([np.asarray(store.load(row)) for _, row in r.iterrows()],
                r[target].to_numpy(), r["subject"].astype(str).to_numpy())

    return {t: _control_scores(t, part("train", t), part("test", t), n_boot, seed)
            for t in targets}
