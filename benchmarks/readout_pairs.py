"""Paired subject-bootstrap difference of a readout's score between two fine-tuning runs on
the same store (the "Between encoders" table of benchmarks/README.md).

    python benchmarks/readout_pairs.py BASE_RUN OTHER_RUN [OTHER_RUN ...] [--n-boot 500]

Each run is a `brainlm finetune` folder (regression); both predicted the same validation and
test recordings (`predictions.parquet`), so R^2 of OTHER minus BASE is resampled over the same
subjects (`brainlm.evaluate.intervals.paired_bootstrap`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import pandas as pd
    from sklearn.metrics import r2_score

    from brainlm.evaluate.intervals import paired_bootstrap

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("others", nargs="+")
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args()
    base = pd.read_parquet(Path(args.base) / "predictions.parquet")
    print("| run minus base | split | difference [95 %] | verdict |\n|---|---|---|---|")
    for other in args.others:
        theirs = pd.read_parquet(Path(other) / "predictions.parquet")
        for split in ("val", "test"):
            a = theirs[theirs["split"] == split].sort_values("recording_id")
            b = base[base["split"] == split].sort_values("recording_id")
            if list(a["recording_id"]) != list(b["recording_id"]):
                sys.exit(f"{other} and {args.base} predicted other {split} recordings")
            d = paired_bootstrap(r2_score, a["y_true"].to_numpy(), a["y_pred"].to_numpy(),
                                 b["y_pred"].to_numpy(), a["subject"].to_numpy(),
                                 n_boot=args.n_boot)
            print(f"| {Path(other).name} | {split} | {d['value']:+.3f} [{d['low']:+.3f}, "
                  f"{d['high']:+.3f}] | {d['verdict']} |")


if __name__ == "__main__":
    main()
