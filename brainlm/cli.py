"""`brainlm` command line. Only argparse at import time: `brainlm --help` must stay instant."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _fractions(text: str) -> tuple:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not three comma-separated numbers") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' needs three values: train,val,test")
    return parts


def _finetune_options(p) -> None:
    """Options of `finetune`, shared by `tune` (its base configuration)."""
    p.add_argument("--model", required=True, help="pretrained folder (ours or released ViTMAE)")
    p.add_argument("--data", required=True, help="store folder")
    p.add_argument("--out", required=True)
    p.add_argument("--target", default=None, help="phenotype column (participants.tsv)")
    p.add_argument("--task", default="regression",
                   choices=("regression", "classification", "forecast"))
    p.add_argument("--mode", default="probe", choices=("probe", "full"))
    p.add_argument("--pooling", default="cls", choices=("cls", "mean"))
    p.add_argument("--epochs", type=_positive_int, default=30)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=_positive_float, default=0.75)
    p.add_argument("--head-dropout", type=float, default=0.0)
    p.add_argument("--patience", type=_positive_int, default=5)
    p.add_argument("--horizon", type=_positive_int, default=20, help="forecast: timepoints")
    p.add_argument("--windows-per-recording", type=_positive_int, default=4)
    p.add_argument("--window", type=_positive_int, default=None,
                   help="window of released ViTMAE weights (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainlm", description="BrainLM: fMRI foundation models, from recordings to "
        "validated, scaled parcel time series and beyond.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic BIDS dataset (network-structured BOLD)",
                       description="Synthetic fMRI with known networks and phenotype effects.")
    p.add_argument("--out", required=True, help="output folder (BIDS-like)")
    p.add_argument("--subjects", type=_positive_int, default=20)
    p.add_argument("--timepoints", type=_positive_int, default=400)
    p.add_argument("--tr", type=_positive_float, default=0.735, help="seconds (default 0.735)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atlas", default="A424", help="A424 (default) or a label NIfTI path")
    p.add_argument("--voxel-size", type=_positive_float, default=4.0,
                   help="grid of the written images in mm (the atlas grid or a multiple of it)")

    p = sub.add_parser("preprocess", help="parcellate, split by subject, scale and store",
                       description="Recordings (4-D NIfTI or parcellated tables) -> a store of "
                       "scaled [parcels, time] arrays with manifest.parquet and the scaler.")
    p.add_argument("--input", required=True, nargs="+", help="folder(s) or files")
    p.add_argument("--out", required=True, help="store folder")
    p.add_argument("--atlas", default="A424", help="A424 (default) or a label NIfTI path")
    p.add_argument("--tr", type=_positive_float, default=0.735,
                   help="target TR in seconds: every recording is resampled to it")
    p.add_argument("--input-tr", type=_positive_float, default=None,
                   help="override the TR of the inputs (else header or JSON sidecar)")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel processes")
    p.add_argument("--window", type=_positive_int, default=200,
                   help="model window; shorter recordings are quarantined")
    p.add_argument("--engine", choices=("fast", "nilearn"), default="fast")
    p.add_argument("--standardize", choices=("psc", "zscore", "none"), default="psc")
    p.add_argument("--no-detrend", action="store_true")
    p.add_argument("--high-pass", type=_positive_float, default=None, help="Hz")
    p.add_argument("--low-pass", type=_positive_float, default=None, help="Hz")
    p.add_argument("--confounds", default="", help="comma-separated columns of fMRIPrep's "
                   "*_desc-confounds_timeseries.tsv to regress out")
    p.add_argument("--participants", default=None, help="phenotype table (default: "
                   "participants.tsv in the input folder)")
    p.add_argument("--coords", default=None, help="parcel coordinates (x y z per row) for "
                   "already-parcellated tables")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                   help="train,val,test fractions of subjects (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scaler", default=None, help="apply this scaler.safetensors (from an "
                   "earlier store) instead of fitting one: for data seen only at inference")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--allow-fallback-atlas", action="store_true",
                   help="use the offline generated atlas when A424 cannot be found")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("stage", help="run one pipeline stage with params.yaml (what dvc calls)",
                       description="The stages of dvc.yaml, driven by params.yaml's active "
                       "profile: synth, preprocess, validate, pretrain, compare, tune, finetune, "
                       "evaluate, register.")
    p.add_argument("name", choices=("synth", "preprocess", "validate", "pretrain", "compare",
                                    "tune", "finetune", "evaluate", "register"))
    p.add_argument("--mask-ratio", type=float, default=None, help="pretrain: which ratio")
    p.add_argument("--params", default="params.yaml")

    p = sub.add_parser("validate", help="Great Expectations checks of a processed store",
                       description="Checks the scaled data (training medians ~0 and IQRs ~1 per "
                       "parcel, no NaN/Inf, bounded values, parcel count, window length, "
                       "non-empty splits, no subject in two splits) as a GX checkpoint and "
                       "builds Data Docs. Exit 2 with the failures when any check fails.")
    p.add_argument("--data", required=True, help="store folder")
    p.add_argument("--out", default=None, help="GX project and validation.json "
                   "(default: validation/ beside the store)")
    p.add_argument("--window", type=_positive_int, default=200)
    p.add_argument("--parcels", type=_positive_int, default=None,
                   help="expected parcel count (default: the store's)")
    p.add_argument("--median-tol", type=_positive_float, default=0.1)
    p.add_argument("--iqr-tol", type=_positive_float, default=0.2)
    p.add_argument("--max-abs", type=_positive_float, default=100.0)

    p = sub.add_parser("pretrain", help="masked-autoencoder pretraining on a processed store",
                       description="Pretrain BrainLM on a store from `brainlm preprocess`. "
                       "Run under torchrun for several GPUs or machines.")
    p.add_argument("--data", required=True, help="store folder (brainlm preprocess --out)")
    p.add_argument("--out", required=True, help="output: a save_pretrained folder")
    p.add_argument("--profile", default="tiny", choices=("tiny", "13m", "111m", "650m"))
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--mask-strategy", default="random", choices=("random", "parcel", "future"))
    p.add_argument("--future-patches", type=_positive_int, default=1)
    p.add_argument("--max-steps", type=_positive_int, default=300)
    p.add_argument("--batch-size", type=_positive_int, default=32, help="global batch")
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="base learning rate (scaled by batch/256); default per profile")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--window", type=_positive_int, default=200)
    p.add_argument("--patch-size", type=_positive_int, default=20)
    p.add_argument("--windows-per-recording", type=_positive_int, default=8)
    p.add_argument("--eval-every", type=_positive_int, default=100)
    p.add_argument("--ckpt-every", type=_positive_int, default=100)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (>= 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoints/last.pt")
    p.add_argument("--stop-after", type=_positive_int, default=None,
                   help="leave after this many steps (resume later with --resume)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attention-kernel", default="auto",
                   choices=("auto", "flash", "cudnn", "efficient", "math"),
                   help="pin PyTorch's attention kernel (default: PyTorch picks)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--probe-target", default=None,
                   help="a phenotype: score the finished encoder by a linear probe of it")
    p.add_argument("--probe-task", default="regression",
                   choices=("regression", "classification"))
    p.add_argument("--networks-truth", default=None,
                   help="network per parcel (ground_truth.json or a table): zero-shot ARI")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune on a phenotype or forecasting",
                       description="Regression/classification of subject variables (linear "
                       "probe or full fine-tuning) or forecasting, on the store's splits.")
    _finetune_options(p)

    p = sub.add_parser("tune", help="Optuna search over fine-tuning settings (shareable)",
                       description="Adds --n-trials trials to an Optuna study. Workers on any "
                       "number of machines share one study by giving the same --study and "
                       "--storage (a database URL such as postgresql://user@host/optuna, or "
                       "journal:///shared/path/optuna.log) and each its own --worker number. "
                       "The finetune options are the base configuration the search varies.")
    _finetune_options(p)
    p.add_argument("--study", required=True, help="study name (shared by all workers)")
    p.add_argument("--storage", default=None, help="database URL (default: "
                   "$BRAINLM_OPTUNA_STORAGE, else mlflow/optuna.db in the repository)")
    p.add_argument("--n-trials", type=_positive_int, default=10, help="trials for this worker")
    p.add_argument("--worker", type=int, default=0, help="this worker's number (0, 1, ...)")
    p.add_argument("--timeout", type=_positive_float, default=None, help="seconds")

    p = sub.add_parser("evaluate", help="score a fine-tuning run beside baselines",
                       description="Test-split metrics with subject-level bootstrap CIs, beside "
                       "FC + linear, raw-ROI MLP (or persistence, parcel mean, linear AR for "
                       "forecasting) fitted on the same training recordings.")
    p.add_argument("--run", required=True, help="output folder of brainlm finetune")
    p.add_argument("--out", default=None, help="default: RUN/evaluation")
    p.add_argument("--n-boot", type=_positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("analyze", help="zero-shot: functional networks and reconstruction",
                       description="Cluster parcels from the model's representations and from "
                       "raw FC (ARI against ground truth when given), and reconstruct a "
                       "recording with rotating masks (every patch masked exactly once).")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="store folder")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--networks", type=_positive_int, default=7, help="number of clusters")
    p.add_argument("--truth", default=None, help="ground_truth.json of brainlm synth "
                   "(its 'modules'), or a TSV with one network label per parcel")
    p.add_argument("--max-windows", type=_positive_int, default=64)
    p.add_argument("--window", type=_positive_int, default=None,
                   help="window of released ViTMAE weights (default 200)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("perturb", help="in-silico perturbation of parcels in a recording",
                       description="Scale, shift or clamp some parcels over a time range and "
                       "map the model's predicted change in every parcel.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="store folder")
    p.add_argument("--recording", required=True, help="recording_id in the manifest")
    p.add_argument("--parcels", required=True,
                   help="comma-separated atlas labels (or names) of the parcels to perturb")
    p.add_argument("--mode", default="shift", choices=("scale", "shift", "clamp"))
    p.add_argument("--value", type=float, default=1.0)
    p.add_argument("--start", type=int, default=0, help="first timepoint")
    p.add_argument("--stop", type=int, default=None, help="timepoint after the last")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=_positive_int, default=None,
                   help="window of released ViTMAE weights (default 200)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("embed", help="embeddings (CLS and mean) of every recording to parquet",
                       description="Works with our pretrained folders and with upstream's "
                       "released ViTMAE weights (vitmae_111M / vitmae_650M folders).")
    p.add_argument("--model", required=True, help="pretrained folder (config.json + weights)")
    p.add_argument("--data", required=True, help="store folder")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--split", default=None, choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--window", type=_positive_int, default=None,
                   help="window of released ViTMAE weights (default 200); ours know theirs")
    return parser


def _cmd_synth(args) -> int:
    from pathlib import Path

    from .atlas import load_atlas
    from .data.synthetic import simulate_cohort, write_bids
    from .errors import ConfigError

    if not 0.05 <= args.tr <= 10:
        raise ConfigError(f"--tr {args.tr:g} s is out of range (0.05-10 s)")
    atlas = load_atlas(args.atlas, allow_fallback=True)
    cohort = simulate_cohort(atlas.coords, args.subjects, args.timepoints, tr=args.tr,
                             seed=args.seed)
    paths = write_bids(cohort, atlas, Path(args.out), tr=args.tr, voxel_size=args.voxel_size)
    print(f"brainlm synth: {len(paths)} recordings of {args.timepoints} timepoints at TR "
          f"{args.tr:g} s, atlas {atlas.name} ({atlas.n_parcels} parcels) -> {args.out}")
    return 0


def _cmd_preprocess(args) -> int:
    from pathlib import Path

    from .data.parcellate import ParcellationSettings
    from .data.pipeline import PreprocessConfig, run_preprocess

    settings = ParcellationSettings(
        target_tr=args.tr, engine=args.engine, detrend=not args.no_detrend,
        standardize=args.standardize, high_pass=args.high_pass, low_pass=args.low_pass,
        confounds=tuple(c.strip() for c in args.confounds.split(",") if c.strip()),
        min_timepoints=args.window)
    cfg = PreprocessConfig(
        inputs=[Path(p) for p in args.input], out=Path(args.out), atlas=args.atlas,
        settings=settings, input_tr=args.input_tr,
        participants=Path(args.participants) if args.participants else None,
        coords=Path(args.coords) if args.coords else None, fractions=args.split,
        seed=args.seed, workers=args.workers,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        scaler=Path(args.scaler) if args.scaler else None,
        allow_fallback_atlas=args.allow_fallback_atlas, progress=not args.no_progress)
    summary = run_preprocess(cfg)
    print(summary.format())
    return 0


def _cmd_stage(args) -> int:
    from .stages import load_params, run_stage

    _quiet_transformers()
    values = run_stage(args.name, load_params(args.params), args.mask_ratio)
    print(f"brainlm stage {args.name}: {values}")
    return 0


def _cmd_validate(args) -> int:
    import logging

    from .data.validate import Thresholds, validate_store

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    summary = validate_store(args.data, args.out, Thresholds(
        median_tol=args.median_tol, iqr_tol=args.iqr_tol, max_abs=args.max_abs,
        n_parcels=args.parcels, window=args.window))
    print(f"brainlm validate: all checks passed on {summary['n_recordings']} recordings; "
          f"Data Docs: {summary['data_docs']}")
    return 0


def _cmd_pretrain(args) -> int:
    from pathlib import Path

    from .train.pretrain import PretrainConfig, pretrain

    _quiet_transformers()
    cfg = PretrainConfig(
        data=Path(args.data), out=Path(args.out), profile=args.profile,
        mask_ratio=args.mask_ratio, mask_strategy=args.mask_strategy,
        future_patches=args.future_patches, window=args.window, patch_size=args.patch_size,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        base_lr=args.lr, warmup_steps=args.warmup_steps,
        windows_per_recording=args.windows_per_recording, seed=args.seed,
        workers=args.workers, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
        resume=args.resume, stop_after=args.stop_after, compile=args.compile,
        attention_kernel=args.attention_kernel, grad_checkpointing=args.grad_checkpointing,
        precision=args.precision, device=args.device, progress=not args.no_progress,
        probe_target=args.probe_target, probe_task=args.probe_task,
        networks_truth=Path(args.networks_truth) if args.networks_truth else None)
    result = pretrain(cfg)
    if result.get("metrics"):
        m = result["metrics"]
        words = "beats every baseline" if m["val_r2_gain"] > 0 else "HAS NOT LEARNED YET"
        print(f"brainlm pretrain: {result['step']} steps, val MSE {m['val_mse']:.4f}, "
              f"val R^2 {m['val_r2']:.4f}, best baseline {m['val_r2_best_baseline']:.4f} "
              f"(gain {m['val_r2_gain']:+.4f}: {words}) -> {args.out}")
    elif "metrics" not in result and result["step"] < args.max_steps:
        print(f"brainlm pretrain: stopped at step {result['step']} of {args.max_steps}; "
              f"continue with --resume")
    return 0


def _finetune_config(args):
    from pathlib import Path

    from .train.finetune import FinetuneConfig

    return FinetuneConfig(
        model=Path(args.model), data=Path(args.data), out=Path(args.out), target=args.target,
        task=args.task, mode=args.mode, pooling=args.pooling, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        layer_decay=args.layer_decay, head_dropout=args.head_dropout, patience=args.patience,
        horizon=args.horizon, windows_per_recording=args.windows_per_recording,
        window=args.window, seed=args.seed, device=args.device)


def _cmd_finetune(args) -> int:
    from .train.finetune import finetune

    _quiet_transformers()
    meta = finetune(_finetune_config(args))
    print(f"brainlm finetune: {args.task} {args.target or ''} ({args.mode}), "
          f"{meta['epochs_run']} epochs, best val loss {meta['best_val_loss']:.4f} -> {args.out}")
    return 0


def _cmd_tune(args) -> int:
    from .train.hpo import tune

    _quiet_transformers()
    from dataclasses import replace

    base = replace(_finetune_config(args), progress=False)
    result = tune(base, args.n_trials, args.study,
                  storage=args.storage, seed=args.seed, timeout=args.timeout,
                  worker=args.worker)
    print(f"brainlm tune: study {result['study_name']} in {result['storage']}: "
          f"{result['n_trials']} trials ({result['n_complete']} complete, "
          f"{result['n_pruned']} pruned), best {result['best_value']} "
          f"{result['best_params']} -> {base.out / 'best.json'}")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(args.run, args.out, n_boot=args.n_boot, seed=args.seed)
    print(result["table"])
    print(f"brainlm evaluate: {result['paths']['markdown']}")
    return 0


def _cmd_analyze(args) -> int:
    from .analysis.cli import analyze

    _quiet_transformers()
    print(analyze(args))
    return 0


def _cmd_perturb(args) -> int:
    from .analysis.cli import perturb

    _quiet_transformers()
    print(perturb(args))
    return 0


def _cmd_embed(args) -> int:
    from .analysis.embeddings import export_embeddings

    _quiet_transformers()
    out = export_embeddings(args.model, args.data, args.out, args.split, args.batch_size,
                            args.window)
    print(f"brainlm embed: {args.model} -> {out}")
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import BrainLMError

    warnings.showwarning = _show_warning
    try:
        commands = {"synth": _cmd_synth, "preprocess": _cmd_preprocess, "validate": _cmd_validate,
                    "stage": _cmd_stage,
                    "pretrain": _cmd_pretrain, "finetune": _cmd_finetune,
                    "tune": _cmd_tune,
                    "evaluate": _cmd_evaluate, "analyze": _cmd_analyze, "perturb": _cmd_perturb,
                    "embed": _cmd_embed}
        return commands[args.command](args)
    except BrainLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("BRAINLM_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (set BRAINLM_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
