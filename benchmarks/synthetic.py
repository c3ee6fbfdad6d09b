"""Time the synthetic cohort generator (and optionally its BIDS writer).

Why: the demo and the tests simulate cohorts on small CI machines; the generator must stay
well under 30 s for 100 recordings x 424 parcels x 500 timepoints on 2 cores.

    python benchmarks/synthetic.py --subjects 100 --parcels 424 --timepoints 500 [--write DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainlm.data.synthetic import signal_statistics, simulate_cohort, write_bids  # noqa: E402


def _atlas_or_coords(n_parcels: int):
    """A424 when reachable without a download (and the size matches), else random coordinates."""
    from brainlm.atlas import find_a424, load_a424

    folder = find_a424(download=False)
    if folder is not None:
        atlas = load_a424(folder)
        if atlas.n_parcels == n_parcels:
            return atlas, atlas.coords, "A424"
    rng = np.random.default_rng(0)
    coords = rng.uniform([-70, -100, -45], [70, 70, 80], size=(n_parcels, 3))
    return None, coords, "random coordinates"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--parcels", type=int, default=424)
    ap.add_argument("--timepoints", type=int, default=500)
    ap.add_argument("--tr", type=float, default=0.735)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    ap.add_argument("--write", metavar="DIR", help="also time write_bids into DIR")
    ap.add_argument("--write-subjects", type=int, default=3)
    ap.add_argument("--voxel-size", type=float, default=4.0)
    args = ap.parse_args(argv)

    print(f"machine: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}"
          f", python {platform.python_version()}, numpy {np.__version__}")
    atlas, coords, source = _atlas_or_coords(args.parcels)
    print(f"coordinates: {source} ({len(coords)} parcels)")

    best = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cohort = simulate_cohort(coords, args.subjects, args.timepoints, tr=args.tr,
                                 seed=args.seed)
        best = min(best, time.perf_counter() - t0)
    n = args.subjects
    print(f"simulate_cohort: {n} x {len(coords)} x {args.timepoints} in {best:.2f} s "
          f"({n / best:.1f} recordings/s)")
    stats = [signal_statistics(x, args.tr) for x in cohort.signals[: min(n, 20)]]
    print("statistics (mean of first {} recordings): ".format(len(stats))
          + ", ".join(f"{k} {np.mean([s[k] for s in stats]):.3f}" for k in stats[0]))

    if args.write:
        if atlas is None:
            print("--write needs the A424 atlas (BRAINLM_ATLAS_DIR); skipped")
            return 0
        k = min(args.write_subjects, n)
        small = simulate_cohort(coords, k, args.timepoints, tr=args.tr, seed=args.seed)
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            paths = write_bids(small, atlas, tmp, tr=args.tr, voxel_size=args.voxel_size)
            dt = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in paths) / 1e6
        print(f"write_bids: {k} subjects at {args.voxel_size} mm in {dt:.2f} s "
              f"({dt / k:.2f} s/subject, {size / k:.1f} MB/subject)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
