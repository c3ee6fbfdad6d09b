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
                          "--models", "ours,eager", "--dtypes", "fp32", "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ours") or
            line.startswith("| eager")]
    assert len(rows) == 2 and "failed" not in out.stdout


def test_parcellate_benchmark_smoke(tmp_path, atlas_spec):
    out = subprocess.run([sys.executable, str(BENCH / "parcellate.py"), "--timepoints", "6",
                          "--workdir", str(tmp_path), "--atlas", atlas_spec, "--repeats", "1",
                          "--methods", "floor-isal,fast,recording,nilearn-labels"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| recording |" in out.stdout and "fast vs nilearn-labels: median r" in out.stdout
