"""The upstream canvas: where a [parcels, time] window sits on a released ViTMAE's image.

The released BrainLM checkpoints see a window as an image: rows sorted by the parcels' y
coordinate, values divided by `UPSTREAM_SCALE`, copied to every channel and padded with
`PAD_VALUE` to a square canvas. `CanvasLayout` holds that geometry for one model and parcel
set; `to_canvas` / `from_canvas`, `patchify` / `unpatchify`, the masks and `pixel_loss`
(upstream's loss: masked in-window pixels only) work on it. The checkpoints themselves and
the model wrapper are in `brainlm.model.legacy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from brainlm.errors import ConfigError, OrientationError

UPSTREAM_SCALE = 5.6430855
"""Upstream divides every (already robust-scaled) value by this constant before padding."""

PAD_VALUE = -1.0
"""Canvas value outside the recording window (in canvas units, i.e. after the scale)."""



def _square_canvas(config) -> tuple[int, int]:
    """(canvas side, patch side) of a ViTMAE config; HF ViTMAE only patchifies squares."""
    def side(value, what):
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or int(value[0]) != int(value[1]):
                raise ConfigError(f"ViTMAE {what} {value!r} is not square; the released "
                                  "BrainLM canvas is square")
            value = value[0]
        return int(value)

    size = side(config.image_size, "image_size")
    patch = side(config.patch_size, "patch_size")
    if patch <= 0 or size % patch:
        raise ConfigError(f"ViTMAE image_size {size} is not a multiple of patch_size {patch}")
    return size, patch


def _split(total: int) -> tuple[int, int]:
    """Centred padding: the odd extra one goes to the end (bottom / right), like upstream."""
    return total // 2, total - total // 2


@dataclass(eq=False)
class CanvasLayout:
    """Where a [parcels, time] window sits on the square ViTMAE canvas.

    Canvas row `top + r` holds parcel `order[r]` (parcels sorted by ascending y, stable so
    tied parcels keep their atlas order); canvas column `left + t` holds timepoint `t`.

    Attributes:
        canvas_size (`int`): side S of the square canvas (config.image_size).
        patch_size (`int`): side of one ViT patch.
        n_parcels (`int`): P, rows of the window.
        n_time (`int`): T, columns of the window.
        order (`np.ndarray` of shape `(P,)`, int64): stable argsort of the parcels' y.
        top, left (`int`): padding rows above / columns left of the window.
        n_channels (`int`): channels of the canvas (the window is repeated into each).
        scale (`float`): signals are divided by this before going on the canvas.
    """

    canvas_size: int
    patch_size: int
    n_parcels: int
    n_time: int
    order: np.ndarray
    top: int
    left: int
    n_channels: int = 3
    scale: float = UPSTREAM_SCALE

    @classmethod
    def from_config(cls, config, coords, n_time: int = 200,
                    scale: float = UPSTREAM_SCALE) -> "CanvasLayout":
        """Build the layout for `config` (a `ViTMAEConfig`) and parcel `coords` [P, 3] (MNI x, y, z).

        Raises `ConfigError` when the window does not fit the canvas or the inputs are unusable.
        """
        size, patch = _square_canvas(config)
        coords = coords.detach().cpu().numpy() if torch.is_tensor(coords) else np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise ConfigError(f"parcel coordinates must be [parcels, 3] (x, y, z), got shape "
                              f"{tuple(coords.shape)}")
        if not np.all(np.isfinite(coords)):
            raise ConfigError("parcel coordinates contain NaN or inf")
        n_parcels, n_time = int(coords.shape[0]), int(n_time)
        if n_parcels < 1 or n_time < 1:
            raise ConfigError(f"empty window: {n_parcels} parcels x {n_time} timepoints")
        if n_parcels > size or n_time > size:
            raise ConfigError(f"a window of {n_parcels} parcels x {n_time} timepoints does not "
                              f"fit the {size}x{size} ViTMAE canvas (image_size {size})")
        if not np.isfinite(scale) or scale == 0:
            raise ConfigError(f"canvas scale must be a finite non-zero number, got {scale}")
        order = np.argsort(coords[:, 1], kind="stable").astype(np.int64)
        return cls(canvas_size=size, patch_size=patch, n_parcels=n_parcels, n_time=n_time,
                   order=order, top=_split(size - n_parcels)[0], left=_split(size - n_time)[0],
                   n_channels=int(getattr(config, "num_channels", 3)), scale=float(scale))

    @property
    def bottom(self) -> int:
        return self.canvas_size - self.top - self.n_parcels

    @property
    def right(self) -> int:
        return self.canvas_size - self.left - self.n_time

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.canvas_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.n_parcels)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.n_time)

    def data_patch_columns(self) -> range:
        """Patch-grid columns that overlap the window's timepoints, left to right."""
        first = self.left // self.patch_size
        last = (self.left + self.n_time - 1) // self.patch_size
        return range(first, last + 1)

    def data_patch_rows(self) -> range:
        """Patch-grid rows that overlap the window's parcels, top to bottom."""
        first = self.top // self.patch_size
        last = (self.top + self.n_parcels - 1) // self.patch_size
        return range(first, last + 1)

    def inverse_order(self) -> np.ndarray:
        """`inverse_order()[p]` is the window row (after `top`) holding parcel p."""
        return np.argsort(self.order, kind="stable")


