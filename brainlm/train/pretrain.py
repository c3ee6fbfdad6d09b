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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import PretrainConfig
from .model_card import write_outputs
from .reconstruction import step_noise
from .scoring import evaluate, fit_prior, numeric_metrics

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
                                 f"learning rate (now {lr:.2e}), or look for huge values in "
                                 "the store (brainlm validate)")
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


# settings that do not change the weights a run makes; every other one must match on --resume
NOT_SHAPING = ("data", "out", "workers", "eval_every", "eval_windows", "ckpt_every", "resume",
               "stop_after", "compile", "attention_kernel", "device", "progress",
               "probe_target", "probe_task", "networks_truth")


def shaping_settings(cfg) -> dict:
    """The run's settings a checkpoint records (JSON-safe)."""
    from dataclasses import asdict

    from ..data.store import store_fingerprint

    settings = {k: v for k, v in json.loads(json.dumps(asdict(cfg), default=str)).items()
                if k not in NOT_SHAPING}
    # the data by content, not by path: a store moved is the same, one rebuilt is not
    settings["store (its settings, manifest and scaler)"] = store_fingerprint(cfg.data)[:16]
    return settings


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list,
                    settings: dict | None = None) -> None:
    """last.pt, the one before it kept as previous.pt: a checkpoint cut short by a crash (or
    corrupted later) never loses the run. Written whole to a temporary file first."""
    from ..fileio import refuse_links, write_stream_atomic

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step,
             "history": json.dumps(history), "settings": json.dumps(settings or {})}
    refuse_links([path.parent], "a checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh temporary file (never a fixed name a link could be planted at), then renames:
    # a link planted at last.pt or previous.pt is moved or replaced, never written through
    try:
        write_stream_atomic(path.with_name("next.pt"), lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a C++ RuntimeError
        import shutil

        free = shutil.disk_usage(path.parent).free
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: cannot write the checkpoint ({first}); {free:,} bytes free "
                          "on its disk: is it full? (nothing half-written is left)") from None
    if path.exists() or path.is_symlink():
        os.replace(path, path.with_name("previous.pt"))
    os.replace(path.with_name("next.pt"), path)


def load_checkpoint(path: Path):
    """Tensors and plain containers only: weights_only=True never runs pickled code. A file
    that is not a whole checkpoint gets a message naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, not a checkpoint, or a refused pickle
        first = (str(exc).split(". ")[0].splitlines() or ["empty file"])[0][:200]
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})"
                          ) from None
    missing = {"model", "optimizer", "scheduler", "step", "history"} - set(state or {})
    if missing:
        raise ConfigError(f"{path}: not a brainlm checkpoint (no {', '.join(sorted(missing))})")
    return state


def resume_state(path: Path, settings: dict):
    """The checkpoint to continue from: last.pt, or previous.pt (with a warning) when the last
    one cannot be read; refused when the run's settings differ from the checkpoint's."""
    import warnings

    try:
        state = load_checkpoint(path)
    except ConfigError as exc:
        previous = path.with_name("previous.pt")
        if not previous.exists():
            raise
        state = load_checkpoint(previous)
        warnings.warn(f"{exc}; resuming from {previous} (step {int(state['step'])})",
                      stacklevel=2)
    saved = json.loads(state.get("settings") or "{}")
    differ = [f"{k}: {saved[k]!r} in the checkpoint, {settings.get(k)!r} now"
              for k in sorted(saved) if saved[k] != settings.get(k)]
    if differ:
        raise ConfigError(f"{path}: --resume with other settings than the checkpoint's:\n  "
                          + "\n  ".join(differ) + "\nresume with the checkpoint's settings, or "
                          "train into a new --out")
    return state


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a pretraining run is made of, built before the first step."""

    cfg: PretrainConfig
    store: object
    model: object  # BrainLMForPretraining (saved and evaluated)
    train_model: object  # the same, compiled and/or DDP-wrapped (stepped)
    optimizer: object
    scheduler: object
    train_ds: object
    sampler: object
    device: torch.device
    bf16: bool
    rank: int
    world: int
    micro: int  # windows per process and micro-step
    steps_per_epoch: int
    step: int = 0
    history: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # shaping_settings: recorded, checked on resume
    fitted: dict = field(default_factory=dict)  # the ladder's rungs fitted on training data

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def checkpoint(self) -> Path:
        return Path(self.cfg.out) / "checkpoints" / "last.pt"


def check_model_folder(cfg: PretrainConfig) -> None:
    """`--out` is a model folder: new, empty, or an earlier pretraining output (config.json or
    checkpoints/); never the store or a folder of other files it would write into."""
    from ..fileio import check_output, overlaps, refuse_links

    refuse_links([Path(cfg.out), Path(cfg.out) / "checkpoints"], "a model folder")
    check_output(cfg.out)
    out = Path(cfg.out).resolve()
    if overlaps(out, cfg.data):
        raise ConfigError(f"--out {cfg.out} overlaps the store {cfg.data}: write the model to "
                          "a separate folder")
    if out.is_file():
        raise ConfigError(f"--out {cfg.out} is a file, not a folder")
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")] \
        if out.is_dir() else []
    if entries and not {"config.json", "checkpoints"} & set(entries):
        raise ConfigError(f"--out {cfg.out} exists and is not a pretraining output (no "
                          "config.json or checkpoints/); choose an empty or new folder")


def build_run(cfg: PretrainConfig) -> Run:
    """Devices and processes, data, model, optimiser and schedule; resumed from the last
    checkpoint when asked."""
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    from ..data.store import BrainStore, WindowDataset

    rank, local_rank, world = dist_info()
    cfg.validate(world)
    check_model_folder(cfg)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    store = BrainStore(cfg.data)
    if cfg.probe_target and cfg.probe_target not in store.manifest.columns:
        raise ConfigError(f"--probe-target {cfg.probe_target}: no such column in {cfg.data}'s "
                          "manifest (phenotypes come from participants.tsv)")
    if not len(store.recordings("val")):
        raise ConfigError(f"{cfg.data}: the val split is empty; validation needs held-out "
                          "subjects (preprocess with a val fraction, e.g. --split 0.8,0.1,0.1)")
    model = _build_model(cfg, store).to(device)
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
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    run = Run(cfg, store, model, model, optimizer, scheduler, train_ds, sampler, device, bf16,
              rank, world, micro, steps_per_epoch, settings=shaping_settings(cfg))
    if model.prior is not None:
        fit_prior(model, store, cfg, run.fitted)
    _resume(run)
    if cfg.compile:
        run.train_model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.train_model = DDP(run.train_model,
                              device_ids=[local_rank] if device.type == "cuda" else None)
    return run


def _build_model(cfg: PretrainConfig, store):
    from ..model.config import BrainLMConfig
    from ..model.modeling import BrainLMForPretraining

    model_cfg = BrainLMConfig.from_preset(
        cfg.profile, window=cfg.window, patch_size=cfg.patch_size, mask_ratio=cfg.mask_ratio,
        mask_strategy=cfg.mask_strategy, future_patches=cfg.future_patches,
        parcel_coords=store.coords.round(3).tolist(), atlas=store.meta.get("atlas"),
        atlas_hash=store.meta.get("atlas_hash"), **cfg.model)
    model = BrainLMForPretraining(model_cfg)
    model.set_sdpa_kernel(cfg.attention_kernel)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    n_patches = cfg.window // cfg.patch_size
    model.masking(1, store.n_parcels, n_patches, cfg.mask_ratio, cfg.mask_strategy,
                  cfg.future_patches, None, "cpu")  # refuses all/none masked
    return model


def _resume(run: Run) -> None:
    previous = run.checkpoint.with_name("previous.pt")  # alone after a kill mid-rotation
    if run.cfg.resume and (run.checkpoint.exists() or previous.exists()):
        state = resume_state(run.checkpoint, run.settings)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.step, run.history = int(state["step"]), json.loads(state["history"])
    elif run.cfg.resume and run.rank == 0:
        print(f"no checkpoint at {run.checkpoint}: starting from step 0")


def _batches(run: Run):
    """Micro-batches from the current step on, epoch after epoch (a resumed run starts
    mid-epoch exactly where the uninterrupted one was)."""
    from torch.utils.data import DataLoader

    cfg = run.cfg
    while True:
        epoch = run.step // run.steps_per_epoch
        run.sampler.set_epoch(epoch)
        run.train_ds.set_epoch(epoch)
        skip = (run.step % run.steps_per_epoch) * run.micro * cfg.grad_accum
        loader = DataLoader(run.train_ds, batch_size=run.micro,
                            sampler=_ResumeSampler(run.sampler, skip), num_workers=cfg.workers,
                            pin_memory=run.device.type == "cuda", drop_last=True,
                            persistent_workers=False)
        for batch in loader:
            if run.step // run.steps_per_epoch != epoch:
                break  # the epoch's last full step is done: the leftover windows are dropped
            yield epoch, batch


def train_step(run: Run, batches, coords, length: int):
    """One optimiser step over grad_accum micro-batches; (loss, grad norm) stay on the device."""
    import torch.distributed as dist

    cfg, world = run.cfg, run.world
    loss_sum = torch.zeros((), device=run.device)
    for m in range(cfg.grad_accum):
        _, batch = next(batches)
        x = batch["signal"].to(run.device, non_blocking=True)
        noise = step_noise(cfg.seed, run.step, m, run.micro, length, run.rank, world)
        if run.device.type == "cuda":
            noise = noise.pin_memory()
        noise = noise.to(run.device, non_blocking=True)
        sync = m == cfg.grad_accum - 1 or world == 1
        with run.train_model.no_sync() if (world > 1 and not sync) else nullcontext():
            with run.autocast():
                loss = run.train_model(x, coords, noise=noise).loss / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    run.step += 1
    return loss_sum, grad_norm


def train(run: Run, tracker) -> dict:
    """The step loop up to max_steps (or stop_after more steps): history, periodic
    validation and checkpoints. Returns the last evaluation (empty if none ran)."""
    from tqdm.auto import tqdm

    cfg, model = run.cfg, run.model
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not cfg.progress or run.rank != 0,
               desc=f"pretrain {cfg.profile} mask {cfg.mask_ratio:g}", dynamic_ncols=True)
    coords = torch.as_tensor(run.store.coords, device=run.device)
    length = run.store.n_parcels * (cfg.window // cfg.patch_size)
    stop_at = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps,
                                                                 run.step + cfg.stop_after)
    last_eval, fitted, pending = {}, run.fitted, []
    batches = _batches(run)
    model.train()
    t0, windows_done = time.perf_counter(), 0
    while run.step < stop_at:
        loss, grad_norm = train_step(run, batches, coords, length)
        step = run.step
        windows_done += cfg.batch_size
        pending.append((step, loss, grad_norm, run.scheduler.get_last_lr()[0]))
        bar.update(1)
        eval_due = step % cfg.eval_every == 0 or step == cfg.max_steps
        ckpt_due = step % cfg.ckpt_every == 0 or step == stop_at
        # every rank settles at the same steps, so all stop together on a bad loss
        if len(pending) >= LOG_EVERY or eval_due or ckpt_due:
            records, problem = settle(pending, cfg.lr)  # the only wait for the device
            pending.clear()
            run.history.extend(records)
            tracker.metrics_steps([(r["step"], {k: v for k, v in r.items() if k != "step"})
                                   for r in records])
            if problem:
                raise ConfigError(problem)
            rate = windows_done / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", win_s=f"{rate:.1f}")
        if run.rank == 0 and eval_due:
            last_eval = evaluate(model, run.store, cfg, run.device, run.autocast, fitted)
            val = numeric_metrics(last_eval)
            run.history[-1].update(val)
            tracker.metrics(val, step=step)
        if run.rank == 0 and ckpt_due:
            save_checkpoint(run.checkpoint, model, run.optimizer, run.scheduler, step,
                            run.history, run.settings)
    bar.close()
    return {**last_eval, "fitted": fitted}


