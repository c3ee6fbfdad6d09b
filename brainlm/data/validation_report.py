"""A self-contained HTML page of a store validation (validation.html beside validation.json).

Great Expectations' Data Docs index needs a CDN to list anything and shows pass/fail without
the measured values. This page is plain HTML with inline CSS (no scripts, fonts or remote
links): a summary on top, then one table per suite with every expectation, the column it
checks, its bounds, what GX measured (observed value, or element / unexpected counts with a
few unexpected values and the rows they sit in) and, for per-row checks, the spread
(min / median / max) of the values checked, so medians and IQRs sit next to their tolerances.
The measured values come from GX's result dicts; only the spread is read from the summary
table GX was given. A section before the suites shows the shift of the validation and test
splits from the training distribution (bounds, observed medians and IQRs, the parcels beyond);
the training split's median and IQR are shown as what they are, the scaler's self-check.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

EXAMPLES = 5  # unexpected values shown per expectation

COLUMNS = {  # what each summary-table column means, for readers of the page
    "median": "per-parcel median, in training scaler units (training IQRs from the training "
              "median)",
    "iqr": "per-parcel IQR, in training scaler units (a ratio to the training IQR)",
    "n_nonfinite": "non-finite values per parcel and split",
    "max_abs": "max |scaled value| per parcel and split",
    "n_parcels": "parcels per recording",
    "n_timepoints": "time points per recording",
    "recording_id": "recording id",
    "n_recordings": "recordings per split",
    "n_splits": "splits per subject",
}

SUITE_TITLES = {  # what a suite is evidence of, beside its name
    "scaler_self_check": "scaler self-check on the training split: holds by construction, "
                         "not evidence about the data",
    "shift": "shift of the validation and test splits from the training distribution",
}
SHOWN_PARCELS = 40  # parcel labels listed per split and statistic in the shift section

_HIDDEN_KWARGS = {"batch_id", "column", "row_condition", "result_format", "min_value",
                  "max_value", "strict_min", "strict_max", "condition_parser", "mostly"}

_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eee}
.pass{color:#155724;background:#d4edda;font-weight:bold}
.fail{color:#721c24;background:#f8d7da;font-weight:bold}
.note{color:#555;max-width:60em}
code{font-size:90%}
"""


