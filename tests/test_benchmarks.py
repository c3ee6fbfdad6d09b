"""The benchmark scripts run (CI smoke) and count FLOPs the way the published figures do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_flop_count_matches_the_published_figure():
    sys.path.insert(0, str(BENCH))
    try:
        import pretrain_throughput as pt
    finally:
        sys.path.pop(0)
    from brainlm.model.config import BrainLMConfig

    # anchors.md: ~410 GFLOP per training window at the 13m shape (forward ~136)
    gflop = pt.flops_ours(BrainLMConfig.from_preset("13m")) / 1e9
    assert 400 < gflop < 420


def test_pretrain_throughput_smoke_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "pretrain_throughput.py"), "--device", "cpu",
                          "--profile", "tiny", "--batch", "1", "--steps", "1", "--warmup", "0",
                          "--models", "ours,eager,ours+math+ckpt", "--dtypes", "fp32",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ours") or
            line.startswith("| eager")]
    assert len(rows) == 3 and "failed" not in out.stdout
    assert "not measured in this run" in out.stdout  # no verdict from a CPU smoke


def test_verdict_takes_the_best_bf16_row_of_ours_at_batch_32():
    sys.path.insert(0, str(BENCH))
    try:
        import pretrain_throughput as pt
    finally:
        sys.path.pop(0)

    def row(model, windows, gb, mfu, batch=32, dtype="bf16"):
        return {"model": model, "dtype": dtype, "batch": batch, "windows_s": windows,
                "peak_gb": gb, "mfu": mfu}

    rows = [row("ours", 700, 6.0, 35.0), row("ours+cudnn+compile", 1100, 6.5, 55.0),
            row("ours+compile+b64", 1500, 12.0, 75.0, batch=64), row("eager", 2000, 1, 90)]
    assert "met by ours+cudnn+compile: 1100 windows/s" in pt.verdict(rows, "13m")
    rows[1]["peak_gb"] = 9.0  # too much memory
    assert "NOT met" in pt.verdict(rows, "13m")
    assert "not measured" in pt.verdict(rows, "tiny")


def test_parcellate_benchmark_smoke(tmp_path, atlas_spec):
    out = subprocess.run([sys.executable, str(BENCH / "parcellate.py"), "--timepoints", "6",
                          "--workdir", str(tmp_path), "--atlas", atlas_spec, "--repeats", "1",
                          "--methods", "floor-isal,fast,recording,nilearn-labels"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| recording |" in out.stdout and "fast vs nilearn-labels: median r" in out.stdout


def test_window_loader_smoke(tmp_path):
    from tests.helpers import age_effect_setup

    root = age_effect_setup(tmp_path, 8, 80, 10)
    out = subprocess.run([sys.executable, str(BENCH / "window_loader.py"), "--store",
                          str(root / "store"), "--window", "40", "--batch", "4", "--workers",
                          "0", "--windows", "16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "windows/s"
            not in line]
    assert len(rows) == 2 and all(float(r.split("|")[-2]) > 0 for r in rows)


def test_control_sweep_smoke(atlas_spec):
    """benchmarks/control_sweep.py reads the demo's design from params.yaml and prints one row
    per seed with the interval and the verdict, then the count of passes."""
    sys.path.insert(0, str(BENCH))
    try:
        import control_sweep
    finally:
        sys.path.pop(0)
    design = control_sweep.demo_design()
    assert design["subjects"] >= 40 and len(design["split"]) == 3
    out = subprocess.run([sys.executable, str(BENCH / "control_sweep.py"), "--atlas",
                          atlas_spec, "--seeds", "0", "--subjects", "16", "--timepoints", "100",
                          "--n-boot", "20"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 0 (demo) |")]
    assert len(rows) == 1 and "[" in rows[0]
    assert "passed: age" in out.stdout and "issue 21's bar" in out.stdout
