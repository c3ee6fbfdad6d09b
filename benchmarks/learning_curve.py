"""Learning curves: validation R^2 and the gain over the best baseline, against steps and wall
time, for pretraining recipes on a processed store.

    python benchmarks/learning_curve.py [--store processed] [--configs demo,wide@60,...]
        [--steps 300] [--eval-every 50] [--mask-ratio 0.75] [--window 100] [--budget 30]
        [--out FILE.json] [--keep DIR]

Each configuration is a named set of `PretrainConfig` fields (and `model` fields over the
profile's preset) that `brainlm pretrain` runs; the runs go through the real training loop
(`brainlm.train.pretrain.pretrain`), evaluated on the store's validation split beside the
baselines of `brainlm.train.reconstruction`, with the same windows and masks. Wall time is
measured by running the steps in chunks of --eval-every with `--resume` (exactly the
uninterrupted run) and includes the evaluations. `--list` prints the configurations.
`NAME@STEPS` runs a configuration for its own number of steps (one cosine schedule over them):
how levers are compared at equal wall-clock. The yardstick is the common one every run shares
(`val_common_*`: random masks at 0.75 from a fixed seed), whatever mask sampler trained the
model. `--keep DIR` keeps each finished model folder (for the readouts of `brainlm finetune`).

The recipe was chosen on the validation split of the demo store; the README reports it there
and on the test split only as a check (`--split test`), never to choose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> PretrainConfig fields (model: BrainLMConfig fields). "demo" is params.yaml's recipe.
UPSTREAM = {"coord_frequencies": 0, "time_attention_bias": False, "space_attention_rank": 0,
            "decoder_cross_attention": False}  # Family A as upstream built it
CONFIGS = {
    "before": dict(profile="tiny", batch_size=8, base_lr=8e-3, model=UPSTREAM),
    "lr": dict(profile="tiny", batch_size=8, model=UPSTREAM),
    "lr+time": dict(profile="tiny", batch_size=8,
                    model={**UPSTREAM, "time_attention_bias": True}),
    "lr+time+cross": dict(profile="tiny", batch_size=8,
                          model={**UPSTREAM, "time_attention_bias": True,
                                 "decoder_cross_attention": True}),
    "demo": dict(profile="tiny", batch_size=8),  # + Fourier coordinates and the space bias
    "demo-lr/2": dict(profile="tiny", batch_size=8, base_lr=0.096),
    "demo-b16": dict(profile="tiny", batch_size=16),
    "demo-b32": dict(profile="tiny", batch_size=32),  # brainlm pretrain's default batch
    # the decoder starts from the space-time rung (fitted on training windows) and learns
    # its residual
    "prior": dict(profile="tiny", batch_size=8, model={"linear_prior": True}),
    # levers against the linear ceiling (issue 22), each on the demo recipe alone
    "wide": dict(profile="tiny", batch_size=8,
                 model={"hidden_size": 128, "intermediate_size": 256,
                        "decoder_hidden_size": 128, "decoder_intermediate_size": 256}),
    "deep": dict(profile="tiny", batch_size=8, model={"num_hidden_layers": 4}),
    "factorised": dict(profile="tiny", batch_size=8, model={"attention_layout": "factorised"}),
    "factorised-deep": dict(profile="tiny", batch_size=8,
                            model={"attention_layout": "factorised", "num_hidden_layers": 4}),
    "norm-loss": dict(profile="tiny", batch_size=8, model={"norm_patch_loss": True}),
    "mask-time": dict(profile="tiny", batch_size=8, mask_strategy="time"),
    "mask-space": dict(profile="tiny", batch_size=8, mask_strategy="space"),
    "latent": dict(profile="tiny", batch_size=8, model={"latent_loss_weight": 1.0}),
}


def run_curve(name: str, store: Path, steps: int, every: int, ratio: float, seed: int,
              work: Path, window: int = 200) -> list[dict]:
    from brainlm.train.pretrain import PretrainConfig, pretrain

    name, _, own = name.partition("@")
    steps = int(own) if own else steps
    fields = dict(CONFIGS[name])
    out = work / f"{name}@{steps}"
    rows, wall = [], 0.0
    for done in range(every, steps + every, every):
        cfg = PretrainConfig(data=store, out=out, mask_ratio=ratio, max_steps=steps,
                             eval_every=every, ckpt_every=every, stop_after=every, resume=True,
                             workers=0, seed=seed, progress=False, windows_per_recording=4,
                             window=window, **fields)
        t0 = time.perf_counter()
        result = pretrain(cfg)
        wall += time.perf_counter() - t0
        last = result["history"][-1]
        row = {"config": name, "steps": steps, "step": last["step"], "wall_s": round(wall, 1),
               "loss": last["loss"]}
        row.update({k: v for k, v in last.items() if k.startswith("val_")})
        rows.append(row)
        print(f"{name:>10} step {row['step']:>5} {row['wall_s']:>7.1f}s loss {row['loss']:.4f} "
              f"val_common_r2 {row.get('val_common_r2', float('nan')):+.4f} gain "
              f"{row.get('val_common_r2_gain', float('nan')):+.4f} (best rung "
              f"{row.get('val_common_r2_best_baseline', float('nan')):.4f})", flush=True)
        if done >= steps:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="processed")
    parser.add_argument("--configs", default="before,lr,lr+time,demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--window", type=int, default=100, help="timepoints (the demo's 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=30.0, help="minutes; no config starts after")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--keep", default=None, help="folder to keep the finished models in")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for k, v in CONFIGS.items():
            print(f"{k}: {v}")
        return
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # curves are not experiments to track
    import torch

    print(f"store {args.store}, mask {args.mask_ratio:g}, window {args.window}, {args.steps} steps; "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    t0, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            if name.partition("@")[0] not in CONFIGS:
                sys.exit(f"unknown config {name!r} (have: {', '.join(CONFIGS)})")
            if (time.perf_counter() - t0) / 60 > args.budget:
                print(f"budget of {args.budget:g} min spent: {name} not run")
                continue
            rows += run_curve(name, Path(args.store), args.steps, args.eval_every,
                              args.mask_ratio, args.seed, Path(args.keep or tmp), args.window)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    nan = float("nan")
    print("\n| config | step | wall s | val R^2 (common) | best rung | gain [95 %] |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['step']} | {r['wall_s']} | {r.get('val_common_r2', nan):.4f} "
              f"| {r.get('val_common_r2_best_baseline', nan):.4f} "
              f"| {r.get('val_common_r2_gain', nan):+.4f} [{r.get('val_common_r2_gain_low', nan):+.4f}, "
              f"{r.get('val_common_r2_gain_high', nan):+.4f}] |")


if __name__ == "__main__":
    main()
