"""BrainLM masked autoencoder (Family A), readable in one sitting.

A window [B, P, T] becomes L = P * N tokens (N = T / patch_size time patches per parcel, token
index p * N + n). Each token embeds its patch, its parcel's coordinates and its time index.
The encoder sees the CLS token and the visible tokens only; the decoder sees
[CLS, visible, mask tokens] and predicts the masked patches; the loss is MSE on those.

Speed comes from what is not done:
- no unshuffle: attention does not care about sequence order and every token carries its own
  position embedding, so the decoder runs on [CLS, visible..., masked...] as they come and the
  masked tokens are a contiguous tail (no scatter/gather of the 4,241-token sequence);
- the last decoder block computes queries, MLP and the prediction head for that tail only;
- visible counts are the same for every window of a batch: no padding, static shapes;
- positions are rows of one [L, D] table looked up by token index (`F.embedding`), so neither
  the forward nor the backward materialises a [B, L, D] copy of the table; a masked token's
  decoder input (position + mask token) is one row of that table;
- in eager mode the coordinates saved in the config and the time encoding are cached on the
  device (no host-to-device copy per step); compiled graphs compute them as constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..errors import ConfigError
from .attention import SDPA_KERNELS, Attention, SpaceBias, TimeBias, TokenGeometry
from .config import BrainLMConfig, check_mask
from .prior import LinearPrior

# the attention layers live in .attention; these names stay importable from here
__all__ = ["SDPA_KERNELS", "Attention", "Block", "BrainLMForPretraining",
           "BrainLMPreTrainedModel", "BrainLMPretrainingOutput", "InputDtypeLayerNorm",
           "SpaceBias", "Stack", "TimeBias", "TokenEmbedding", "TokenGeometry",
           "sinusoidal", "take_rows"]


@dataclass
class BrainLMPretrainingOutput(ModelOutput):
    """loss: scalar MSE on masked patches (None when nothing is masked).
    pred: [B, n_mask, patch_size] predictions for the tokens in `ids_mask` order.
    ids_keep: [B, n_keep] visible token indices; ids_mask: [B, n_mask] masked ones.
    encoder_hidden: [B, 1 + n_keep, H] encoder output (CLS first)."""

    loss: torch.Tensor | None = None
    pred: torch.Tensor | None = None
    ids_keep: torch.Tensor | None = None
    ids_mask: torch.Tensor | None = None
    encoder_hidden: torch.Tensor | None = None


def sinusoidal(n: int, dim: int, device=None, base: float = 10000.0) -> torch.Tensor:
    """[n, dim] fixed sin/cos encoding of positions 0..n-1 (any window length)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(base) / dim))
    enc = torch.zeros(n, dim, device=device)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return enc


class InputDtypeLayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype under autocast.

    CUDA autocast runs layer_norm in fp32: a bf16 residual stream would be normalised into an
    fp32 [B, S, D] tensor, only for the next linear layer to cast it back to bf16 (two extra
    passes over the activations, forward and backward). The kernel accumulates in fp32 either
    way (CUDA's kernel wants its weights in the input's dtype: they are cast, as autocast
    casts a linear layer's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype),
                                    self.bias.to(x.dtype), self.eps)
        return super().forward(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, dim: int, heads: int, mlp: int, eps: float, eager: bool = False,
                 layout: str | None = None, **bias):
        super().__init__()
        self.norm1 = InputDtypeLayerNorm(dim, eps=eps)  # feeds a linear layer only
        self.attn = Attention(dim, heads, eager, layout=layout, **bias)
        self.norm2 = InputDtypeLayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor, q_start: int = 0, kv_stop: int | None = None,
                geo: TokenGeometry | None = None) -> torch.Tensor:
        x = x[:, q_start:] + self.attn(self.norm1(x), q_start, kv_stop, geo)
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """Blocks and a final norm; `factorised`: the blocks alternate attention within one time
    patch ("space") and within one parcel ("time"), as factorised video transformers do."""

    def __init__(self, dim, layers, heads, mlp, eps, eager, factorised: bool = False, **bias):
        super().__init__()
        layouts = [("space", "time")[i % 2] if factorised else None for i in range(layers)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, eps, eager, layout, **bias)
                                    for layout in layouts)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, last_q_start: int = 0, last_kv_stop: int | None = None,
                geo: TokenGeometry | None = None) -> torch.Tensor:
        """The last block computes queries for tokens last_q_start.. only, attending to
        tokens ..last_kv_stop (all when None). geo feeds the attention biases."""
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            q_start, kv_stop = (last_q_start, last_kv_stop) if last else (0, None)
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, q_start, kv_stop, geo)
            else:
                x = block(x, q_start, kv_stop, geo)
        return self.norm(x)


