"""BrainLM against each baseline, paired over subjects: the differences, their intervals and
the verdicts read from them (comparisons.json, a section of results.md, MLflow values).

Why: two methods' intervals overlapping or not says little about their difference on the same
subjects. Each comparison here is a paired bootstrap (brainlm.evaluate.intervals): the same
resamples of subjects score BrainLM and the baseline, so what they share (which subjects are
easy) cancels. Differences are oriented so that > 0 means BrainLM is better (error metrics are
flipped), and the verdict is `better` when the whole 95 % interval is above 0, `worse` when it
is below 0, `undecided` otherwise. Every split scored gets its comparisons: the registry
chooses on the validation split's; the test split's are reported, never used to choose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fileio import write_bytes_atomic
from .intervals import BETTER, paired_bootstrap
from .metrics import LOWER_IS_BETTER, TASK_METRICS, metric_fn
from .report import _fmt, _jsonable

MODEL = "brainlm"
SPLIT_ORDER = ("test", "val")


def paired_comparisons(task: str, target: str, split: str, y_true, preds: dict, groups, *,
                       classes=None, n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> list[dict]:
    """One entry per (baseline, metric of `task`): BrainLM (`preds["brainlm"]`) minus the
    baseline, paired over the subjects `groups`, oriented so that > 0 = BrainLM better.
    The seed gives the same subject draws as score_rows' intervals with that seed. A
    comparison whose difference is undefined on the full split (either score undefined, e.g.
    the Pearson r of the constant train_mean) is left out."""
    if MODEL not in preds:
        return []
    out = []
    for baseline, pred in preds.items():
        if baseline == MODEL:
            continue
        for metric in TASK_METRICS[task]:
            fn = metric_fn(task, metric, classes)
            lower = metric in LOWER_IS_BETTER
            first, second = (pred, preds[MODEL]) if lower else (preds[MODEL], pred)
            r = paired_bootstrap(fn, y_true, first, second, groups, n_boot=n_boot, seed=seed,
                                 alpha=alpha, words=BETTER)
            if not math.isfinite(r["value"]):  # e.g. Pearson r of a constant floor
                continue
            out.append({"split": split, "task": task, "target": target, "metric": metric,
                        "baseline": baseline, "value": r["value"], "low": r["low"],
                        "high": r["high"], "verdict": r["verdict"],
                        "brainlm": r["b"] if lower else r["a"],
                        "baseline_value": r["a"] if lower else r["b"],
                        "n_subjects": r["n_subjects"], "n_boot": r["n_boot"],
                        "widened": bool(r["widened"]), "higher_is_better": not lower})
    return out


def _ordered(comparisons: list[dict]) -> list[dict]:
    def split_rank(c):
        s = c.get("split", "test")
        return SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER)

    return sorted(comparisons, key=split_rank)  # stable: metric and baseline order kept


def write_comparisons(comparisons: list[dict], out_dir) -> Path:
    """comparisons.json (a list, test entries first; NaN as null), written atomically."""
    path = Path(out_dir) / "comparisons.json"
    data = json.dumps(_jsonable(_ordered(comparisons)), indent=2, allow_nan=False)
    write_bytes_atomic(path, (data + "\n").encode())
    return path


def comparisons_section(comparisons: list[dict]) -> str:
    """The markdown section of results.md: one line per (split, metric, baseline)."""
    head = "## BrainLM against each baseline, paired over subjects\n\n"
    if not comparisons:
        return head + "No baseline could be compared with BrainLM.\n"
    lines = [head + "BrainLM minus the baseline on the same subjects (error metrics flipped: "
             "> 0 always means BrainLM is better), with a 95 % paired bootstrap interval "
             "over subjects (the same resamples for both). Verdict: `better` when the whole "
             "interval is above 0, `worse` when it is below 0, `undecided` otherwise. The "
             "registry chooses on the validation split; the test split is reported, never "
             "used to choose. A difference that is undefined (e.g. Pearson r of a constant "
             "prediction) is not listed.", "",
             "| split | metric | baseline | BrainLM | baseline value | difference | 95 % CI "
             "| verdict | n_subjects |", "|" + "---|" * 9]
    for c in _ordered(comparisons):
        ci = f"[{_fmt(c['low'])}, {_fmt(c['high'])}]" + ("*" if c.get("widened") else "")
        cells = [c["split"], c["metric"], c["baseline"], _fmt(c["brainlm"]),
                 _fmt(c["baseline_value"]), _fmt(c["value"]), ci, c["verdict"],
                 c["n_subjects"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def tracking_values(rows: list[dict], comparisons: list[dict]) -> dict:
    """What the evaluate job logs to MLflow: every row's value (`<method>_<metric>` for test,
    `val_<method>_<metric>` for validation), and every comparison's difference and interval
    as metrics `[val_]vs_<baseline>_<metric>[_low|_high]` and its verdict as the tag
    `verdict.[val_]vs_<baseline>.<metric>`."""
    def prefix(item):
        return "val_" if item.get("split") == "val" else ""

    values = {f"{prefix(r)}{r['method']}_{r['metric']}": r["value"] for r in rows}
    for c in comparisons:
        key = f"{prefix(c)}vs_{c['baseline']}"
        values[f"{key}_{c['metric']}"] = c["value"]
        values[f"{key}_{c['metric']}_low"] = c["low"]
        values[f"{key}_{c['metric']}_high"] = c["high"]
        values[f"verdict.{key}.{c['metric']}"] = c["verdict"]
    return values
