"""Family B: the released BrainLM checkpoints (`vitmae_111M`, `vitmae_650M`).

Upstream published these as plain Hugging Face `ViTMAEForPreTraining` models that see a
recording window as an *image*: the [parcels, time] window is sorted by the parcels' y
coordinate, divided by a constant, copied to 3 channels and padded with -1 to a square
canvas. This module reproduces that geometry exactly (so the released weights see what they
were trained on) and wraps the model so the rest of the project can treat it like our own
[batch, parcels, time] model. The canvas geometry itself is in `brainlm.model.canvas`
(re-exported here); this module holds the checkpoints' configs, their safe loading and
`ReleasedBrainLM`.

Geometry of the released models (window [424 parcels, 200 timepoints]):

    111M: canvas 432 x 432, patch 16 -> 27 x 27 patches, pad rows 4/4, pad columns 116/116
    650M: canvas 434 x 434, patch 14 -> 31 x 31 patches, pad rows 5/5, pad columns 117/117

The forecast horizon is quantised by the patch grid: masking whole patch columns at the
end of the data region hides 12 / 28 / 44 ... timepoints on 111M (columns start at
t = 16k - 4) and 9 / 23 / 37 ... on 650M.
"""

from __future__ import annotations

import json
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from brainlm.errors import ConfigError

from .canvas import (PAD_VALUE, UPSTREAM_SCALE, CanvasLayout, _check_batch, _square_canvas,
                     from_canvas, patch_mask_to_pixels, patchify, pixel_loss, region_mask,
                     to_canvas, unpatchify)

__all__ = [
    "UPSTREAM_SCALE",
    "PAD_VALUE",
    "KNOWN_CANVASES",
    "released_config",
    "CanvasLayout",
    "to_canvas",
    "from_canvas",
    "patchify",
    "unpatchify",
    "region_mask",
    "patch_mask_to_pixels",
    "pixel_loss",
    "load_released",
    "save_random_released",
    "ReleasedBrainLM",
]

KNOWN_CANVASES = {(432, 16): "111m", (434, 14): "650m"}
"""(image_size, patch_size) of the released checkpoints."""

_RELEASED = {
    "111m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, image_size=432, patch_size=16),
    "650m": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                 intermediate_size=5120, image_size=434, patch_size=14),
}


def _size_key(size: str) -> str:
    key = str(size).strip().lower()
    key = key.removeprefix("vitmae_").removeprefix("vitmae-")
    if key not in _RELEASED:
        raise ConfigError(f"unknown released BrainLM size {size!r}: choose one of "
                          f"{sorted(_RELEASED)}")
    return key


def released_config(size: str) -> ViTMAEConfig:
    """The `ViTMAEConfig` of a released checkpoint ("111m" or "650m", case-insensitive).

    Lets us build the exact architecture without the hub (which is unreachable here); both
    share the MAE decoder 512 hidden / 8 layers / 16 heads / MLP 2048, 3 channels, mask ratio
    0.75 and un-normalised pixel loss.
    """
    shape = _RELEASED[_size_key(size)]
    return ViTMAEConfig(
        **shape,
        num_channels=3,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
        mask_ratio=0.75,
        norm_pix_loss=False,
    )


def _check_released_config(config, where: str, n_parcels: int, n_time: int) -> None:
    if not isinstance(config, ViTMAEConfig):
        raise ConfigError(f"{where}: expected a ViTMAE config (model_type 'vit_mae'), got "
                          f"{type(config).__name__}")
    try:
        size, patch = _square_canvas(config)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if (size, patch) in KNOWN_CANVASES:
        return
    if size < n_parcels or size < n_time:
        raise ConfigError(
            f"{where}: canvas {size}x{size} (patch {patch}) is neither a released BrainLM "
            f"canvas {sorted(KNOWN_CANVASES)} (image_size, patch_size) nor large enough for a "
            f"{n_parcels} x {n_time} window")