class TokenEmbedding(nn.Module):
    """Position of a token = encoded parcel coordinates + sinusoidal time-patch encoding.

    With `coord_frequencies` k > 0 the coordinates (divided by coord_scale) also enter as
    sin/cos at frequencies 2^0..2^(k-1) pi per axis before the projection, so parcels get
    distinct, non-linear identities (a linear map of xyz spans only 3 directions: two
    parcels of one network far apart cannot be told to behave alike); k = 0 is upstream's
    Linear(3 -> dim)."""

    def __init__(self, dim: int, coord_scale: float, coord_frequencies: int = 0):
        super().__init__()
        self.coord = nn.Linear(3 + 6 * coord_frequencies, dim)
        self.coord_scale = coord_scale
        self.coord_frequencies = coord_frequencies
        self.dim = dim
        self._time: dict = {}  # (n, device, dtype) -> [n, dim], fixed, not a parameter

    def coord_features(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., 3] mm -> [..., 3 + 6k]."""
        c = coords / self.coord_scale
        if not self.coord_frequencies:
            return c
        freq = (2.0 ** torch.arange(self.coord_frequencies, device=c.device, dtype=c.dtype)
                * math.pi)
        angles = (c[..., None] * freq).flatten(-2)  # [..., 3k]
        return torch.cat([c, angles.sin(), angles.cos()], dim=-1)

    def time_encoding(self, n: int, device, dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled graph folds it; no side effects there
            return sinusoidal(n, self.dim, device).to(dtype)
        key = (n, str(device), dtype)
        if key not in self._time:
            with torch.no_grad():
                self._time[key] = sinusoidal(n, self.dim, device).to(dtype)
        return self._time[key]

    def forward(self, coords: torch.Tensor, n_patches: int) -> torch.Tensor:
        """coords [P, 3] or [B, P, 3] (mm) -> [1 or B, P * N, dim]."""
        c = self.coord(self.coord_features(coords))
        if c.dim() == 2:
            c = c[None]
        t = self.time_encoding(n_patches, c.device, c.dtype)
        return (c[:, :, None, :] + t[None, None]).flatten(1, 2)


def take_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [B, n] of a position table [1 or B, L, D] -> [B, n, D].

    A shared table goes through `F.embedding`: its backward sums into [L, D], where a gather
    on the batch-expanded table would allocate a [B, L, D] gradient first."""
    if table.shape[0] == 1:
        return F.embedding(ids, table.squeeze(0))  # squeeze: a view both ways
    return table.gather(1, ids[..., None].expand(-1, -1, table.shape[-1]))


