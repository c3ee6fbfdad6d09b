"""A fine-tuning run's folder: what it holds, written whole beside `--out` and swapped in,
and the fingerprints of the store and encoder it was made from."""

from __future__ import annotations

from pathlib import Path

from .config import FinetuneConfig


def save_weights(out: Path, head, model, full: bool, store, **task) -> None:
    """The fine-tuned model and, beside it, the store's scaler (so the run can score unscaled
    recordings: `predictor`). Our encoders: the whole task model with `save_pretrained`
    (config.json + model.safetensors; `brainlm.model.tasks`, `task` as `from_parts` takes it).
    Released ViTMAE encoders: finetuned.safetensors, the head as `head.*` and the tuned
    encoder as `encoder.*` (full), read with the pretrained folder the run names."""
    from safetensors.torch import save_file

    from ..fileio import copy_file_atomic
    from ..model import is_released

    copy_file_atomic(Path(store) / "scaler.safetensors", out / "scaler.safetensors")
    if not is_released(model):
        from ..model.tasks import from_parts

        from_parts(model, head, **task).save_pretrained(out, safe_serialization=True)
        return
    state = {f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    if full:
        state.update({f"encoder.{k}": v.contiguous() for k, v in model.state_dict().items()})
    save_file(state, str(out / "finetuned.safetensors"))


RUN_FILES = ("finetune.json", "config.json", "model.safetensors", "finetuned.safetensors",
             "scaler.safetensors",
             "predictions.parquet", "forecast.npz", "evaluation")  # evaluate's default out


def sources(cfg: FinetuneConfig) -> dict:
    """Fingerprints of the store and the encoder's weights the run was made from: evaluate and
    the predictor refuse a store rebuilt or an encoder retrained since (a probe run keeps only
    its head, so the encoder it reads must be the one it was trained on)."""
    from ..data.store import store_fingerprint
    from ..fileio import sha256_file

    weights = Path(cfg.model) / "model.safetensors"
    return {"store_fingerprint": store_fingerprint(cfg.data),
            "model_sha256": sha256_file(weights) if weights.is_file() else None}


def check_run_folder(out) -> None:
    """A run folder is replaced whole, so `--out` must be new, empty or an earlier run: never a
    store, the model or a folder of the user's files."""
    from ..fileio import check_output, check_replaceable

    check_output(out)
    check_replaceable(out, "fine-tuning run", "finetune.json", RUN_FILES)


def write_run(out: Path, write) -> None:
    """`write(folder)` fills a temporary folder beside `out`, which then takes out's place:
    a crash or kill at any moment leaves the previous run whole, never a mix of two runs."""
    from ..fileio import atomic_dir

    with atomic_dir(out) as tmp:
        write(tmp)