def fmt(value) -> str:
    """A number as the page prints it (4 significant digits for floats), anything else as str."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return str(v) if math.isnan(v) or math.isinf(v) else f"{v:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return "—" if value is None else str(value)


def _condition(cond) -> str:
    if not cond:
        return ""
    if isinstance(cond, dict) and cond.get("operator") and "column" in cond:
        return f"{cond['column'].get('name')} {cond['operator']} {fmt(cond.get('parameter'))}"
    return str(cond)


def bounds(kwargs: dict) -> str:
    """The bounds of an expectation in words: 'a ≤ x ≤ b', '≥ a', '= v', other kwargs as k=v."""
    parts = []
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    le_lo = "<" if kwargs.get("strict_min") else "≤"
    le_hi = "<" if kwargs.get("strict_max") else "≤"
    if lo is not None and hi is not None:
        parts.append(f"= {fmt(lo)}" if lo == hi and le_lo == le_hi == "≤"
                     else f"{fmt(lo)} {le_lo} x {le_hi} {fmt(hi)}")
    elif lo is not None:
        parts.append(f"x {'>' if le_lo == '<' else '≥'} {fmt(lo)}")
    elif hi is not None:
        parts.append(f"x {le_hi} {fmt(hi)}")
    if "value" in kwargs:
        parts.append(f"= {fmt(kwargs['value'])}")
    parts += [f"{k} = {fmt(v)}" for k, v in kwargs.items()
              if k not in _HIDDEN_KWARGS and k != "value"]
    if kwargs.get("mostly") not in (None, 1, 1.0):
        parts.append(f"for at least {fmt(100 * kwargs['mostly'])}% of rows")
    cond = _condition(kwargs.get("row_condition"))
    if cond:
        parts.append(f"where {cond}")
    return "; ".join(parts)


def measured(result: dict, column: str | None = None) -> str:
    """What GX reported: the observed value, or counts and a few unexpected values and rows."""
    if "observed_value" in result:
        return f"observed: {fmt(result['observed_value'])}"
    if "element_count" not in result:
        return fmt(result) if result else "(no result)"
    lines = [f"rows checked: {fmt(result['element_count'])}"]
    if result.get("missing_count"):
        lines.append(f"missing: {fmt(result['missing_count'])}")
    lines.append(f"unexpected: {fmt(result.get('unexpected_count'))} "
                 f"({fmt(result.get('unexpected_percent') or 0.0)}%)")
    rows = result.get("partial_unexpected_index_list") or []
    if rows and isinstance(rows[0], dict):
        shown = []
        for row in rows[:EXAMPLES]:
            where = ", ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != column)
            shown.append(f"{fmt(row.get(column))} ({where})" if column in row else where)
        lines.append("e.g. " + "; ".join(shown))
    elif result.get("partial_unexpected_list"):
        lines.append("e.g. " + fmt(result["partial_unexpected_list"][:EXAMPLES]))
    return "\n".join(lines)


def spread(table, kwargs: dict) -> str:
    """min / median / max of the numeric column an expectation checks, over the rows it
    checked (its row condition applied), read from the summary table GX validated."""
    column = kwargs.get("column")
    if table is None or column not in getattr(table, "columns", ()):
        return ""
    cond = kwargs.get("row_condition")
    rows = table
    if cond:
        if not (isinstance(cond, dict) and cond.get("operator") == "=="
                and cond.get("column", {}).get("name") in table.columns):
            return ""
        rows = table[table[cond["column"]["name"]] == cond.get("parameter")]
    try:
        values = rows[column].astype(float).to_numpy()
    except (TypeError, ValueError):
        return ""
    values = values[np.isfinite(values)]
    if not len(values):
        return "no finite values"
    lo, mid, hi = np.min(values), np.median(values), np.max(values)
    return f"min {fmt(lo)} / median {fmt(mid)} / max {fmt(hi)} (n = {len(values)})"


def _cell(text: str, cls: str = "") -> str:
    body = html.escape(text).replace("\n", "<br>")
    return f'<td class="{cls}">{body}</td>' if cls else f"<td>{body}</td>"


def _suite_table(name: str, results: list, table) -> str:
    head = ("<tr><th>expectation</th><th>column</th><th>bounds</th><th>measured by GX</th>"
            "<th>spread of checked values</th><th>result</th></tr>")
    rows = []
    for r in results:
        kwargs = r.get("kwargs") or {}
        column = kwargs.get("column")
        col_text = f"{column}: {COLUMNS[column]}" if column in COLUMNS else (column or "(table)")
        meas = measured(r.get("result") or {}, column)
        exc = r.get("exception") or {}
        if exc.get("raised_exception"):
            meas += f"\nerror: {exc.get('exception_message')}"
        ok = bool(r.get("success"))
        bound = bounds(kwargs) or ("every value unique" if "unique" in r.get("type", "")
                                   else "—")
        rows.append("<tr>" + _cell(r.get("type", "")) + _cell(col_text) + _cell(bound)
                    + _cell(meas) + _cell(spread(table, kwargs))
                    + _cell("PASS" if ok else "FAIL", "pass" if ok else "fail") + "</tr>")
    passed = all(r.get("success") for r in results)
    status = "passed" if passed else "FAILED"
    title = f" ({SUITE_TITLES[name]})" if name in SUITE_TITLES else ""
    notes = dict.fromkeys(str(r["notes"]) for r in results if r.get("notes"))
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>\n' for n in notes)
    return (f'<h2 id="suite-{html.escape(name)}">suite {html.escape(name)}{html.escape(title)}: '
            f'<span class="{"pass" if passed else "fail"}">{status}</span></h2>\n'
            f"{notes_html}<table>{head}\n" + "\n".join(rows) + "</table>")


def _parcel_list(labels: list) -> str:
    shown = ", ".join(str(p) for p in labels[:SHOWN_PARCELS])
    more = len(labels) - SHOWN_PARCELS
    return shown + (f" and {more} more" if more > 0 else "") if labels else "none"


def _shift_bounds(entry: dict, column: str, z) -> str:
    """A shift bound and where it came from: the stated tolerance, or z standard errors."""
    e = entry.get(column) or {}
    lo, hi = e.get("bounds") or (None, None)
    text = f"{fmt(lo)} ≤ x ≤ {fmt(hi)}"
    se = entry.get("se_median" if column == "median" else "se_log_iqr")
    unit = "" if column == "median" else " of log IQR"
    if e.get("widened_by_sampling"):
        return text + (f"\nwidened to {fmt(z)} SE{unit} (SE {fmt(se)}: "
                       f"{fmt(entry.get('n_subjects'))} subjects against "
                       f"{fmt(entry.get('n_train_subjects'))} training subjects)")
    return text + ("\nthe stated tolerance" + (f" ({fmt(z)} SE{unit} = {fmt(z * se)} is less)"
                                              if se is not None and z is not None else ""))


def shift_section(shift: dict | None) -> str:
    """Per held-out split and statistic: bounds, the spread of the parcel values (training
    scaler units), how many parcels lie beyond and which, and the split's result."""
    if not shift:
        return ""
    pct = 100 * float(shift.get("max_fraction_beyond", 0.0))
    z = (shift.get("tolerances") or {}).get("z")
    head = ("<tr><th>split</th><th>subjects / recordings</th><th>statistic</th><th>bounds</th>"
            "<th>observed over parcels</th><th>parcels beyond</th><th>result</th></tr>")
    rows = []
    for split, entry in (shift.get("splits") or {}).items():
        ok = bool(entry.get("success"))
        for column in ("median", "iqr"):
            e = entry.get(column) or {}
            beyond = (f"{fmt(e.get('n_beyond'))} of {fmt(entry.get('n_parcels'))} "
                      f"({fmt(100 * (e.get('fraction_beyond') or 0.0))}%): "
                      + _parcel_list(e.get("parcels_beyond") or []))
            rows.append("<tr>" + _cell(split) + _cell(
                f"{fmt(entry.get('n_subjects'))} / {fmt(entry.get('n_recordings'))}")
                + _cell(column) + _cell(_shift_bounds(entry, column, z))
                + _cell(f"min {fmt(e.get('min'))} / median {fmt(e.get('median'))} / "
                        f"max {fmt(e.get('max'))}") + _cell(beyond)
                + _cell("PASS" if ok else "FAIL", "pass" if ok else "fail") + "</tr>")
    return ('<h2 id="shift">Shift from the training distribution</h2>\n'
            f'<p class="note">{html.escape(shift.get("what", ""))}. A split fails when more '
            f"than {fmt(pct)}% of its parcels lie beyond a bound (the median's or the IQR's). "
            "Each bound is the stated tolerance, widened where the training subjects' own "
            f"spread says a split of that many subjects varies more (to {fmt(z)} standard "
            "errors). The training split's own median and IQR are the scaler's self-check: "
            "the scaler was fitted on them, so they hold by construction.</p>\n"
            f"<table>{head}\n" + "\n".join(rows) + "</table>")


