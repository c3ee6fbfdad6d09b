"""The settings of pretraining and fine-tuning: one dataclass each, the one default of every
setting. Light on purpose (no torch): the command line builds its flags from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

# base learning rate per profile, scaled by batch / 256 (MAE's rule). tiny: 6e-3 at batch 8,
# from benchmarks/learning_curve.py on the demo store's validation split (8e-3 base, i.e.
# 2.5e-4 at batch 8, left the model at the mean for hundreds of steps)
BASE_LR = {"tiny": 0.192, "13m": 4e-3, "111m": 1.2e-3, "650m": 6e-4}


MASK_STRATEGIES = ("random", "parcel", "future", "time", "space")
PRECISIONS = ("auto", "fp32", "bf16")
PROBE_TASKS = ("regression", "classification")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} '{value}' must be one of {', '.join(allowed)}")


@dataclass
class PretrainConfig:
    data: Path
    out: Path
    profile: str = "tiny"
    mask_ratio: float = 0.75
    mask_strategy: str = "random"
    future_patches: int = 1
    window: int = 200
    patch_size: int = 20
    max_steps: int = 300
    batch_size: int = 32  # global, over processes and accumulation steps
    grad_accum: int = 1
    base_lr: float | None = None  # default per profile; lr = base_lr * batch_size / 256
    min_lr_ratio: float = 0.0
    warmup_steps: int | None = None  # default 5 % of max_steps
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    windows_per_recording: int = 8  # random windows per training recording per epoch
    seed: int = 0
    workers: int = 2
    eval_every: int = 100
    eval_windows: int = 64
    ckpt_every: int = 100
    resume: bool = False
    stop_after: int | None = None  # leave after this many steps in this invocation
    compile: bool = False
    attention_kernel: str = "auto"  # auto, flash, cudnn, efficient or math (a machine setting)
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    progress: bool = True
    model: dict = field(default_factory=dict)  # BrainLMConfig fields over the profile's preset
    probe_target: str | None = None  # a phenotype: linear probe of the finished encoder
    probe_task: str = "regression"  # or classification
    networks_truth: Path | None = None  # network per parcel (ground_truth.json or a table)

    @property
    def lr(self) -> float:
        base = self.base_lr if self.base_lr is not None else BASE_LR.get(self.profile, 1e-3)
        return base * self.batch_size / 256

    def validate(self, world: int) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size % (world * self.grad_accum):
            raise ConfigError(f"batch size {self.batch_size} is not divisible by processes "
                              f"({world}) x accumulation steps ({self.grad_accum})")
        from ..model.modeling import SDPA_KERNELS

        if self.attention_kernel not in SDPA_KERNELS:
            raise ConfigError(f"attention kernel '{self.attention_kernel}' must be one of "
                              f"{', '.join(SDPA_KERNELS)}")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("mask strategy", self.mask_strategy, MASK_STRATEGIES)
        _one_of("probe task", self.probe_task, PROBE_TASKS)
        for name in ("eval_every", "ckpt_every", "windows_per_recording", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_grad <= 0 or self.weight_decay < 0:
            raise ConfigError("clip_grad must be > 0 and weight_decay >= 0")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.mask_strategy != "future" and not self.mask_ratio > 0:
            raise ConfigError(f"mask ratio {self.mask_ratio} masks nothing: pretraining needs "
                              "a ratio in (0, 1)")
        if self.networks_truth is not None and not Path(self.networks_truth).is_file():
            raise ConfigError(f"--networks-truth {self.networks_truth}: no such file")
        check_device(self.device)


TASKS = ("regression", "classification", "forecast")
MODES = ("probe", "full")
POOLINGS = ("cls", "mean", "connectivity")  # brainlm.model.heads


def check_device(device: str) -> None:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', and present on this machine."""
    import re

    if device == "auto" or device == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?|mps", str(device)):
        raise ConfigError(f"--device {device!r} must be auto, cpu, cuda, cuda:N or mps")
    import torch

    here = torch.cuda.is_available() if device.startswith("cuda") else \
        torch.backends.mps.is_available()
    if not here:
        raise ConfigError(f"--device {device}: this machine (or this PyTorch build) has no "
                          f"{device.split(':')[0].upper()} device; use --device auto or cpu")


@dataclass
class FinetuneConfig:
    model: Path
    data: Path
    out: Path
    target: str | None = None  # a phenotype column (not needed for forecast)
    task: str = "regression"
    mode: str = "probe"  # probe | full
    pooling: str = "cls"  # cls | mean | connectivity (probe: the FC baseline's head)
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    head_dropout: float = 0.0
    patience: int = 5
    horizon: int = 20  # forecast: timepoints to predict
    windows_per_recording: int = 4  # full / forecast: random training windows per epoch
    window: int | None = None  # released weights only; ours know theirs
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        _one_of("task", self.task, TASKS)
        if self.task != "forecast" and not self.target:
            raise ConfigError(f"--target is needed for {self.task}")
        _one_of("mode", self.mode, MODES)
        _one_of("pooling", self.pooling, POOLINGS)
        if self.pooling == "connectivity" and self.mode != "probe":
            raise ConfigError("pooling 'connectivity' is a probe (its head is fitted in closed "
                              "form on the frozen encoder): use --mode probe")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay {self.layer_decay} must be in (0, 1]")
        if not 0 <= self.head_dropout < 1:
            raise ConfigError(f"head_dropout {self.head_dropout} must be in [0, 1)")
        for name in ("epochs", "batch_size", "patience", "horizon", "windows_per_recording"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.task == "forecast" and (self.target or self.pooling != "cls"):
            import warnings

            unused = " and ".join(f for f, on in ((f"--target {self.target}", self.target),
                                                  (f"--pooling {self.pooling}",
                                                   self.pooling != "cls")) if on)
            warnings.warn(f"{unused}: not used by forecasting (it predicts the recordings' "
                          "next timepoints from the context tokens)", stacklevel=2)
        check_device(self.device)
