"""How long `brainlm --help` and a job's `--help` take (the command line imports no job module,
torch or pandas until a command needs them). Median of N fresh processes.

    python benchmarks/cli_startup.py [N]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

BRAINLM = Path(sys.executable).parent / "brainlm"
CASES = [["--help"], ["pretrain", "--help"], ["preprocess", "--help"], ["stage", "--help"]]


def wall(argv: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([str(BRAINLM), *argv], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    python = statistics.median(
        [_t([sys.executable, "-c", "pass"]) for _ in range(n)])
    print(f"| command | median wall time (s), {n} runs |\n|---|---|")
    print(f"| python -c pass (the floor) | {python:.3f} |")
    for argv in CASES:
        print(f"| brainlm {' '.join(argv)} | {wall(argv, n):.3f} |")


def _t(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
