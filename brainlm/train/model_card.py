"""What a finished pretraining run leaves behind: the save_pretrained folder with scaler,
metrics, history, reconstruction plot and a model card (a README.md that says plainly whether
the model beats its baselines)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import PretrainConfig
from .scoring import COMMON_MASK_RATIO, encoder_yardstick, numeric_metrics

def write_outputs(model, store, cfg: PretrainConfig, out: Path, history, last_eval, tracker,
                  logged=()):
    """save_pretrained folder + scaler + model card + metrics, history (training steps) and
    validation (evaluation steps) + reconstruction plot, written into a fresh folder beside
    `out` with the run's checkpoints and swapped in whole (`fileio.atomic_dir`): a kill at any
    moment leaves the previous model whole, never new weights beside an old card, and nothing
    is written through a link planted in `out`."""
    from ..fileio import atomic_dir, link_or_copy

    with atomic_dir(out) as tmp:
        _write_folder(model, store, cfg, tmp, history, last_eval)
        checkpoints = out / "checkpoints"
        if checkpoints.is_dir() and not checkpoints.is_symlink():
            (tmp / "checkpoints").mkdir()
            for f in sorted(checkpoints.iterdir()):
                if f.suffix == ".pt" and f.is_file() and not f.is_symlink():
                    link_or_copy(f, tmp / "checkpoints" / f.name)
    metrics = json.loads((out / "metrics.json").read_text())
    # `logged`: what this run's tracker has at the last step already (each metric once a step)
    tracker.metrics({k: v for k, v in numeric_metrics(metrics).items() if k not in logged},
                    step=metrics["step"])
    # learned / not learned / undecided: the interval of the gain over the best rung
    tracker.tags({"best_baseline": str(metrics.get("val_best_baseline")),
                  "learned": str(metrics.get("val_verdict", "n/a")),
                  "learned_common": str(metrics.get("val_common_verdict", "n/a"))})
    tracker.artifacts(out, "model")
    if (out / "reconstruction.png").is_file():  # top level: MLflow's Compare shows them side by side
        tracker.artifact(out / "reconstruction.png")


def _write_folder(model, store, cfg: PretrainConfig, out: Path, history, last_eval) -> None:
    """The finished model's files in `out` (a fresh folder)."""
    from ..fileio import copy_file_atomic, sha256_file, write_bytes_atomic

    model.save_pretrained(out, safe_serialization=True)
    copy_file_atomic(store.path / "scaler.safetensors", out / "scaler.safetensors")
    metrics = {k: v for k, v in last_eval.items() if k.startswith(("val_", "test_"))}
    metrics.update(encoder_yardstick(model, store, cfg))
    metrics.update(step=history[-1]["step"], train_loss=history[-1]["loss"])
    write_bytes_atomic(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    train_rows, val_rows = split_history(history)
    write_bytes_atomic(out / "history.json", json.dumps(train_rows).encode())
    write_bytes_atomic(out / "validation.json", json.dumps(val_rows).encode())
    names = store.parcels["name"].tolist()
    if last_eval.get("example") is not None:
        from .reconstruction import plot_reconstruction

        x, recon, base, mask = last_eval["example"]
        plot_reconstruction(x, recon, out / "reconstruction.png", names=names, mask=mask,
                            baseline=base, baseline_name=f"{last_eval['val_best_baseline']} "
                                                         "(best baseline)")
    card = model_card(model, store, cfg, metrics, sha256_file(out / "scaler.safetensors"))
    write_bytes_atomic(out / "README.md", card.encode())


TRAIN_KEYS = ("step", "loss", "lr", "grad_norm")


def split_history(history: list) -> tuple[list, list]:
    """The run's history as two tables with the same keys in every row (what `dvc plots`
    needs): training steps (history.json) and evaluation steps (validation.json)."""
    train = [{k: r[k] for k in TRAIN_KEYS if k in r} for r in history]
    val = [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("val_")}}
           for r in history if any(k.startswith("val_") for k in r)]
    common = set.intersection(*(set(r) for r in val)) if val else set()
    return train, [{k: v for k, v in r.items() if k in common} for r in val]


BASELINE_WORDS = {
    "zero": "zero (the training median)",
    "parcel_mean": "the parcel's own visible patches (mean)",
    "parcel_interp": "the parcel's own visible patches (linear interpolation in time)",
    "same_time": "the visible parcels at the same time patch (mean)",
    "ridge": "ridge on the visible tokens (fitted on training windows)",
    "cond_gaussian": "the visible parcels at the same time, conditional Gaussian (training "
                     "mean and shrunk covariance)",
    "space_time": "space-time linear stack: conditional Gaussian + the parcel's neighbouring "
                  "visible patches (fitted on training windows)",
}


def gain_text(metrics: dict, prefix: str) -> str:
    """'+0.1234 [+0.0500, +0.2000] learned': a gain, its 95 % interval over subjects and the
    verdict ('' when not scored)."""
    gain = metrics.get(f"{prefix}_r2_gain")
    if gain is None:
        return ""
    low, high = metrics.get(f"{prefix}_r2_gain_low"), metrics.get(f"{prefix}_r2_gain_high")
    ci = "" if low is None or high is None else f" [{low:+.4f}, {high:+.4f}]"
    return f"{gain:+.4f}{ci} {metrics.get(f'{prefix}_verdict', '')}".rstrip()