def _torch_load_weights(path: Path) -> dict:
    """Read a `.bin` state dict without running pickled code (weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError,
            TypeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: refused to load: the file is not a plain tensor state dict "
                          f"(weights-only unpickling failed: {first}); convert it to "
                          "model.safetensors from a trusted environment") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConfigError(f"{path}: not a state dict of named tensors")
    return state


def _bin_state_dict(folder: Path) -> dict | None:
    index = folder / "pytorch_model.bin.index.json"
    single = folder / "pytorch_model.bin"
    if single.is_file():
        return _torch_load_weights(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{index}: unreadable shard index ({exc})") from None
        state = {}
        for name in shards:
            shard = (folder / name).resolve()
            if shard.parent != folder.resolve() or not shard.is_file():
                raise ConfigError(f"{index}: shard {name!r} is missing or outside {folder}")
            state.update(_torch_load_weights(shard))
        return state
    return None


def load_released(folder, n_parcels: int = 424, n_time: int = 200) -> ViTMAEForPreTraining:
    """Load a released (or `save_random_released`) checkpoint from a local folder, in eval mode.

    Never unpickles arbitrary objects and never touches the network: `model.safetensors`
    (single or sharded) goes through transformers with `use_safetensors=True`; a
    `pytorch_model.bin` is read by us with `torch.load(weights_only=True)` and handed to
    transformers as a state dict (so legacy key names are renamed as for any checkpoint).
    `n_parcels` / `n_time` only matter for canvases other than the two released ones.

    Raises:
        `ConfigError` naming the folder or file: no config, not ViTMAE, canvas unusable, no
        weights, unsafe `.bin`, missing or wrongly shaped weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder with a released BrainLM checkpoint")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json, so this is not a Hugging Face checkpoint")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "vit_mae":
        raise ConfigError(f"{config_path}: model_type is {model_type!r}, expected 'vit_mae' "
                          "(a released BrainLM ViTMAE checkpoint)")
    try:
        config = ViTMAEConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # strict-dataclass validation, bad values
        raise ConfigError(f"{config_path}: invalid ViTMAE config ({exc})") from None
    _check_released_config(config, str(folder), n_parcels, n_time)

    common = dict(config=config, dtype=torch.float32, output_loading_info=True)
    has_safetensors = ((folder / "model.safetensors").is_file()
                       or (folder / "model.safetensors.index.json").is_file())
    try:
        if has_safetensors:
            model, info = ViTMAEForPreTraining.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, **common)
        else:
            state = _bin_state_dict(folder)
            if state is None:
                found = sorted(p.name for p in folder.iterdir())
                raise ConfigError(f"{folder}: no model.safetensors or pytorch_model.bin "
                                  f"(found: {', '.join(found) or 'nothing'})")
            model, info = ViTMAEForPreTraining.from_pretrained(None, state_dict=state, **common)
    except ConfigError:
        raise
    except (RuntimeError, OSError, ValueError) as exc:  # size mismatch, corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{folder}: the weights do not load into the ViTMAE of its "
                          f"config.json ({first})") from None
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = (missing + mismatched)[:5]
        raise ConfigError(f"{folder}: checkpoint lacks or mis-shapes {len(missing) + len(mismatched)} "
                          f"weights of its config (e.g. {', '.join(bad)})")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        warnings.warn(f"{folder}: ignored {len(unexpected)} unexpected weights "
                      f"(e.g. {', '.join(unexpected[:3])})", stacklevel=2)
    return model.eval()


