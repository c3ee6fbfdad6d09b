"""`brainlm` command line. Only argparse at import time: `brainlm --help` must stay instant."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


# command -> (job module, help, description); their flags come from the job's config
JOB_COMMANDS = {
    "synth": ("synth", "write a synthetic BIDS dataset (network-structured BOLD)",
              "Synthetic fMRI with known networks and phenotype effects."),
    "preprocess": ("preprocess", "parcellate, split by subject, scale and store",
                   "Recordings (4-D NIfTI or parcellated tables) -> a store of scaled "
                   "[parcels, time] arrays with manifest.parquet and the scaler."),
    "validate": ("validate", "Great Expectations checks of a processed store",
                 "Checks the scaled data (training medians ~0 and IQRs ~1 per parcel, no "
                 "NaN/Inf, bounded values, parcel count, window length, non-empty splits, no "
                 "subject in two splits) as a GX checkpoint and builds Data Docs. Exit 2 with "
                 "the failures when any check fails."),
    "pretrain": ("pretrain", "masked-autoencoder pretraining on a processed store",
                 "Pretrain BrainLM on a store from `brainlm preprocess`. Run under torchrun "
                 "for several GPUs or machines."),
    "finetune": ("finetune", "fine-tune on a phenotype or forecasting",
                 "Regression/classification of subject variables (linear probe or full "
                 "fine-tuning) or forecasting, on the store's splits."),
    "tune": ("tune", "Optuna search over fine-tuning settings (shareable)",
             "Adds --n-trials trials to an Optuna study. Workers on any number of machines "
             "share one study by giving the same --study and --storage (a database URL such "
             "as postgresql://user@host/optuna, or journal:///shared/path/optuna.log) and each "
             "its own --worker number. The finetune options are the base configuration the "
             "search varies."),
    "predict": ("predict", "score new recordings with a fine-tuned model (folder or models:/)",
                "NIfTI or parcellated tables -> predictions.parquet, with the model's atlas, "
                "settings and scaler (refused on another atlas, TR or parcel count), and a "
                "drift report: parcels whose scaled median or IQR moved from training's 0 and "
                "1 beyond the tolerances."),
    "evaluate": ("evaluate", "score a fine-tuning run beside baselines",
                 "Test-split metrics with subject-level bootstrap CIs, beside FC + linear, "
                 "raw-ROI MLP (or persistence, parcel mean, linear AR for forecasting) fitted "
                 "on the same training recordings."),
}
COMMANDS = ("synth", "preprocess", "stage", "validate", "pretrain", "finetune", "tune",
            "evaluate", "predict", "analyze", "perturb", "embed")


def _int_from(low: int):
    """An argparse type: an integer >= low, named when it is not."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
        return value
    return parse


_positive_int, _seed = _int_from(1), _int_from(0)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, the flags of that command alone (the others are listed but
    not built, so `brainlm --help` imports no job module)."""
    from .jobs import JOBS

    parser = argparse.ArgumentParser(
        prog="brainlm", description="BrainLM: fMRI foundation models, from recordings to "
        "validated, scaled parcel time series and beyond.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if name in JOB_COMMANDS:
            module, help_, description = JOB_COMMANDS[name]
            p = sub.add_parser(name, help=help_, description=description)
            if only in (None, name):
                _job_arguments(p, module)
        elif name == "stage":
            p = sub.add_parser("stage", help="run one pipeline stage with params.yaml (what dvc "
                               "calls)", description="The stages of dvc.yaml, driven by "
                               "params.yaml's active profile: " + ", ".join(JOBS) + ".")
            p.add_argument("name", choices=tuple(JOBS))
            p.add_argument("--mask-ratio", type=float, default=None, help="pretrain: which ratio")
            p.add_argument("--params", default="params.yaml")
        elif only in (None, name):
            _analysis_arguments(sub, name)
        else:
            sub.add_parser(name, help=_ANALYSIS_HELP[name])
    return parser


def _job_arguments(p, module: str) -> None:
    import importlib

    from .jobs.options import add_arguments

    mod = importlib.import_module(f".jobs.{module}", __package__)
    add_arguments(p, mod.Config, mod.OPTIONS)


_ANALYSIS_HELP = {"analyze": "zero-shot: functional networks and reconstruction",
                  "perturb": "in-silico perturbation of parcels in a recording",
                  "embed": "embeddings (CLS and mean) of every recording to parquet"}


def _analysis_arguments(sub, name: str) -> None:
    """Flags of the analysis commands (tools over a model and a store, not pipeline jobs)."""
    if name == "analyze":
        p = sub.add_parser("analyze", help=_ANALYSIS_HELP[name],
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
        p.add_argument("--seed", type=_seed, default=0)
    elif name == "perturb":
        p = sub.add_parser("perturb", help=_ANALYSIS_HELP[name],
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
        p.add_argument("--seed", type=_seed, default=0)
    elif name == "embed":
        p = sub.add_parser("embed", help=_ANALYSIS_HELP[name],
                           description="Works with our pretrained folders and with upstream's "
                           "released ViTMAE weights (vitmae_111M / vitmae_650M folders).")
        p.add_argument("--model", required=True, help="pretrained folder (config.json + weights)")
        p.add_argument("--data", required=True, help="store folder")
        p.add_argument("--out", required=True, help="output .parquet")
        p.add_argument("--split", default=None, choices=("train", "val", "test"))
        p.add_argument("--batch-size", type=_positive_int, default=16)
        p.add_argument("--window", type=_positive_int, default=None,
                       help="window of released ViTMAE weights (default 200); ours know theirs")


def _cmd_job(args) -> int:
    """A job command: its config from the flags, then the job's `run` (tracked like the
    pipeline's stages)."""
    import importlib

    from .jobs.options import from_args

    if args.command in ("pretrain", "finetune", "tune", "predict"):
        _quiet_transformers()
    mod = importlib.import_module(f".jobs.{JOB_COMMANDS[args.command][0]}", __package__)
    mod.run(from_args(mod.Config, mod.OPTIONS, args), tags={"brainlm.caller": "cli"})
    return 0


def _cmd_stage(args) -> int:
    from .jobs import load_params, run_stage

    _quiet_transformers()
    values = run_stage(args.name, load_params(args.params), args.mask_ratio)
    print(f"brainlm stage {args.name}: {values}")
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
    from .fileio import check_output

    check_output(args.out, inputs=[args.model, args.data])
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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, argparse printed why)
        return exc.code
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import BrainLMError

    warnings.showwarning = _show_warning
    try:
        if args.command in JOB_COMMANDS:
            return _cmd_job(args)
        commands = {"stage": _cmd_stage, "analyze": _cmd_analyze, "perturb": _cmd_perturb,
                    "embed": _cmd_embed}
        return commands[args.command](args)
    except BrainLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file or folder the system refused: it names the path
        if os.environ.get("BRAINLM_DEBUG"):
            raise
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        print(f"error: {where + ': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("BRAINLM_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (set BRAINLM_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