def recon_table(metrics: dict) -> str:
    """Markdown: model and baselines at the run's own mask ratio and at the common one."""
    cols = [("val", "val, own mask ratio"), ("val_common", f"val, common mask {COMMON_MASK_RATIO:g}"),
            ("test", "test, own mask ratio"), ("test_common", f"test, common mask {COMMON_MASK_RATIO:g}")]
    cols = [(k, h) for k, h in cols if f"{k}_r2" in metrics]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [f"| predictor | {' | '.join(h for _, h in cols)} |", "|---" * (len(cols) + 1) + "|",
            f"| **BrainLM** | {' | '.join(fmt(metrics.get(f'{k}_r2')) for k, _ in cols)} |"]
    for name, words in BASELINE_WORDS.items():
        rows.append(f"| {words} | {' | '.join(fmt(metrics.get(f'{k}_r2_{name}')) for k, _ in cols)} |")
    rows.append(f"| gain over the best baseline (95 % CI over subjects), verdict | "
                f"{' | '.join(gain_text(metrics, k) for k, _ in cols)} |")
    return "\n".join(rows) + "\n"


def encoder_table(metrics: dict, cfg: PretrainConfig) -> str:
    """Markdown: the probe and network checks of the frozen encoder (empty if none ran)."""
    lines = []
    for name in ("probe_r2", "probe_roc_auc"):
        if name in metrics:
            lines.append(f"| linear probe of {cfg.probe_target} ({name[6:]}, test subjects, 95 % "
                         f"CI) | {metrics[name]:.3f} [{metrics[name + '_low']:.3f}, "
                         f"{metrics[name + '_high']:.3f}]; training-mean/majority "
                         f"{metrics[name + '_floor']:.3f} |")
    if "probe_gain_low" in metrics:
        lines.append(f"| probe minus training-mean/majority (paired, 95 % CI) | "
                     f"{metrics['probe_gain']:+.3f} [{metrics['probe_gain_low']:+.3f}, "
                     f"{metrics['probe_gain_high']:+.3f}]: **{metrics['probe_verdict']}** |")
    if "ari_model" in metrics:
        lines.append(f"| zero-shot networks (ARI vs known networks) | model "
                     f"{metrics['ari_model']:.3f}; flat-input control "
                     f"{metrics['ari_flat_input']:.3f}; raw FC {metrics['ari_fc']:.3f} |")
    if not lines:
        return ""
    return ("## As a frozen encoder\n| check | result |\n|---|---|\n" + "\n".join(lines)
            + "\n")


def verdict(metrics: dict) -> str:
    gain = metrics.get("val_r2_gain")
    if gain is None:
        return ""
    best = BASELINE_WORDS.get(metrics.get("val_best_baseline"), "the best baseline")
    said = metrics.get("val_verdict")
    what = f"R^2 gain over {best}: {gain_text(metrics, 'val')} (95 % interval over subjects)"
    if said == "learned":
        return f"**The model beats every baseline**: {what}."
    if said == "not learned":
        return (f"**The model has not learned yet**: {what}; whatever its loss says, it knows "
                "no more than that baseline.")
    return (f"**Undecided**: {what}. The interval holds 0: these validation subjects cannot "
            "tell whether the model knows more than that baseline.")


def model_card(model, store, cfg: PretrainConfig, metrics: dict, scaler_hash: str) -> str:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    splits = store.meta.get("splits", {})
    split_rows = "\n".join(f"| {s} | {v['subjects']} | {v['recordings']} |"
                           for s, v in splits.items())
    return f"""---
library_name: transformers
license: apache-2.0
tags: [brainlm, fmri, masked-autoencoder]
---
# BrainLM ({cfg.profile}, mask ratio {cfg.mask_ratio:g})

Masked-autoencoder transformer pretrained on parcellated fMRI with the `brainlm` package.

```python
from brainlm.model.modeling import BrainLMForPretraining
model = BrainLMForPretraining.from_pretrained("<this folder>")
emb = model.embed(windows)  # windows: float32 [batch, {store.n_parcels}, {c.window}], scaled with scaler.safetensors
```

## Shape
| | |
|---|---|
| parameters | {n_params:,} |
| tokens | {store.n_parcels} parcels x {c.num_patches} patches of {c.patch_size} timepoints |
| encoder | {c.hidden_size} wide, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, MLP {c.intermediate_size} |
| decoder | {c.decoder_hidden_size} wide, {c.decoder_num_hidden_layers} layers, {c.decoder_num_attention_heads} heads, MLP {c.decoder_intermediate_size} |
| masking | {c.mask_strategy}, ratio {c.mask_ratio:g}{f", future patches {c.future_patches}" if c.mask_strategy == "future" else ""} |

## Data
| split | subjects | recordings |
|---|---|---|
{split_rows}

Atlas {store.meta.get("atlas")} (hash `{store.meta.get("atlas_hash")}`), TR {store.tr:g} s,
store `{store.path}`. Inputs must be scaled with `scaler.safetensors` (sha256 `{scaler_hash[:16]}`),
fitted on the training subjects only; the parcel coordinates are saved in `config.json`.

## Training
{cfg.max_steps} steps, batch {cfg.batch_size}, AdamW (lr {cfg.lr:.2e} = base x batch / 256,
weight decay {cfg.weight_decay}), cosine schedule with warmup, gradient clipping {cfg.clip_grad}, seed {cfg.seed}.

## Validation (deterministic windows, fixed masks)
R^2 per parcel over the masked values, averaged over parcels (not clipped), for this model and
for baselines that see the same visible patches of the same windows under the same masks.
{verdict(metrics)}

{recon_table(metrics)}
Reconstruction MSE (masked patches) {metrics.get("val_mse", float("nan")):.4f}; final training
loss {metrics.get("train_loss", float("nan")):.4f}.

{encoder_table(metrics, cfg)}
## Licence
Code: Apache-2.0. These weights were trained on the data named above: their use is bound by
that data's terms. Upstream BrainLM's released weights are CC BY-NC-ND 4.0; this model does
not contain them.
"""