def save_random_released(folder, size: str | ViTMAEConfig = "111m", seed: int = 0) -> Path:
    """Write a randomly initialised released-shape checkpoint (safetensors + config.json).

    For tests and demos while the hub is unreachable. `size` may also be a `ViTMAEConfig` (a
    tiny one for fast tests). The global torch RNG is left untouched.
    """
    config = size if isinstance(size, ViTMAEConfig) else released_config(size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTMAEForPreTraining(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


class ReleasedBrainLM(torch.nn.Module):
    """A released ViTMAE checkpoint behind our [batch, parcels, time] interface.

    Args:
        vit_model (`ViTMAEForPreTraining`): e.g. from `load_released`.
        coords (`np.ndarray` or `torch.Tensor` of shape `(parcels, 3)`): MNI x, y, z of the
            parcels in the order the signals use; fixes the canvas row order.
        n_time (`int`): window length (200 for the released models).
    """

    def __init__(self, vit_model: ViTMAEForPreTraining, coords, n_time: int = 200):
        super().__init__()
        if not isinstance(vit_model, ViTMAEForPreTraining):
            raise ConfigError(f"ReleasedBrainLM needs a transformers ViTMAEForPreTraining, got "
                              f"{type(vit_model).__name__}")
        self.model = vit_model
        self.layout = CanvasLayout.from_config(vit_model.config, coords, n_time=n_time)
        self.hidden_size = int(vit_model.config.hidden_size)

    @classmethod
    def from_folder(cls, folder, coords, n_time: int = 200) -> "ReleasedBrainLM":
        """`load_released(folder)` wrapped for `coords` [parcels, 3]."""
        n_parcels = int(np.shape(coords)[0])
        return cls(load_released(folder, n_parcels=n_parcels, n_time=n_time), coords, n_time)

    @contextmanager
    def _mask_ratio(self, ratio: float | None):
        """Temporarily set the mask ratio ViTMAE reads from its config at call time."""
        if ratio is None:
            yield
            return
        ratio = float(ratio)  # the strict ViTMAEConfig rejects ints (even 0)
        configs = {id(c): c for c in (self.model.config, self.model.vit.embeddings.config)}
        saved = {k: c.mask_ratio for k, c in configs.items()}
        try:
            for c in configs.values():
                c.mask_ratio = ratio
            yield
        finally:
            for k, c in configs.items():
                c.mask_ratio = saved[k]

    def _canvas(self, signals) -> torch.Tensor:
        param = next(self.model.parameters())
        signals = _check_batch(signals, self.layout, type(self).__name__)
        return to_canvas(signals.to(device=param.device, dtype=param.dtype), self.layout)

    def forecast_noise(self, batch: int, future_patches: int, device=None):
        """Noise that makes ViTMAE mask exactly the last `future_patches` data patch columns.

        Returns `(noise [batch, L], mask_ratio, patch_mask [L] bool)`. Observed patches get
        noise below 1, forecast patches at least 1 (both increasing with the patch index),
        so the argsort keeps all observed patches first in a fixed order.
        """
        lay = self.layout
        columns = list(lay.data_patch_columns())
        k = int(future_patches)
        if not 1 <= k < len(columns):
            raise ConfigError(f"future_patches={future_patches}: the window spans {len(columns)} "
                              f"patch columns; choose 1 to {len(columns) - 1}")
        grid_cols = torch.arange(lay.num_patches, device=device) % lay.grid
        future = grid_cols >= columns[-k]
        future &= grid_cols <= columns[-1]
        n_masked = int(future.sum())
        order = torch.arange(lay.num_patches, device=device, dtype=torch.float32) / lay.num_patches
        noise = (order + future.float()).expand(batch, -1).clone()
        # ViTMAE keeps int(L * (1 - ratio)) patches; the half step makes that exactly L - n_masked
        ratio = (n_masked - 0.5) / lay.num_patches
        return noise, ratio, future

    def forward(self, signals, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                future_patches: int = 0) -> dict:
        """Mask, reconstruct and score a batch of windows.

        Args:
            signals (`torch.Tensor` of shape `(batch, parcels, time)`): robust-scaled windows.
            mask_ratio (`float`, *optional*): overrides config.mask_ratio for this call.
            noise (`torch.Tensor` of shape `(batch, L)`, *optional*): ViTMAE's shuffle noise
                (lowest values are kept) for reproducible random masks.
            future_patches (`int`): if > 0, forecasting mode: mask exactly the last this many
                patch columns that overlap the window (excludes `mask_ratio` and `noise`).

        Returns:
            dict with
            - `loss` (scalar): MSE over masked in-window pixels (`pixel_loss`).
            - `reconstruction` (`(batch, parcels, time)`): the decoder's prediction for every
              timepoint, in signal units (masked or not; trust it where `mask` is True).
            - `mask` (`(batch, parcels, time)`, bool): True where the value was hidden.
        """
        canvas = self._canvas(signals)
        expected = None
        if future_patches:
            if mask_ratio is not None or noise is not None:
                raise ConfigError("future_patches fixes the mask; do not pass mask_ratio or noise")
            noise, mask_ratio, expected = self.forecast_noise(canvas.shape[0], future_patches,
                                                              device=canvas.device)
        elif mask_ratio is not None and not 0.0 <= float(mask_ratio) < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        with self._mask_ratio(mask_ratio):
            out = self.model(pixel_values=canvas, noise=noise)
        if expected is not None and not torch.equal(out.mask > 0.5, expected.expand_as(out.mask)):
            raise RuntimeError("ViTMAE did not apply the forecasting mask as built; its "
                               "random_masking changed (transformers " +
                               transformers.__version__ + ")")
        pixels = patch_mask_to_pixels(out.mask, self.layout)
        inverse = torch.as_tensor(self.layout.inverse_order(), device=pixels.device)
        mask = pixels[:, self.layout.rows, self.layout.cols][:, inverse, :]
        return {
            "loss": pixel_loss(out, canvas, self.layout),
            "reconstruction": from_canvas(unpatchify(out.logits, self.layout), self.layout),
            "mask": mask,
        }

    def embed(self, signals) -> dict:
        """Deterministic embeddings of whole (unmasked) windows.

        Runs the encoder only, with mask ratio 0 and a fixed increasing `noise`, so no patch
        is dropped and the token order is the patch order. Identical inputs give identical
        outputs (dropout is 0 in the released configs; call `.eval()` otherwise).

        Args:
            signals (`torch.Tensor` of shape `(batch, parcels, time)`).

        Returns:
            dict with `cls` (`(batch, hidden)`): the CLS token, and `mean` (`(batch, hidden)`):
            the mean over patch tokens that overlap the window (the pure-padding patches, about
            half the canvas, are left out).
        """
        canvas = self._canvas(signals)
        lay = self.layout
        noise = torch.arange(lay.num_patches, device=canvas.device, dtype=torch.float32)
        noise = noise.expand(canvas.shape[0], -1)
        with self._mask_ratio(0.0):
            hidden = self.model.vit(pixel_values=canvas, noise=noise).last_hidden_state
        grid_rows = torch.arange(lay.num_patches, device=hidden.device) // lay.grid
        grid_cols = torch.arange(lay.num_patches, device=hidden.device) % lay.grid
        rows, cols = lay.data_patch_rows(), lay.data_patch_columns()
        inside = ((grid_rows >= rows.start) & (grid_rows < rows.stop)
                  & (grid_cols >= cols.start) & (grid_cols < cols.stop))
        patches = hidden[:, 1:, :]
        return {"cls": hidden[:, 0, :], "mean": patches[:, inside, :].mean(dim=1)}
