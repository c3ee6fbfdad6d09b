"""Training windows per second from a processed store: can the loader feed the GPU?

    python benchmarks/window_loader.py [--store processed] [--workers 0,2] [--batch 32]

Times the same path `brainlm pretrain` uses (WindowDataset in random mode, a DataLoader with
the given workers, collated batches) over the store's training split. The store of `make demo`
(`processed/`, 424 parcels) is the default. The issue's target needs 1,000 windows/s.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="processed")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--windows", type=int, default=2048, help="windows to time per row")
    args = parser.parse_args()

    from torch.utils.data import DataLoader

    from brainlm.data.store import BrainStore, WindowDataset

    store = BrainStore(args.store)
    n_rec = len(store.recordings("train"))
    ds = WindowDataset(store, "train", window=args.window, mode="random",
                       windows_per_recording=max(1, -(-args.windows // n_rec)), seed=0)
    print(f"store {args.store}: {store.n_parcels} parcels, {n_rec} training recordings; "
          f"{platform.machine()}, {len(ds)} windows of {args.window} per row")
    print("\n| loader | windows/s |")
    print("|---|---|")
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    print(f"| WindowDataset items, one process | {len(ds) / (time.perf_counter() - t0):.0f} |")
    for workers in (int(w) for w in args.workers.split(",")):
        loader = DataLoader(ds, batch_size=args.batch, num_workers=workers, drop_last=True)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["signal"])
        print(f"| DataLoader, batch {args.batch}, {workers} workers | "
              f"{n / (time.perf_counter() - t0):.0f} |")


if __name__ == "__main__":
    main()
