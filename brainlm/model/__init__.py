"""BrainLM models: our token model (Family A) and released ViTMAE checkpoints (Family B)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..fileio import read_json


def load_model(path, coords=None, n_time: int | None = None):
    """A pretrained folder of either family, ready for `.embed(windows)`.

    Family A (`model_type: brainlm`, ours) carries its atlas coordinates; Family B
    (`model_type: vit_mae`, upstream's released 111M/650M) needs `coords` [P, 3] to order the
    canvas rows. Weights are read from safetensors or with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    try:
        config = read_json(path / "config.json")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a model folder (config.json: {exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path / 'config.json'}: not a model configuration (a JSON object)")
    model_type = config.get("model_type")
    if model_type not in ("brainlm", "vit_mae"):
        raise ConfigError(f"{path}: model_type {model_type!r} is neither 'brainlm' nor "
                          "'vit_mae'")
    if model_type == "vit_mae" and coords is None:
        raise ConfigError(f"{path}: released ViTMAE weights need the parcel coordinates of "
                          "the data (a store provides them)")
    try:
        if model_type == "brainlm":
            from .modeling import BrainLMForPretraining

            return checked_weights(path, *BrainLMForPretraining.from_pretrained(
                path, use_safetensors=True, output_loading_info=True)).eval()
        from .legacy import ReleasedBrainLM

        return ReleasedBrainLM.from_folder(path, coords, n_time=n_time or 200).eval()
    except ConfigError as exc:  # a config value the model refuses: name the file
        if str(path) in str(exc):
            raise
        raise ConfigError(f"{path / 'config.json'}: {exc}") from None
    except Exception as exc:  # missing or damaged weights, a config that does not fit them
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: cannot load the model ({first[:300]}): the folder must "
                          "hold the config.json and model.safetensors that saved it") from None


def checked_weights(path, model, info: dict):
    """`model` once its weights file filled every parameter and buffer with finite values:
    transformers would otherwise start missing or mis-shaped weights at random, and a
    non-finite weight would give NaN embeddings, both without a word."""
    import torch

    problems = [f"{what} {', '.join(sorted(keys)[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing", info.get("missing_keys") or []),
                                   ("unexpected", info.get("unexpected_keys") or []),
                                   ("of another shape", [k[0] if isinstance(k, tuple) else k
                                                         for k in info.get("mismatched_keys")
                                                         or []]))
                if keys]
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        problems.append(f"non-finite values in {', '.join(bad[:5])}")
    if problems:
        raise ConfigError(f"{path}: the weights do not fit the model ({'; '.join(problems)}); "
                          "the folder must hold the model.safetensors its config.json was "
                          "saved with")
    return model


def is_released(model) -> bool:
    """Family B (`ReleasedBrainLM`) models carry a canvas layout; ours do not."""
    return hasattr(model, "layout")


def window_length(model) -> int:
    """Timepoints per window the model expects."""
    return int(model.layout.n_time) if is_released(model) else int(model.config.window)


def embed_windows(model, x, coords) -> dict:
    """{"cls", "mean"} of windows [B, P, T] for either family (ours takes the coordinates)."""
    return model.embed(x) if is_released(model) else model.embed(x, coords)