def _check_batch(signals, layout: CanvasLayout, where: str) -> torch.Tensor:
    signals = torch.as_tensor(signals)
    if signals.ndim != 3:
        raise OrientationError(f"{where}: expected [batch, parcels, time], got shape "
                               f"{tuple(signals.shape)}")
    _, p, t = signals.shape
    if (p, t) != (layout.n_parcels, layout.n_time):
        hint = " (looks transposed)" if (t, p) == (layout.n_parcels, layout.n_time) else ""
        raise OrientationError(f"{where}: expected [batch, parcels={layout.n_parcels}, "
                               f"time={layout.n_time}], got shape {tuple(signals.shape)}{hint}")
    return signals


def to_canvas(signals: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """Put a batch of windows on the upstream canvas.

    Args:
        signals (`torch.Tensor` of shape `(batch, parcels, time)`): robust-scaled windows in
            atlas parcel order.
        layout (`CanvasLayout`): geometry of the target model.

    Returns:
        `torch.Tensor` of shape `(batch, channels, S, S)`: y-sorted rows, divided by
        `layout.scale`, repeated over channels, -1 everywhere outside the window.
    """
    signals = _check_batch(signals, layout, "to_canvas")
    if not signals.is_floating_point():
        signals = signals.float()
    s = layout.canvas_size
    canvas = signals.new_full((signals.shape[0], layout.n_channels, s, s), PAD_VALUE)
    order = torch.as_tensor(layout.order, device=signals.device)
    canvas[:, :, layout.rows, layout.cols] = (signals[:, order, :] / layout.scale).unsqueeze(1)
    return canvas


def from_canvas(canvas: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """Undo `to_canvas`: crop the window, average the channels, un-sort rows, undo the scale.

    The channel *mean* is used (not channel 0): the model predicts the three copies
    independently, so averaging them is the better estimate and still exact for an input canvas.

    Args:
        canvas (`torch.Tensor` of shape `(batch, channels, S, S)` or `(batch, S, S)`).
        layout (`CanvasLayout`).

    Returns:
        `torch.Tensor` of shape `(batch, parcels, time)` in atlas parcel order.
    """
    canvas = torch.as_tensor(canvas)
    s = layout.canvas_size
    if canvas.ndim == 4 and canvas.shape[-2:] == (s, s):
        canvas = canvas.mean(dim=1)
    elif not (canvas.ndim == 3 and canvas.shape[-2:] == (s, s)):
        raise OrientationError(f"from_canvas: expected [batch, channels, {s}, {s}] or "
                               f"[batch, {s}, {s}], got shape {tuple(canvas.shape)}")
    window = canvas[:, layout.rows, layout.cols]
    inverse = torch.as_tensor(layout.inverse_order(), device=canvas.device)
    return window[:, inverse, :] * layout.scale


def patchify(canvas: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """[batch, C, S, S] -> [batch, L, patch**2 * C], in HF ViTMAE's order (row-major patches,
    then pixel row, pixel column, channel)."""
    b, c, g, p = canvas.shape[0], layout.n_channels, layout.grid, layout.patch_size
    x = canvas.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, g * g, p * p * c)


def unpatchify(patches: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """Inverse of `patchify`: [batch, L, patch**2 * C] -> [batch, C, S, S]."""
    b, c, g, p = patches.shape[0], layout.n_channels, layout.grid, layout.patch_size
    if patches.shape[1:] != (g * g, p * p * c):
        raise OrientationError(f"unpatchify: expected [batch, {g * g}, {p * p * c}], got shape "
                               f"{tuple(patches.shape)}")
    x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


def region_mask(layout: CanvasLayout, device=None) -> torch.Tensor:
    """`torch.bool` of shape `(S, S)`: True on the un-padded [parcels, time] window."""
    s = layout.canvas_size
    inside = torch.zeros(s, s, dtype=torch.bool, device=device)
    inside[layout.rows, layout.cols] = True
    return inside


def patch_mask_to_pixels(mask: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """ViTMAE's patch mask [batch, L] (1 = masked) -> `torch.bool` pixel mask [batch, S, S]."""
    g, p = layout.grid, layout.patch_size
    m = mask.reshape(mask.shape[0], g, g) > 0.5
    return m.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)


def _field(output, name):
    return output[name] if isinstance(output, dict) else getattr(output, name)


def pixel_loss(model_output, canvas: torch.Tensor, layout: CanvasLayout) -> torch.Tensor:
    """Upstream's loss: MSE over masked pixels inside the window, all channels.

    ViTMAE's own `loss` also scores the -1 padding inside masked patches (55 % of the canvas
    on the released models), which upstream excludes.

    Args:
        model_output: a `ViTMAEForPreTrainingOutput` (or dict) with `logits`
            [batch, L, patch**2 * C] and `mask` [batch, L] (1 = masked).
        canvas (`torch.Tensor` of shape `(batch, C, S, S)`): the input canvas (the target).
        layout (`CanvasLayout`).

    Returns:
        Scalar tensor; 0 when no in-window pixel is masked (ViTMAE would return NaN there).
    """
    pred = unpatchify(_field(model_output, "logits"), layout)
    target = canvas.to(pred.dtype)
    keep = patch_mask_to_pixels(_field(model_output, "mask"), layout)
    keep = keep & region_mask(layout, device=keep.device)
    weight = keep.unsqueeze(1).to(pred.dtype)  # [batch, 1, S, S], broadcast over channels
    total = ((pred - target) ** 2 * weight).sum()
    count = weight.sum() * pred.shape[1]
    return total / count.clamp(min=1)