def _whole_masks(batch: int, n_parcels: int, n_patches: int, ratio: float, strategy: str,
                 noise: torch.Tensor):
    """Masks of whole time patches ("time": the same patches of every parcel) or whole
    parcels ("space": every patch of the chosen parcels), drawn from the first N or P values
    of each window's noise. Why: a random token mask can be filled in from the same parcel's
    neighbouring patches or the same moment's other parcels; these samplers take one of the
    two away, so the model must learn the other (levers of benchmarks/learning_curve.py)."""
    rows, per = (n_patches, n_parcels) if strategy == "time" else (n_parcels, n_patches)
    k = int(round(ratio * rows))
    if not 0 < k < rows:
        what = "time patches" if strategy == "time" else "parcels"
        raise ConfigError(f"mask ratio {ratio:g} of {rows} {what} masks {k}: choose a ratio "
                          f"that masks 1 to {rows - 1} (mask strategy '{strategy}')")
    order = noise[:, :rows].argsort(dim=1)  # [B, rows]: the last k are masked
    other = torch.arange(per, device=noise.device)
    if strategy == "time":  # token p * N + n for every parcel p of the chosen patches n
        ids = order[:, None, :] + (other * n_patches)[None, :, None]  # [B, P, N]
        return (ids[..., : rows - k].reshape(batch, -1), ids[..., rows - k:].reshape(batch, -1))
    ids = order[:, :, None] * n_patches + other[None, None, :]  # [B, P, N]
    return ids[:, : rows - k].reshape(batch, -1), ids[:, rows - k:].reshape(batch, -1)


