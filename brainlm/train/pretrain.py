"""Masked-autoencoder pretraining on a processed store: one flat loop, resumable, DDP-ready.

Reproducibility is built from seeds rather than saved RNG state: the window of item i in epoch
e comes from (seed, e, i), the sampler order from (seed, epoch), and every step's masks from
(seed, step). A run resumed from a checkpoint therefore sees exactly the batches and masks the
uninterrupted run saw, and `torchrun` with N processes sees the same global batch as one
process (rank r takes global positions r, r + N, ...).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .config import PretrainConfig

LOG_EVERY = 20  # steps between waits for the device (history, MLflow, progress bar)


# ---------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


class _ResumeSampler(torch.utils.data.Sampler):
    """A DistributedSampler's epoch order, starting `skip` items in (mid-epoch resume)."""

    def __init__(self, base, skip: int = 0):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return len(self.base) - self.skip


# ---------------------------------------------------------------------------- pieces


def step_noise(seed: int, step: int, micro: int, batch: int, length: int, rank: int, world: int):
    """Mask noise for this rank's share of the global batch [batch, length] at a step."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro])
                                          .generate_state(1)[0]))
    noise = torch.rand(batch * world, length, generator=g)
    return noise[rank::world]


def settle(pending: list, lr: float) -> tuple[list[dict], str | None]:
    """History records for steps whose loss and gradient norm are still device tensors.

    One host-device sync for the lot (the loop does not wait for the GPU every step). Returns
    the records up to the first step with a non-finite loss or gradient norm, and what went
    wrong there (None if nothing did): the run keeps those records, then stops before
    anything is checkpointed."""
    values = torch.stack([torch.stack([loss.float(), norm.float()])
                          for _, loss, norm, _ in pending]).cpu().tolist()
    records = []
    for (step, _, _, step_lr), (loss, norm) in zip(pending, values):
        for name, value in (("loss", loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                return records, (f"the {name} became {value} at step {step}: lower the "
                                 f"learning rate (now {lr:.2e})")
        records.append({"step": step, "loss": loss, "lr": step_lr, "grad_norm": norm})
    return records, None


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay: float):
    """No weight decay on biases, norms and the CLS/mask tokens (as in MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


COMMON_MASK_RATIO = 0.75  # every run is also scored at this ratio, with the same masks
COMMON_MASK_SEED = 7919  # ... drawn from this seed, whatever the run's own seed
RIDGE_WINDOWS = 64  # training windows the ridge baseline is fitted on


def _eval_windows(store, split: str, cfg: PretrainConfig, limit: int):
    from ..data.store import WindowDataset

    ds = WindowDataset(store, split, window=cfg.window, mode="sliding", stride=cfg.window)
    n = min(len(ds), limit)
    for start in range(0, n, 16):
        yield start, torch.stack([torch.from_numpy(ds[i]["signal"])
                                  for i in range(start, min(n, start + 16))])


def _fit_ridge(store, cfg: PretrainConfig, ratio: float, seed: int, model):
    """The ridge baseline for one masking distribution, fitted on training windows only."""
    from .reconstruction import RidgeBaseline, token_mask

    ridge, n_patches = RidgeBaseline(), cfg.window // cfg.patch_size
    for start, x in _eval_windows(store, "train", cfg, RIDGE_WINDOWS):
        noise = step_noise(seed + 104729, start, 0, len(x), store.n_parcels * n_patches, 0, 1)
        _, ids_mask = model.masking(len(x), store.n_parcels, n_patches, ratio,
                                    cfg.mask_strategy, cfg.future_patches, noise, "cpu")
        ridge.partial_fit(x, token_mask(store.n_parcels, n_patches, ids_mask))
    return ridge.fit()


@torch.no_grad()
def score_masks(model, store, cfg: PretrainConfig, device, autocast, ratio: float, seed: int,
                ridge=None, split: str = "val") -> dict:
    """The model and every baseline of `reconstruction` on the same deterministic windows of
    `split` under the same masks (ratio, seed). Returns {"r2": {name: R^2}, "mse": model MSE,
    "windows": n, "example": (x, model recon, best-baseline recon, mask) of the first window}.
    """
    from .reconstruction import R2Meter, predict_baselines, time_mask, token_mask

    coords = torch.as_tensor(store.coords, device=device)
    p, n_patches = store.n_parcels, cfg.window // cfg.patch_size
    meter, example, n = R2Meter(p), None, 0
    for start, x in _eval_windows(store, split, cfg, cfg.eval_windows):
        noise = step_noise(seed, start, 0, len(x), p * n_patches, 0, 1)
        with autocast():
            out = model(x.to(device), coords, noise=noise.to(device), mask_ratio=ratio)
        recon, _ = model.reconstruct(x.to(device), out)
        m = token_mask(p, n_patches, out.ids_mask.cpu())
        mask = time_mask(m, cfg.patch_size)
        meter.add_targets(x, mask)
        meter.add("model", x, recon.float().cpu(), mask)
        baselines = predict_baselines(x, m, ridge)
        for name, pred in baselines.items():
            meter.add(name, x, pred, mask)
        if example is None:
            example = (x[0].numpy(), recon[0].float().cpu().numpy(), baselines, mask[0].numpy())
        n += len(x)
    r2 = {name: meter.r2(name) for name in meter.sse}
    best = max((k for k in r2 if k != "model"), key=lambda k: r2[k])
    x0, r0, baselines, m0 = example
    return {"r2": r2, "mse": meter.mse("model"), "windows": n, "best": best,
            "example": (x0, r0, baselines[best][0].numpy(), m0)}


def evaluate(model, store, cfg: PretrainConfig, device, autocast, ridges: dict,
             split: str = "val") -> dict:
    """Reconstruction on deterministic validation windows, beside the baselines.

    At the run's own mask ratio (val_*) and at the common ratio every run shares
    (val_common_*, same masks for every run): the model's R^2 (per parcel over masked values,
    averaged; not clipped, so worse than the mean is negative), each baseline's R^2 on the
    same windows and masks, and the gain over the best baseline (> 0: the model has learned
    more than the baseline knows). `ridges` caches the fitted ridge baselines per ratio.
    With split="test" the same numbers are named test_* and test_common_*: the held-out check
    of the finished run (the recipe was chosen on validation).
    """
    was_training = model.training
    model.eval()
    metrics, example = {}, None
    plans = [(split, cfg.mask_ratio, cfg.seed + 7919)]
    if cfg.mask_strategy == "random":
        plans.append((f"{split}_common", COMMON_MASK_RATIO, COMMON_MASK_SEED))
    for prefix, ratio, seed in plans:
        if ratio not in ridges:
            ridges[ratio] = _fit_ridge(store, cfg, ratio, seed, model)
        s = score_masks(model, store, cfg, device, autocast, ratio, seed, ridges[ratio], split)
        r2 = s["r2"]
        metrics[f"{prefix}_r2"] = r2["model"]
        if prefix == split:
            metrics[f"{split}_mse"], metrics[f"{split}_windows"] = s["mse"], s["windows"]
            example = s["example"]
        for name in (k for k in r2 if k != "model"):
            metrics[f"{prefix}_r2_{name}"] = r2[name]
        metrics[f"{prefix}_r2_best_baseline"] = r2[s["best"]]
        metrics[f"{prefix}_r2_gain"] = r2["model"] - r2[s["best"]]
        metrics[f"{prefix}_best_baseline"] = s["best"]
    model.train(was_training)
    return {**metrics, "example": example}


def numeric_metrics(ev: dict) -> dict:
    """The numbers of an evaluation (for history, MLflow and metrics.json)."""
    return {k: v for k, v in ev.items() if k.startswith(("val_", "test_", "probe_", "ari_"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def encoder_yardstick(model, store, cfg: PretrainConfig) -> dict:
    """Linear probe and zero-shot network ARI of the finished encoder (`analysis.yardstick`),
    as metrics named the same in every run; a check that cannot run is skipped with the
    reason printed, never at the cost of the trained model."""
    from ..analysis.yardstick import linear_probe, network_ari

    out = {}
    was_training = model.training
    model.eval()
    try:
        if cfg.probe_target:
            try:
                pr = linear_probe(model, store, cfg.probe_target, cfg.probe_task, seed=cfg.seed)
                name = f"probe_{pr['metric']}"
                out.update({name: pr["value"], f"{name}_low": pr["low"],
                            f"{name}_high": pr["high"], f"{name}_floor": pr["floor"]})
            except ConfigError as exc:
                print(f"linear probe skipped: {exc}")
        if cfg.networks_truth is not None:
            from ..analysis.networks import network_labels

            try:
                ari = network_ari(model, store, network_labels(cfg.networks_truth, store),
                                  seed=cfg.seed)
                out.update({"ari_model": ari["model"], "ari_flat_input": ari["flat_input"],
                            "ari_fc": ari["fc"]})
            except ConfigError as exc:
                print(f"network identification skipped: {exc}")
    finally:
        model.train(was_training)
    return out


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list) -> None:
    from ..fileio import atomic_path

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step,
             "history": json.dumps(history)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path):
    """Tensors and plain containers only: weights_only=True never runs pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- the run


def pretrain(cfg: PretrainConfig) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    from ..data.store import BrainStore, WindowDataset
    from ..model.config import BrainLMConfig
    from ..model.modeling import BrainLMForPretraining
    from ..tracking import Tracker

    rank, local_rank, world = dist_info()
    cfg.validate(world)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    torch.manual_seed(cfg.seed)
    store = BrainStore(cfg.data)
    if not len(store.recordings("val")):
        raise ConfigError(f"{cfg.data}: the val split is empty; validation needs held-out "
                          "subjects (preprocess with a val fraction, e.g. --split 0.8,0.1,0.1)")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    model_cfg = BrainLMConfig.from_preset(
        cfg.profile, window=cfg.window, patch_size=cfg.patch_size, mask_ratio=cfg.mask_ratio,
        mask_strategy=cfg.mask_strategy, future_patches=cfg.future_patches, **cfg.model)
    model_cfg.parcel_coords = store.coords.round(3).tolist()
    model_cfg.atlas = store.meta.get("atlas")
    model_cfg.atlas_hash = store.meta.get("atlas_hash")
    model = BrainLMForPretraining(model_cfg).to(device)
    model.set_sdpa_kernel(cfg.attention_kernel)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    micro = cfg.batch_size // world // cfg.grad_accum
    train_ds = WindowDataset(store, "train", window=cfg.window, mode="random",
                             windows_per_recording=cfg.windows_per_recording, seed=cfg.seed)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (micro * cfg.grad_accum)
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_ds)} training windows per epoch are fewer than one "
                          f"batch of {cfg.batch_size}; raise windows_per_recording or lower "
                          "the batch size")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.max_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, cfg.max_steps, cfg.min_lr_ratio))
    step, history = 0, []
    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), json.loads(state["history"])
    elif cfg.resume and rank == 0:
        print(f"no checkpoint at {ckpt_path}: starting from step 0")
    train_model = model
    if cfg.compile:
        train_model = torch.compile(model)
    if world > 1:
        train_model = DDP(train_model, device_ids=[local_rank] if device.type == "cuda" else None)
    coords = torch.as_tensor(store.coords, device=device)
    length = store.n_parcels * (cfg.window // cfg.patch_size)

    model.masking(1, store.n_parcels, cfg.window // cfg.patch_size, cfg.mask_ratio,
                  cfg.mask_strategy, cfg.future_patches, None, "cpu")  # refuses all/none masked
    tracker = Tracker("pretrain", run_name=f"{cfg.profile}-mask{cfg.mask_ratio:g}",
                      uri=cfg.tracking_uri, enabled=rank == 0)
    try:
        tracker.params({**{k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
                        "lr": cfg.lr, "n_parameters": sum(p.numel() for p in model.parameters()),
                        "atlas_hash": model.config.atlas_hash, **cfg.extra})

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress or rank != 0,
                   desc=f"pretrain {cfg.profile} mask {cfg.mask_ratio:g}", dynamic_ncols=True)
        last_eval: dict = {}
        ridges: dict = {}  # mask ratio -> ridge baseline fitted on training windows
        iterator, epoch = None, None
        stop_at = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps,
                                                                     step + cfg.stop_after)
        model.train()
        t0, windows_done = time.perf_counter(), 0
        pending: list = []  # (step, loss, grad norm, lr) still on the device
        while step < stop_at:
            if epoch != step // steps_per_epoch or iterator is None:
                epoch = step // steps_per_epoch
                sampler.set_epoch(epoch)
                train_ds.set_epoch(epoch)
                skip = (step % steps_per_epoch) * micro * cfg.grad_accum
                loader = DataLoader(train_ds, batch_size=micro, sampler=_ResumeSampler(sampler, skip),
                                    num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                    drop_last=True, persistent_workers=False)
                iterator = iter(loader)
            loss_sum = torch.zeros((), device=device)
            for m in range(cfg.grad_accum):
                batch = next(iterator)
                x = batch["signal"].to(device, non_blocking=True)
                noise = step_noise(cfg.seed, step, m, micro, length, rank, world)
                if device.type == "cuda":
                    noise = noise.pin_memory()
                noise = noise.to(device, non_blocking=True)
                sync = m == cfg.grad_accum - 1 or world == 1
                with train_model.no_sync() if (world > 1 and not sync) else nullcontext():
                    with autocast():
                        loss = train_model(x, coords, noise=noise).loss / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            step += 1
            windows_done += cfg.batch_size
            pending.append((step, loss_sum, grad_norm, scheduler.get_last_lr()[0]))
            bar.update(1)
            eval_due = step % cfg.eval_every == 0 or step == cfg.max_steps
            ckpt_due = step % cfg.ckpt_every == 0 or step == stop_at
            evaluating, saving = rank == 0 and eval_due, rank == 0 and ckpt_due
            # every rank settles at the same steps, so all stop together on a bad loss
            if len(pending) >= LOG_EVERY or eval_due or ckpt_due:
                records, problem = settle(pending, cfg.lr)  # the only wait for the device
                pending.clear()
                history.extend(records)
                tracker.metrics_steps([(r["step"], {k: v for k, v in r.items() if k != "step"})
                                       for r in records])
                if problem:
                    raise ConfigError(problem)
                rate = windows_done / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", win_s=f"{rate:.1f}")
            if evaluating:
                ev = evaluate(model, store, cfg, device, autocast, ridges)
                last_eval = ev
                val = numeric_metrics(ev)
                history[-1].update(val)
                tracker.metrics(val, step=step)
            if saving:
                save_checkpoint(ckpt_path, model, optimizer, scheduler, step, history)
        bar.close()

        result = {"step": step, "finished": step >= cfg.max_steps, "history": history}
        if rank == 0 and step >= cfg.max_steps:
            if not last_eval:
                last_eval = evaluate(model, store, cfg, device, autocast, ridges)
            if len(store.recordings("test")):  # the held-out check, once, at the end
                held_out = evaluate(model, store, cfg, device, autocast, ridges, split="test")
                last_eval = {**last_eval, **{k: v for k, v in held_out.items()
                                             if k.startswith("test_")}}
            _write_outputs(model, store, cfg, out, history, last_eval, tracker)
            result["metrics"] = numeric_metrics(last_eval)
        tracker.end()
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return result
    except BaseException:
        tracker.end("FAILED")  # a crashed run must not stay RUNNING in MLflow
        raise


def _write_outputs(model, store, cfg: PretrainConfig, out: Path, history, last_eval, tracker):
    """save_pretrained folder + scaler + model card + metrics/history + reconstruction plot."""
    import shutil

    from ..fileio import sha256_file, write_bytes_atomic

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(store.path / "scaler.safetensors", out / "scaler.safetensors")
    metrics = {k: v for k, v in last_eval.items() if k.startswith(("val_", "test_"))}
    metrics.update(encoder_yardstick(model, store, cfg))
    metrics.update(step=history[-1]["step"], train_loss=history[-1]["loss"])
    write_bytes_atomic(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    write_bytes_atomic(out / "history.json", json.dumps(history).encode())
    names = store.parcels["name"].tolist()
    if last_eval.get("example") is not None:
        from ..analysis.reconstruction import plot_reconstruction

        x, recon, base, mask = last_eval["example"]
        plot_reconstruction(x, recon, out / "reconstruction.png", names=names, mask=mask,
                            baseline=base, baseline_name=f"{last_eval['val_best_baseline']} "
                                                         "(best baseline)")
    card = model_card(model, store, cfg, metrics, sha256_file(out / "scaler.safetensors"))
    write_bytes_atomic(out / "README.md", card.encode())
    tracker.metrics(numeric_metrics(metrics), step=metrics["step"])
    tracker.tags({"best_baseline": str(metrics.get("val_best_baseline")),
                  "learned": str(metrics.get("val_r2_gain", float("nan")) > 0)})
    tracker.artifacts(out, "model")


BASELINE_WORDS = {
    "zero": "zero (the training median)",
    "parcel_mean": "the parcel's own visible patches (mean)",
    "parcel_interp": "the parcel's own visible patches (linear interpolation in time)",
    "same_time": "the visible parcels at the same time patch (mean)",
    "ridge": "ridge on the visible tokens (fitted on training windows)",
}


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
    rows.append(f"| gain over the best baseline | "
                f"{' | '.join(fmt(metrics.get(f'{k}_r2_gain')) for k, _ in cols)} |")
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
    if gain > 0:
        return (f"**The model beats every baseline** (R^2 gain {gain:+.4f} over {best}).")
    return (f"**The model has not learned yet**: it does not beat {best} (R^2 gain {gain:+.4f}); "
            "whatever its loss says, it knows no more than that baseline.")


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
