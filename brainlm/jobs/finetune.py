"""Job `finetune`: a pretrained encoder fine-tuned on a phenotype (probe or full) or on
forecasting, on the store's subject-level splits."""

from __future__ import annotations

from pathlib import Path

from ..train.config import MODES, POOLINGS, TASKS, FinetuneConfig
from .options import Option

NAME = "finetune"
Config = FinetuneConfig
OPTIONS = [
    Option("model", help="pretrained folder (ours or released ViTMAE)"),
    Option("data", help="store folder"),
    Option("out"),
    Option("target", help="phenotype column (participants.tsv)"),
    Option("task", choices=TASKS),
    Option("mode", choices=MODES, help="probe: frozen encoder; full: all layers"),
    Option("pooling", choices=POOLINGS),
    Option("epochs", positive=True),
    Option("batch_size", positive=True),
    Option("lr", positive=True),
    Option("weight_decay", low=0.0),
    Option("layer_decay", positive=True, high=1.0),
    Option("head_dropout", low=0.0, high=0.99),
    Option("patience", positive=True),
    Option("horizon", help="forecast: timepoints", positive=True),
    Option("windows_per_recording", positive=True),
    Option("window", help="window of released ViTMAE weights (default 200)", positive=True),
    Option("seed", low=0),
    Option("device"),
    Option("progress", "--no-progress"),
]
# tune's base configuration: the same options, less those the search itself sets
BASE_OPTIONS = [o for o in OPTIONS if o.path not in ("seed", "progress")]
NOT_OPTIONS: dict = {}


def from_params(params: dict, root: Path, out: str = "finetune") -> FinetuneConfig:
    from . import block, shared
    from .options import from_block

    ratio = shared(params, "finetune_mask_ratio")
    return from_block(FinetuneConfig, OPTIONS, block(params, NAME), NAME, fixed={
        "model": root / "models" / f"pretrain-{ratio:g}", "data": root / "processed",
        "out": root / "runs" / out, "progress": False})


def run_name(cfg: FinetuneConfig) -> str:
    return "-".join(str(v) for v in (cfg.task, cfg.target, cfg.mode) if v)


def run(cfg: FinetuneConfig, tags: dict | None = None) -> dict:
    from ..tracking import job_run
    from ..train.finetune import finetune

    with job_run(NAME, run_name(cfg), cfg, tags) as tracker:
        meta = finetune(cfg, on_epoch=lambda epoch, loss: tracker.metrics(
            {"val_loss": float(loss)}, step=epoch))
        values = {"best_val_loss": meta["best_val_loss"], "epochs_run": meta["epochs_run"]}
        tracker.summary(values)
        from ..registry import FINGERPRINT, finetuned_fingerprint

        tracker.tags({FINGERPRINT: finetuned_fingerprint(cfg.out)})
    print(f"brainlm finetune: {cfg.task} {cfg.target or ''} ({cfg.mode}), "
          f"{meta['epochs_run']} epochs, best val loss {meta['best_val_loss']:.4f} -> {cfg.out}")
    return values
