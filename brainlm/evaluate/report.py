"""Reports of scored rows: the markdown table, results.json and the PNG plots.

The plots live with the tables because both order and mark rows the same way (the model(s)
first, baselines apart) and a report is only useful if the figure and the table agree. Files
are written atomically so a crash never leaves a truncated report; JSON has null for NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_path, write_bytes_atomic
from .metrics import BASELINE_METHODS, NULL_METHODS


def _is_baseline(row) -> bool:
    return bool(row.get("baseline", row["method"] in BASELINE_METHODS))


def _split_rank(row) -> int:
    """Test rows (and rows without a split) first, then validation rows."""
    return 0 if row.get("split", "test") == "test" else 1


def _ordered(rows: list[dict]) -> list[dict]:
    """Rows by split (test first), then grouped by (task, target, metric) in first-seen order;
    inside a group the model(s) first, then baselines, each in the order given."""
    rows = [dict(r) for r in rows]
    groups, methods = {}, {}
    for r in rows:
        groups.setdefault((r["task"], r["target"], r["metric"]), len(groups))
        methods.setdefault(r["method"], len(methods))
    return sorted(rows, key=lambda r: (_split_rank(r),
                                       groups[(r["task"], r["target"], r["metric"])],
                                       _is_baseline(r), methods[r["method"]]))


def _fmt(v) -> str:
    return "n/a" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"


def _ci(r) -> str:
    return f"[{_fmt(r.get('low'))}, {_fmt(r.get('high'))}]" + ("*" if r.get("widened") else "")


def results_table(rows: list[dict], compact: bool = False) -> str:
    """Markdown table, one line per (task, target, metric, method), the CI as `[low, high]`
    (marked * where it was widened to include the point estimate; a method marked "penalty
    at grid edge" where inner CV chose an edge of the baseline's penalty grid). A row is a baseline when its method is in
    BASELINE_METHODS or it has "baseline": True. `compact`: method, metric, value, CI only."""
    head = (["method", "metric", "value", "95 % CI"] if compact else
            ["task", "target", "method", "metric", "value", "95 % CI", "n_subjects"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _ordered(rows):
        method = r["method"] + (" (penalty at grid edge)" if r.get("penalty_at_edge") else "")
        cells = ([method, r["metric"], _fmt(r["value"]), _ci(r)] if compact else
                 [r["task"], r["target"], method, r["metric"], _fmt(r["value"]), _ci(r),
                  str(r.get("n_subjects", ""))])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def report_text(rows: list[dict], notes: str = "") -> str:
    """results.md: the test rows' table (rows without a split count as test), then a smaller
    validation table when there are validation rows, then `notes` (further sections)."""
    test = [r for r in rows if _split_rank(r) == 0]
    val = [r for r in rows if _split_rank(r) == 1]
    text = results_table(test or rows)
    if test and val:
        n = max((int(r.get("n_subjects") or 0) for r in val), default=0)
        text += ("\n## Validation split\n\nThe same methods, fitted on the training split "
                 f"only, on the {n} validation subjects: what the registry chooses on (the "
                 "test split above is reported, never used to choose).\n\n"
                 + results_table(val, compact=True))
    return text + (("\n" + notes.rstrip("\n") + "\n") if notes else "")


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


def write_results(rows: list[dict], out_dir, name: str = "results", notes: str = "") -> dict:
    """Write `<name>.md` (report_text: the test table, the validation table when there are
    validation rows, then `notes`: further markdown sections) and `<name>.json` (all rows,
    each with its "split" where given, NaN as null), each atomically so a crash never leaves
    a truncated report. Returns {"markdown", "json"}."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / f"{name}.md", "json": out_dir / f"{name}.json"}
    write_bytes_atomic(paths["markdown"], report_text(rows, notes).encode())
    data = json.dumps(_jsonable(_ordered(rows)), indent=2, allow_nan=False)
    write_bytes_atomic(paths["json"], (data + "\n").encode())
    return paths


def _save_png(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _axis_limits(metric: str, group: list[dict]) -> tuple[float, float]:
    """x-axis range of one panel: every value and CI, except that a score far worse than the
    floor does not set the scale (R^2-like metrics stop at -1; an error metric at 3x the
    train-mean/majority row or, without one, 3x the median): such bars are drawn to the
    edge and labelled with their value, so one bad baseline cannot flatten the others."""
    vals = [float(v) for r in group for v in (r["value"], r.get("low"), r.get("high"))
            if v is not None and np.isfinite(float(v))]
    if not vals:
        return -1.0, 1.0
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    if metric in ("r2", "pearson_r"):
        lo = max(lo, -1.0)
        hi = min(max(hi, 0.1), 1.0)
    elif metric in ("mae", "mse"):
        floor = [float(r["value"]) for r in group if r["method"] in NULL_METHODS
                 and np.isfinite(float(r["value"]))]
        ref = floor[0] if floor else float(np.median([v for v in vals if v >= 0] or [1.0]))
        hi = min(hi, 3.0 * ref) if ref > 0 else hi
    pad = 0.05 * (hi - lo or 1.0)
    return lo - (pad if lo < 0 else 0.0), hi + pad


def plot_comparison(rows: list[dict], path) -> Path:
    """One PNG of the test split (rows without a split count as test): a panel per (task,
    target, metric), a horizontal bar per method with its CI as error bar; model bars are
    coloured apart from baselines so the comparison reads at once."""
    from matplotlib.figure import Figure

    rows = [r for r in _ordered(rows) if _split_rank(r) == 0]  # the test split
    if not rows:
        raise ConfigError("plot_comparison: no test rows to plot")
    panels: dict = {}
    for r in rows:
        panels.setdefault((r["task"], r["target"], r["metric"]), []).append(r)
    fig = Figure(figsize=(7, sum(1 + 0.4 * len(v) for v in panels.values())))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, ((task, target, metric), group) in zip(axes, panels.items()):
        y = np.arange(len(group))[::-1]
        vals = np.array([float(r["value"]) for r in group])

        def err(r, key, sign):
            v = r.get(key)
            return 0.0 if v is None or not np.isfinite(v) else max(0.0, sign * (v - r["value"]))

        xerr = np.array([[err(r, "low", -1) for r in group], [err(r, "high", 1) for r in group]])
        colors = ["tab:gray" if _is_baseline(r) else "tab:blue" for r in group]
        lo_lim, hi_lim = _axis_limits(metric, group)
        shown = np.clip(np.nan_to_num(vals), lo_lim, hi_lim)
        xerr = np.where(np.isclose(shown, np.nan_to_num(vals)), xerr, 0.0)
        ax.barh(y, shown, xerr=xerr, color=colors, capsize=3)
        for yi, v, sh in zip(y, vals, shown):
            if np.isfinite(v) and not np.isclose(v, sh):  # off the axis: say where it went
                ax.text(sh, yi, f" {v:.3g} (off scale) ", va="center",
                        ha="left" if sh <= lo_lim else "right", fontsize=7)
        ax.set_xlim(lo_lim, hi_lim)
        ax.set_yticks(y, [r["method"] for r in group])
        ax.set_title(f"{task} / {target}: {metric}", fontsize=9)
        ax.axvline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_forecast(r2_by_horizon: dict[str, list], path) -> Path:
    """R^2 against forecast step, one line per method: where the model's skill decays
    relative to persistence / AR is the interesting part."""
    from matplotlib.figure import Figure

    if not r2_by_horizon:
        raise ConfigError("plot_forecast: no methods to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method, values in r2_by_horizon.items():
        values = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=method)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("forecast step")
    ax.set_ylabel("R$^2$ (mean over parcels)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)

