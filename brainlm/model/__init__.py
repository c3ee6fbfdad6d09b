"""BrainLM models: our token model (Family A) and released ViTMAE checkpoints (Family B)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def load_model(path, coords=None, n_time: int | None = None):
    """A pretrained folder of either family, ready for `.embed(windows)`.

    Family A (`model_type: brainlm`, ours) carries its atlas coordinates; Family B
    (`model_type: vit_mae`, upstream's released 111M/650M) needs `coords` [P, 3] to order the
    canvas rows. Weights are read from safetensors or with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a model folder (config.json: {exc})") from None
    if model_type == "brainlm":
        from .modeling import BrainLMForPretraining

        return BrainLMForPretraining.from_pretrained(path, use_safetensors=True).eval()
    if model_type == "vit_mae":
        from .legacy import ReleasedBrainLM

        if coords is None:
            raise ConfigError(f"{path}: released ViTMAE weights need the parcel coordinates of "
                              "the data (a store provides them)")
        return ReleasedBrainLM.from_folder(path, coords, n_time=n_time or 200).eval()
    raise ConfigError(f"{path}: model_type {model_type!r} is neither 'brainlm' nor 'vit_mae'")


def is_released(model) -> bool:
    """Family B (`ReleasedBrainLM`) models carry a canvas layout; ours do not."""
    return hasattr(model, "layout")


def window_length(model) -> int:
    """Timepoints per window the model expects."""
    return int(model.layout.n_time) if is_released(model) else int(model.config.window)


def embed_windows(model, x, coords) -> dict:
    """{"cls", "mean"} of windows [B, P, T] for either family (ours takes the coordinates)."""
    return model.embed(x) if is_released(model) else model.embed(x, coords)