def _same_store(cfg: PretrainConfig, settings: dict) -> None:
    """The store the run trained on must still be the one at its path when the model folder
    is written (its scaler is copied in): a store rebuilt meanwhile is refused by name."""
    from ..data.store import store_fingerprint

    key = "store (its settings, manifest and scaler)"
    if store_fingerprint(cfg.data)[:16] != settings.get(key):
        raise ConfigError(f"{cfg.data}: the store was written again while this run trained on "
                          "it; its scaler would not be the one the model learned from. "
                          "Pretrain again on the new store (the checkpoints are kept)")


def pretrain(cfg: PretrainConfig, tracker=None) -> dict:
    """Build the run, train it, and when it reaches max_steps score it (validation, then the
    held-out test split once) and write the model folder. `tracker`: the job's MLflow run
    (`tracking.job_run`); None tracks nothing."""
    import torch.distributed as dist

    from ..tracking import Tracker

    tracker = tracker or Tracker("pretrain", enabled=False)
    run = build_run(cfg)
    tracker.params({"lr": cfg.lr, "n_parameters": sum(p.numel() for p in run.model.parameters()),
                    "atlas_hash": run.model.config.atlas_hash})
    last_eval = train(run, tracker)
    fitted = last_eval.pop("fitted")
    logged = set(numeric_metrics(last_eval))  # by this invocation, at its last step
    result = {"step": run.step, "finished": run.step >= cfg.max_steps, "history": run.history}
    if run.rank == 0 and run.step >= cfg.max_steps:
        if not last_eval:
            last_eval = evaluate(run.model, run.store, cfg, run.device, run.autocast, fitted)
        if len(run.store.recordings("test")):  # the held-out check, once, at the end
            held_out = evaluate(run.model, run.store, cfg, run.device, run.autocast, fitted,
                                split="test")
            last_eval = {**last_eval, **{k: v for k, v in held_out.items()
                                         if k.startswith("test_")}}
        _same_store(cfg, run.settings)
        write_outputs(run.model, run.store, cfg, Path(cfg.out), run.history, last_eval,
                      tracker, logged)
        result["metrics"] = numeric_metrics(last_eval)
        result["verdicts"] = {k: v for k, v in last_eval.items() if k.endswith("_verdict")}
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result
