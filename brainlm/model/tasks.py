"""Fine-tuned BrainLM models as transformers has them: the encoder and its task head in one
`PreTrainedModel`, written and read whole with `save_pretrained` / `from_pretrained`
(config.json + model.safetensors), so a fine-tuned folder is a model, not a head that needs
the pretrained folder it came from.

- `BrainLMForSequenceClassification`: one output per window from a pooled vector (`pooling`:
  cls, mean or connectivity; `heads.pooled`). `problem_type` "regression" (num_labels 1, the
  target standardised with `target_mean` / `target_std`) or "single_label_classification"
  (`id2label`: the classes in the order of the logits), as transformers' sequence models.
- `BrainLMForForecasting`: the next `horizon` timepoints of every parcel from the tokens of
  the window before them.

Both keep the pretraining model (encoder and decoder) as `brainlm`, the base model prefix,
so `from_pretrained(pretrained_folder, config=...)` (the folder's config with the task's
fields added) starts a task model from a pretrained encoder, the head at its initialisation.
The fine-tuning trainer builds one from its trained parts (`from_parts`) and saves it whole;
the predictor, the registry and serving load it from here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import ConfigError
from ..fileio import read_json
from .heads import ForecastHead, Head, context_ids, pooled, pooled_width
from .modeling import BrainLMForPretraining, BrainLMPreTrainedModel

TASK_ARCHITECTURES = ("BrainLMForSequenceClassification", "BrainLMForForecasting")


class BrainLMForSequenceClassification(BrainLMPreTrainedModel):
    """Encoder + pooling + linear head. Config fields beyond the encoder's: pooling,
    problem_type, num_labels / id2label, target_mean, target_std (regression)."""

    def __init__(self, config):
        super().__init__(config)
        self.brainlm = BrainLMForPretraining(config)
        self.pooling = getattr(config, "pooling", "cls")
        width = pooled_width(self.brainlm, self.pooling, len(config.parcel_coords))
        self.head = Head(width, config.num_labels, getattr(config, "head_dropout", 0.0))
        self.post_init()

    def forward(self, signals: torch.Tensor, coords=None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """signals: [B, P, T] scaled windows -> logits [B, num_labels] (the standardised
        target for regression); loss when `labels` ([B] class index, or [B] standardised
        target) are given."""
        if coords is None:
            coords = self.brainlm._coords(None, signals)
        logits = self.head(pooled(self.brainlm, signals, coords, self.pooling))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BrainLMForForecasting(BrainLMPreTrainedModel):
    """Encoder + per-parcel forecasting head. Config field beyond the encoder's: horizon."""

    def __init__(self, config):
        super().__init__(config)
        self.brainlm = BrainLMForPretraining(config)
        self.head = ForecastHead(config.hidden_size, config.horizon)
        self.post_init()

    def forward(self, signals: torch.Tensor, coords=None) -> torch.Tensor:
        """signals: [B, P, window] (the last `horizon` timepoints are not seen) ->
        [B, P, horizon]."""
        p = signals.shape[1]
        ids = context_ids(p, signals.shape[2], self.config.patch_size, self.config.horizon)
        hidden = self.brainlm.encode(signals, coords, ids.to(signals.device)
                                     .expand(signals.shape[0], -1))
        return self.head(hidden[:, 1:], p)


def from_parts(model: BrainLMForPretraining, head: torch.nn.Module, **task):
    """The task model holding a trained encoder and head (their weights copied): task is
    {"pooling", "classes", "target_mean", "target_std"} or {"horizon"}."""
    config = model.config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "id2label", "label2id"):
        config.pop(key, None)
    if "horizon" in task:
        cls, fields = BrainLMForForecasting, {"horizon": int(task["horizon"])}
    else:
        classes = task.get("classes")
        cls = BrainLMForSequenceClassification
        fields = {"pooling": task["pooling"], "head_dropout": 0.0}
        if classes:
            fields.update(problem_type="single_label_classification",
                          id2label={i: str(c) for i, c in enumerate(classes)},
                          label2id={str(c): i for i, c in enumerate(classes)})
        else:
            fields.update(problem_type="regression", num_labels=1,
                          target_mean=float(task["target_mean"]),
                          target_std=float(task["target_std"]))
    out = cls(type(model.config)(**{**config, **fields}))
    out.brainlm.load_state_dict(model.state_dict())
    out.head.load_state_dict(head.state_dict())
    return out.eval()


def is_task_folder(folder) -> bool:
    """A folder written by a task model's `save_pretrained` (config.json names one)."""
    try:
        config = read_json(Path(folder) / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(
        set(config.get("architectures") or []) & set(TASK_ARCHITECTURES))


def load_task_model(folder):
    """The fine-tuned model saved in `folder` (safetensors only), ready for inference."""
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'config.json'}: not a model configuration ({exc})") from None
    name = (config.get("architectures") or [None])[0]
    cls = {"BrainLMForSequenceClassification": BrainLMForSequenceClassification,
           "BrainLMForForecasting": BrainLMForForecasting}.get(name)
    if cls is None:
        raise ConfigError(f"{folder / 'config.json'}: architecture {name!r} is not a BrainLM "
                          f"task model ({', '.join(TASK_ARCHITECTURES)})")
    from . import checked_weights

    try:
        return checked_weights(folder, *cls.from_pretrained(
            folder, use_safetensors=True, output_loading_info=True)).eval()
    except ConfigError:
        raise
    except Exception as exc:  # missing or damaged weights, a config that does not fit them
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{folder}: cannot load the fine-tuned model ({first[:300]})") from None
