"""Job `pretrain`: masked-autoencoder pretraining at one mask ratio (the pipeline runs one per
value of params.yaml's `mask_ratios`), scored against the reconstruction baselines."""

from __future__ import annotations

import os
from pathlib import Path

from ..train.config import MASK_STRATEGIES, PRECISIONS, PROBE_TASKS, PretrainConfig
from .options import Option

NAME = "pretrain"
METRICS = "pretrain-{item:g}"
Config = PretrainConfig
OPTIONS = [
    Option("data", help="store folder (brainlm preprocess --out)"),
    Option("out", help="output: a save_pretrained folder"),
    Option("profile", help="model size: tiny, 13m, 111m or 650m"),
    Option("mask_ratio", low=0.0, high=1.0),
    Option("mask_strategy", choices=MASK_STRATEGIES),
    Option("future_patches", positive=True),
    Option("max_steps", positive=True),
    Option("batch_size", help="global batch", positive=True),
    Option("grad_accum", positive=True),
    Option("base_lr", "--lr", "base learning rate (scaled by batch/256); default per profile",
           positive=True),
    Option("min_lr_ratio", help="cosine schedule floor, a fraction of lr", low=0.0, high=1.0),
    Option("warmup_steps", help="default 5 %% of max_steps", low=0),
    Option("weight_decay", low=0.0),
    Option("clip_grad", positive=True),
    Option("window", positive=True),
    Option("patch_size", positive=True),
    Option("windows_per_recording", positive=True),
    Option("eval_every", positive=True),
    Option("eval_windows", help="validation windows scored", positive=True),
    Option("ckpt_every", positive=True),
    Option("workers", help="DataLoader workers", low=0),
    Option("seed", low=0),
    Option("resume", help="continue from out/checkpoints/last.pt"),
    Option("stop_after", help="leave after this many steps (resume later with --resume)",
           positive=True),
    Option("compile", help="torch.compile the model"),
    Option("attention_kernel", help="pin PyTorch's attention kernel (model.attention."
           "SDPA_KERNELS; default: PyTorch picks)"),
    Option("grad_checkpointing"),
    Option("probe_target", help="a phenotype: score the finished encoder by a linear probe "
           "of it"),
    Option("probe_task", choices=PROBE_TASKS),
    Option("networks_truth", help="network per parcel (ground_truth.json or a table): "
           "zero-shot ARI"),
    Option("precision", choices=PRECISIONS, help="auto: bf16 autocast on CUDA, fp32 on CPU"),
    Option("device"),
    Option("progress", "--no-progress"),
]
NOT_OPTIONS = {"model": "BrainLMConfig fields over the profile's preset (Python API; the "
                        "presets carry the recipe)"}


def from_params(params: dict, root: Path, mask_ratio) -> PretrainConfig:
    from . import block
    from .options import from_block

    return from_block(PretrainConfig, OPTIONS, block(params, NAME), NAME, fixed={
        "data": root / "processed", "out": root / "models" / f"pretrain-{mask_ratio:g}",
        "mask_ratio": float(mask_ratio), "progress": False, **yardstick(params, root)})


def yardstick(params: dict, root: Path) -> dict:
    """The encoder checks every pipeline run gets: a probe of the fine-tuning target, and the
    networks of a synthetic cohort when its ground truth is there (it is part of data/, which
    processed/ is made from, so the stage's dependency on processed/ covers it)."""
    ft = params.get("finetune") or {}
    out = {}
    if ft.get("task") in ("regression", "classification") and ft.get("target"):
        out.update(probe_target=ft["target"], probe_task=ft["task"])
    truth = root / "data" / "ground_truth.json"
    if truth.is_file():
        out["networks_truth"] = truth
    return out


def run(cfg: PretrainConfig, tags: dict | None = None) -> dict:
    from ..train.pretrain import pretrain
    from ..tracking import job_run

    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun: one run, kept by rank 0
    name = f"{cfg.profile}-mask{cfg.mask_ratio:g}"  # e.g. demo-tiny-mask0.75 from a stage
    if (tags or {}).get("brainlm.profile"):
        name = f"{tags['brainlm.profile']}-{name}"
    with job_run(NAME, name, cfg, tags,
                 enabled=rank0) as tracker:
        result = pretrain(cfg, tracker)
        if result.get("metrics"):  # the model this run made: the registry finds the run by it
            from ..registry import FINGERPRINT, pretrained_fingerprint

            tracker.tags({FINGERPRINT: pretrained_fingerprint(cfg.out)})
    m = result.get("metrics")
    if m and rank0:
        words = {"learned": "beats every baseline", "not learned": "HAS NOT LEARNED YET"}.get(
            result["verdicts"].get("val_verdict"), "UNDECIDED: the interval holds 0")
        print(f"brainlm pretrain: {result['step']} steps, val MSE {m['val_mse']:.4f}, "
              f"val R^2 {m['val_r2']:.4f}, best baseline {m['val_r2_best_baseline']:.4f} "
              f"(gain {m['val_r2_gain']:+.4f} [{m['val_r2_gain_low']:+.4f}, "
              f"{m['val_r2_gain_high']:+.4f}]: {words}) -> {cfg.out}")
    elif not m and result["step"] < cfg.max_steps and rank0:
        print(f"brainlm pretrain: stopped at step {result['step']} of {cfg.max_steps}; "
              f"continue with --resume")
    # the verdicts (learned / not learned / undecided) beside the numbers in the stage's metrics
    return {"mask_ratio": float(cfg.mask_ratio), **(m or {}), **result.get("verdicts", {})}