def render(info: dict, suites: dict, tables: dict | None = None) -> str:
    """The page as a string. `info`: store, n_parcels, success, thresholds (dict), data_docs
    (relative path or ''), shift (validate.shift_summary's dict, optional); `suites`: name -> list of {type, kwargs, success, result, exception}
    dicts taken from GX's validation results; `tables`: name -> the DataFrame GX validated."""
    tables = tables or {}
    ok = bool(info.get("success"))
    summary = [("store", info.get("store")), ("parcels in the store", info.get("n_parcels")),
               ("overall", "all expectations passed" if ok else "FAILED")]
    summary += [(f"threshold {k}", v) for k, v in (info.get("thresholds") or {}).items()]
    summary += [(f"suite {n}" + (f" ({SUITE_TITLES[n]})" if n in SUITE_TITLES else ""),
                 "passed" if all(r.get("success") for r in rs) else "FAILED")
                for n, rs in suites.items()]
    top = "\n".join(
        "<tr><th>" + html.escape(k) + "</th>"
        + _cell(fmt(v), ("pass" if ok else "fail") if k == "overall" else "") + "</tr>"
        for k, v in summary)
    docs = info.get("data_docs")
    link = (f'<p>Great Expectations Data Docs: <a href="{html.escape(docs, quote=True)}">'
            f"{html.escape(docs)}</a></p>") if docs else ""
    body = shift_section(info.get("shift")) + "\n" + "\n".join(
        _suite_table(n, rs, tables.get(n)) for n, rs in suites.items())
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>brainlm store validation</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>Store validation</h1>\n"
            f"<table>{top}</table>\n{link}\n{body}\n</body></html>\n")


def write_report(path, info: dict, suites: dict, tables: dict | None = None) -> Path:
    """Render the page and write it atomically to `path`; returns the path."""
    from ..fileio import write_bytes_atomic

    path = Path(path)
    write_bytes_atomic(path, render(info, suites, tables).encode("utf-8"))
    return path