class BrainLMPreTrainedModel(PreTrainedModel):
    config_class = BrainLMConfig
    base_model_prefix = "brainlm"
    main_input_name = "signals"
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        """Xavier-uniform linear layers (as MAE): with a 20-value patch, a 0.02-std init would
        make the signal ~10x smaller than the time encoding it is added to."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, TimeBias):
            module.reset_parameters()
        elif isinstance(module, BrainLMForPretraining):
            nn.init.normal_(module.cls_token, std=self.config.initializer_range)
            nn.init.normal_(module.mask_token, std=self.config.initializer_range)
            if module.prior is not None:  # children first: this runs after their init
                nn.init.zeros_(module.decoder_pred.weight)  # untrained = the prior
                nn.init.zeros_(module.decoder_pred.bias)


class BrainLMForPretraining(BrainLMPreTrainedModel):
    def __init__(self, config: BrainLMConfig):
        super().__init__(config)
        c = config
        eager = c.attention_backend == "eager"
        self.patch_embed = nn.Linear(c.patch_size, c.hidden_size)
        self.pos_embed = TokenEmbedding(c.hidden_size, c.coord_scale, c.coord_frequencies)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        bias = dict(max_patches=c.num_patches if c.time_attention_bias else 0,
                    space_features=3 + 6 * c.coord_frequencies,
                    space_rank=c.space_attention_rank)
        self.encoder = Stack(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                             c.intermediate_size, c.layer_norm_eps, eager,
                             c.attention_layout == "factorised", **bias)
        self.decoder_embed = nn.Linear(c.hidden_size, c.decoder_hidden_size)
        self.decoder_pos_embed = TokenEmbedding(c.decoder_hidden_size, c.coord_scale,
                                                c.coord_frequencies)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_hidden_size))
        self.decoder = Stack(c.decoder_hidden_size, c.decoder_num_hidden_layers,
                             c.decoder_num_attention_heads, c.decoder_intermediate_size,
                             c.layer_norm_eps, eager, **bias)
        self.decoder_pred = nn.Linear(c.decoder_hidden_size, c.patch_size)
        self.latent_pred = (nn.Linear(c.decoder_hidden_size, c.hidden_size)
                            if c.latent_loss_weight else None)
        self.prior = self.prior_embed = None
        if c.linear_prior:  # the decoder learns the residual of the space-time rung
            self.prior = LinearPrior(len(c.parcel_coords), c.patch_size)
            self.prior_embed = nn.Linear(self.prior.n_features, c.decoder_hidden_size)
        self.post_init()

    # ------------------------------------------------------------------ helpers

    def patchify(self, signals: torch.Tensor) -> torch.Tensor:
        """[B, P, T] -> [B, P * N, patch_size] (token p * N + n = parcel p, time patch n)."""
        b, p, t = signals.shape
        ps = self.config.patch_size
        if t % ps:
            raise ConfigError(f"window of {t} timepoints is not a multiple of patch_size {ps}")
        return signals.reshape(b, p * (t // ps), ps)

    def unpatchify(self, patches: torch.Tensor, n_parcels: int) -> torch.Tensor:
        """[B, P * N, patch_size] -> [B, P, T]."""
        return patches.reshape(patches.shape[0], n_parcels, -1)

    def _coords(self, coords, signals):
        if coords is None:
            saved = getattr(self.config, "parcel_coords", None)
            if saved is None:
                raise ConfigError("coords are needed: this model was saved without the "
                                  "coordinates of its atlas")
            coords = saved
            if not torch.compiler.is_compiling():  # compiled: a graph constant, no side effects
                key = (str(signals.device), signals.dtype)
                cache = self.__dict__.setdefault("_coords_cache", {})
                if key not in cache or cache[key][0] is not saved:  # same list: still valid
                    cache[key] = (saved, torch.as_tensor(saved, dtype=signals.dtype,
                                                         device=signals.device))
                coords = cache[key][1]
        coords = torch.as_tensor(coords, dtype=signals.dtype, device=signals.device)
        if coords.shape[-2:] != (signals.shape[1], 3):
            raise ConfigError(f"coords {tuple(coords.shape)} do not match {signals.shape[1]} "
                              "parcels (expected [P, 3] in MNI mm)")
        return coords

    def masking(self, batch: int, n_parcels: int, n_patches: int, ratio: float, strategy: str,
                future_patches: int, noise: torch.Tensor | None, device):
        """Token indices (ids_keep [B, n_keep], ids_mask [B, n_mask]), same counts per window.

        random: over all tokens (BrainLM); parcel: the same number of patches masked in every
        parcel; future: the last `future_patches` patches of every parcel (forecasting);
        time: whole time patches (every parcel at once); space: whole parcels (every patch).
        `noise` [B, P * N] in [0, 1) makes the masks reproducible (the trainer seeds it).
        """
        check_mask(ratio, strategy, future_patches, n_patches)
        length = n_parcels * n_patches
        if noise is None and strategy != "future":
            noise = torch.rand(batch, length, device=device)
        if strategy in ("time", "space"):
            return _whole_masks(batch, n_parcels, n_patches, ratio, strategy, noise)
        if strategy == "future" or (strategy == "parcel"):
            k = future_patches if strategy == "future" else int(round(ratio * n_patches))
            if strategy == "parcel" and ratio > 0 and not 0 < k < n_patches:
                raise ConfigError(f"mask ratio {ratio:g} of {n_patches} patches per parcel "
                                  f"masks {k}: choose a ratio that masks 1 to {n_patches - 1}")
            if strategy == "future":
                order = torch.arange(n_patches, device=device).expand(batch, n_parcels, -1)
            else:
                order = noise.view(batch, n_parcels, n_patches).argsort(dim=-1)
            base = (torch.arange(n_parcels, device=device) * n_patches)[None, :, None]
            ids = order + base
            return (ids[..., : n_patches - k].reshape(batch, -1),
                    ids[..., n_patches - k:].reshape(batch, -1))
        n_mask = int(round(ratio * length))
        if ratio > 0 and not 0 < n_mask < length:
            raise ConfigError(f"mask ratio {ratio:g} of {length} tokens masks {n_mask}: the "
                              "encoder needs a visible token and the loss a masked one")
        if n_mask == 0:
            ids = torch.arange(length, device=device).expand(batch, -1)
            return ids, ids[:, :0]
        shuffle = noise.argsort(dim=1)
        return shuffle[:, : length - n_mask], shuffle[:, length - n_mask:]

    # ------------------------------------------------------------------ forward

    def encode(self, signals: torch.Tensor, coords=None, ids_keep: torch.Tensor | None = None):
        """[B, P, T] -> [B, 1 + n_keep, H] (CLS first); all tokens when ids_keep is None."""
        patches = self.patchify(signals)
        coords = self._coords(coords, signals)
        pos = self.pos_embed(coords, patches.shape[1] // signals.shape[1])
        b, length, ps = patches.shape
        n_patches = length // signals.shape[1]
        if ids_keep is not None and ids_keep.shape[1] < length:
            patches = patches.gather(1, ids_keep[..., None].expand(-1, -1, ps))
            pos = take_rows(pos, ids_keep)
        x = self.patch_embed(patches) + pos
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        ids = (torch.arange(length, device=x.device).expand(b, -1) if ids_keep is None
               else ids_keep)
        return self.encoder(x, geo=self.geometry(coords, n_patches, ids))

    def geometry(self, coords, n_patches: int, *ids: torch.Tensor) -> TokenGeometry | None:
        """Time and space of the [CLS, ids...] tokens for the attention biases (None if the
        model has none). coords: [P, 3] or [B, P, 3] mm, already checked."""
        c = self.config
        if not (c.time_attention_bias or c.space_attention_rank
                or c.attention_layout == "factorised"):
            return None
        ids = torch.cat(ids, dim=1)
        b = ids.shape[0]
        time = torch.cat([ids.new_full((b, 1), -1), ids % n_patches], dim=1)
        parcel = torch.cat([ids.new_full((b, 1), -1), ids // n_patches], dim=1)
        space = None
        if c.space_attention_rank:
            feats = self.pos_embed.coord_features(coords)  # [P or B x P, F]
            feats = feats.expand(b, -1, -1) if feats.dim() == 2 else feats
            tok = feats.gather(1, (ids // n_patches)[..., None].expand(-1, -1, feats.shape[-1]))
            space = torch.cat([tok.new_zeros(b, 1, tok.shape[-1]), tok], dim=1)
        return TokenGeometry(time, n_patches, space, parcel)

    def decoder_input(self, latent, coords, n_patches, ids_keep, ids_mask) -> torch.Tensor:
        """[CLS, visible..., masked...] for the decoder: [B, 1 + L, D].

        Positions come from one small table by token index: a zero row for CLS, then every
        token's position, then the same plus the mask token, so a masked token's whole input is
        one row lookup and nothing of size [B, L, D] is sliced or scattered (forward or back)."""
        dpos = self.decoder_pos_embed(coords, n_patches)  # [1 or B, L, D]
        length = dpos.shape[1]
        table = torch.cat([dpos.new_zeros(dpos.shape[0], 1, dpos.shape[-1]), dpos,
                           dpos + self.mask_token.to(dpos.dtype)], dim=1)  # [1 or B, 1 + 2L, D]
        head_ids = torch.cat([ids_keep.new_zeros(ids_keep.shape[0], 1), ids_keep + 1], dim=1)
        head = self.decoder_embed(latent) + take_rows(table, head_ids)  # [B, 1 + n_keep, D]
        return torch.cat([head, take_rows(table, ids_mask + 1 + length)], dim=1)

    def set_sdpa_kernel(self, name: str) -> None:
        """Pin the attention kernel: auto (PyTorch picks), flash, cudnn, efficient or math.

        A property of the machine, not of the weights: not saved with the model."""
        if name not in SDPA_KERNELS:
            raise ConfigError(f"attention kernel '{name}' must be one of {', '.join(SDPA_KERNELS)}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.sdpa_kernel = SDPA_KERNELS[name]

    def forward(self, signals: torch.Tensor, coords=None, mask_ratio: float | None = None,
                mask_strategy: str | None = None, noise: torch.Tensor | None = None,
                future_patches: int | None = None) -> BrainLMPretrainingOutput:
        """signals: [B, P, T] scaled windows; coords: [P, 3] or [B, P, 3] MNI mm (default: the
        atlas saved in the config). Mask settings default to the config's."""
        c = self.config
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        strategy = c.mask_strategy if mask_strategy is None else mask_strategy
        future = c.future_patches if future_patches is None else future_patches
        b, p, t = signals.shape
        n_patches = t // c.patch_size
        ids_keep, ids_mask = self.masking(b, p, n_patches, ratio, strategy, future, noise,
                                          signals.device)
        latent = self.encode(signals, coords, ids_keep)
        if ids_mask.shape[1] == 0:
            return BrainLMPretrainingOutput(ids_keep=ids_keep, ids_mask=ids_mask,
                                            encoder_hidden=latent)
        coords = self._coords(coords, signals)
        x = self.decoder_input(latent, coords, n_patches, ids_keep, ids_mask)
        n_keep = ids_keep.shape[1]
        prior = None
        if self.prior is not None:  # the rung's features and prediction of each masked token
            from ..train.reconstruction import token_mask  # the ladder's own mask layout

            feats = self.prior.features(signals, token_mask(p, n_patches, ids_mask))
            feats = feats.flatten(1, 2).gather(
                1, ids_mask[..., None].expand(-1, -1, feats.shape[-1]))  # [B, n_mask, F]
            prior = self.prior.predict(feats)
            x = torch.cat([x[:, :1 + n_keep],
                           x[:, 1 + n_keep:] + self.prior_embed(feats).to(x.dtype)], dim=1)
        # masked tail only in the last block; with decoder_cross_attention it attends to the
        # CLS and visible tokens only (a masked token's key holds no signal in that block)
        geo = self.geometry(coords, n_patches, ids_keep, ids_mask)
        x = self.decoder(x, last_q_start=1 + n_keep,
                         last_kv_stop=1 + n_keep if c.decoder_cross_attention else None, geo=geo)
        pred = self.decoder_pred(x)
        if prior is not None:  # in float32: a bf16 sum would round the rung's prediction
            pred = pred.float() + prior.float()
        target = self.patchify(signals).gather(1, ids_mask[..., None].expand(-1, -1, c.patch_size))
        target = target.float()
        if c.norm_patch_loss:  # MAE: each patch by its own mean and std
            target = (target - target.mean(-1, keepdim=True)) / (
                target.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
        loss = F.mse_loss(pred.float(), target)
        if self.latent_pred is not None and self.training:
            loss = loss + c.latent_loss_weight * self._latent_loss(signals, coords, ids_mask, x)
        return BrainLMPretrainingOutput(loss=loss, pred=pred, ids_keep=ids_keep,
                                        ids_mask=ids_mask, encoder_hidden=latent)

    def _latent_loss(self, signals, coords, ids_mask, decoded) -> torch.Tensor:
        """MSE between the decoder's latent prediction of each masked token [B, n_mask, H] and
        the encoder's embedding of it with nothing masked (stop-gradient, layer-normed)."""
        with torch.no_grad():
            full = self.encode(signals, coords, None)[:, 1:]
            target = full.gather(1, ids_mask[..., None].expand(-1, -1, full.shape[-1]))
            target = F.layer_norm(target.float(), target.shape[-1:])
        return F.mse_loss(self.latent_pred(decoded).float(), target)

    @torch.no_grad()
    def reconstruct(self, signals: torch.Tensor, output: BrainLMPretrainingOutput):
        """Windows with predictions written into the masked patches, and the mask.

        Returns (reconstruction [B, P, T], mask [B, P, T] bool, True where predicted)."""
        patches = self.patchify(signals).clone()
        ps = self.config.patch_size
        idx = output.ids_mask[..., None].expand(-1, -1, ps)
        patches.scatter_(1, idx, output.pred.to(patches.dtype))
        mask = torch.zeros_like(patches, dtype=torch.bool)
        mask.scatter_(1, idx, True)
        p = signals.shape[1]
        return self.unpatchify(patches, p), self.unpatchify(mask, p)

    def embed(self, signals: torch.Tensor, coords=None) -> dict:
        """Deterministic embeddings with nothing masked: {"cls": [B, H], "mean": [B, H]}."""
        hidden = self.encode(signals, coords, ids_keep=None)
        return {"cls": hidden[:, 0], "mean": hidden[:, 1:].mean(dim=1)}
