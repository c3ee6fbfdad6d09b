"""Mask ratios on one yardstick: which pretraining ratio gives the better encoder.

Why: each run's own validation R^2 is measured under its own mask ratio, and reconstructing
20 % of a window is an easier task than reconstructing 90 %: those numbers cannot rank the
runs. Every run is therefore also scored at one common ratio with the same masks
(`val_common_*`, see `brainlm.train.pretrain.evaluate`), beside the best baseline under those
masks, each gain with its paired subject-bootstrap 95 % interval and the verdict read from it
(learned / not learned / undecided). This module gathers the runs' metrics into one table and
one plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..fileio import save_figure, write_bytes_atomic

COLUMNS = (("val_r2", "R^2 at own ratio"),
           ("val_r2_gain", "gain over best baseline (own) [95 % CI]"),
           ("val_common_r2", "R^2 at common ratio"),
           ("val_common_r2_gain", "gain over best baseline (common) [95 % CI]"),
           ("test_common_r2", "R^2 at common ratio (test)"),
           ("test_common_r2_gain", "gain (common, test) [95 % CI]"),
           ("probe", "linear probe (test)"), ("probe_floor", "probe: training mean"),
           ("ari_model", "network ARI"), ("ari_flat_input", "ARI flat-input control"))
PROBES = ("probe_r2", "probe_roc_auc")  # one of them, by the probe's task
GAINS = ("val_r2_gain", "val_common_r2_gain", "test_common_r2_gain")  # shown with intervals


def gather(models: dict[float, Path]) -> list[dict]:
    """One row per mask ratio from each model folder's metrics.json."""
    rows = []
    for ratio, folder in sorted(models.items()):
        path = Path(folder) / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the pretraining metrics ({exc})") from None
        row = {"mask_ratio": float(ratio)}
        row.update({k: metrics.get(k) for k, _ in COLUMNS})
        for gain in GAINS:
            prefix = gain[:-len("_r2_gain")]
            row.update({f"{gain}_low": metrics.get(f"{gain}_low"),
                        f"{gain}_high": metrics.get(f"{gain}_high"),
                        f"{prefix}_verdict": metrics.get(f"{prefix}_verdict")})
        probe = next((k for k in PROBES if k in metrics), None)
        if probe:
            row.update(probe=metrics[probe], probe_metric=probe[6:],
                       probe_low=metrics.get(f"{probe}_low"),
                       probe_high=metrics.get(f"{probe}_high"),
                       probe_floor=metrics.get(f"{probe}_floor"),
                       probe_verdict=metrics.get("probe_verdict"))
        row["val_common_r2_best_baseline"] = metrics.get("val_common_r2_best_baseline")
        row["best_baseline"] = metrics.get("val_common_best_baseline")
        rows.append(row)
    return rows


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if key in GAINS and low is not None and high is not None:
        return f"{value:+.4f} [{low:+.4f}, {high:+.4f}]"
    return f"{value:+.4f}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per mask ratio; gains with their 95 % interval over subjects, and the
    verdict on the common mask (validation)."""
    head = ("| mask ratio | " + " | ".join(h for _, h in COLUMNS)
            + " | learned? (val, common mask) |")
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        said = r.get("val_common_verdict") or "n/a"
        lines.append(f"| {r['mask_ratio']:g} | " + " | ".join(_cell(r, k) for k, _ in COLUMNS)
                     + f" | {'**' + said + '**' if said == 'not learned' else said} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratios = [f"{r['mask_ratio']:g}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / 3
    series = [("val_r2", "own ratio"), ("val_common_r2", "common ratio"),
              ("val_common_r2_best_baseline", "best baseline (common)")]
    for i, (key, label) in enumerate(series):
        values = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(x + (i - 1) * width, values, width, label=label,
               color=("C3", "C1", "0.6")[i])
    ax.set_xticks(x, ratios)
    ax.set_xlabel("pretraining mask ratio")
    ax.set_ylabel("validation R$^2$ (masked patches)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Mask ratios on one yardstick", fontsize=10)
    return save_figure(fig, path)


def compare(models: dict[float, Path], out: Path) -> list[dict]:
    """Write mask_ratios.json (rows, also a DVC plot), mask_ratios.md and mask_ratios.png."""
    rows = gather(models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "mask_ratios.json", json.dumps(rows, indent=2).encode())
    write_bytes_atomic(out / "mask_ratios.md", table(rows).encode())
    plot(rows, out / "mask_ratios.png")
    return rows
