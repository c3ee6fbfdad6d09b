"""Attention of the Family A model: fused SDPA with learned time and space biases.

`Attention` is multi-head self-attention that can compute queries for a tail of the sequence
only and attend to a head of it only (the decoder's last block); `TimeBias` (per head and
time-patch distance) and `SpaceBias` (low rank, between parcel coordinates) enter the fused
kernels as extra query/key channels; `TokenGeometry` says where each token sits for them.
`SDPA_KERNELS` names the PyTorch SDPA backends a model can be pinned to.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_KERNELS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}


@dataclass
class TokenGeometry:
    """Where each token of a sequence sits, for the attention biases.

    time: [B, S] time patch of each token (-1 for CLS); n_patches: time patches per parcel;
    space: [B, S, F] coordinate features of each token's parcel (zeros for CLS), or None;
    parcel: [B, S] parcel of each token (-1 for CLS), or None."""

    time: torch.Tensor
    n_patches: int
    space: torch.Tensor | None = None
    parcel: torch.Tensor | None = None

    def slice(self, start: int = 0, stop: int | None = None) -> "TokenGeometry":
        return TokenGeometry(self.time[:, start:stop], self.n_patches,
                             None if self.space is None else self.space[:, start:stop],
                             None if self.parcel is None else self.parcel[:, start:stop])


def factorised_mask(layout: str, gq: TokenGeometry, gk: TokenGeometry) -> torch.Tensor:
    """[B, 1, Sq, Sk] True where a query may attend: "space" to the tokens of its own time
    patch (every parcel at one moment), "time" to those of its own parcel; CLS attends to and
    is seen by every token, so no row is empty."""
    q, k = (gq.time, gk.time) if layout == "space" else (gq.parcel, gk.parcel)
    allowed = (q[:, :, None] == k[:, None, :]) | (q < 0)[:, :, None] | (k < 0)[:, None, :]
    return allowed[:, None]


class TimeBias(nn.Module):
    """A learned attention bias per head and time-patch distance, b_h(n_q - n_k).

    Why: a masked patch is best told by the tokens of the same moment (the global signal and
    the networks act together in time), but with time entering only as an encoding added to
    the token, attention has to discover that through its projections first, which a small
    model on little data barely does (it sits at the mean). A bias table makes "look at the
    same time" one parameter per head and distance (T5 / Swin relative position bias).

    It enters SDPA as extra query/key channels: keys carry one-hot time, queries carry the bias
    row of their time, so q.k gains b_h(n_q - n_k) and the fused kernels still run (values are
    zero-padded to the same width; their extra outputs are dropped). CLS (time -1) gets none.
    Distances beyond the configured window's are clamped.

    Initialised as ALiBi's distance penalty, -slope_h |n_q - n_k|, slopes from 4 (a head that
    looks at its own moment) to 0.5 (a broad one): Adam moves a parameter by about the learning
    rate per step, so a bias starting at 0 would need thousands of steps to focus."""

    def __init__(self, heads: int, max_patches: int):
        super().__init__()
        self.max_patches = max_patches
        self.bias = nn.Parameter(torch.zeros(heads, 2 * max_patches - 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        heads = self.bias.shape[0]
        slopes = 4.0 * 2.0 ** (-3.0 * torch.arange(heads) / max(1, heads - 1))
        dist = (torch.arange(2 * self.max_patches - 1) - self.max_patches + 1).abs()
        with torch.no_grad():
            self.bias.copy_(-slopes[:, None] * dist[None].float())

    def channels(self, time_q: torch.Tensor, time_k: torch.Tensor, n: int, scale: float):
        """time ids [B, Sq], [B, Sk] (-1 for CLS) -> q extra [B, h, Sq, n], k extra [B, 1, Sk, n]."""
        grid = torch.arange(n, device=time_q.device)
        rel = (grid[:, None] - grid[None, :]).clamp(-self.max_patches + 1, self.max_patches - 1)
        table = self.bias[:, rel + self.max_patches - 1] / scale  # [h, n, n]; SDPA rescales
        q_extra = table[:, time_q.clamp(min=0)] * (time_q >= 0)[None, ..., None]  # [h, B, Sq, n]
        k_extra = F.one_hot(time_k.clamp(min=0), n) * (time_k >= 0)[..., None]
        return q_extra.transpose(0, 1), k_extra[:, None]


class SpaceBias(nn.Module):
    """A learned low-rank attention bias between parcels, phi(c_q)^T U_h^T V_h phi(c_k), from
    their coordinate features phi (`TokenEmbedding.coord_features`).

    Why: parcels of one network co-fluctuate although they lie far apart (posterior cingulate
    and medial prefrontal cortex); with positions only added to the tokens, attention finds
    them as slowly as it finds the same time. Rank r per head, as extra query/key channels
    like `TimeBias`; U and V start as any linear layer (Xavier), so the bias is a random
    bilinear form at first and its gradient flows from the first step."""

    def __init__(self, heads: int, features: int, rank: int):
        super().__init__()
        self.heads, self.rank = heads, rank
        self.query = nn.Linear(features, heads * rank, bias=False)
        self.key = nn.Linear(features, heads * rank, bias=False)

    def channels(self, space_q: torch.Tensor, space_k: torch.Tensor, scale: float):
        """[B, Sq, F], [B, Sk, F] -> q extra [B, h, Sq, r], k extra [B, h, Sk, r]."""
        q = self.query(space_q).unflatten(-1, (self.heads, self.rank)).transpose(1, 2) / scale
        k = self.key(space_k).unflatten(-1, (self.heads, self.rank)).transpose(1, 2)
        return q, k


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eager: bool = False, max_patches: int = 0,
                 space_features: int = 0, space_rank: int = 0, layout: str | None = None):
        super().__init__()
        self.heads, self.eager = heads, eager
        self.layout = layout  # None: every token; "space" / "time": factorised_mask
        self.sdpa_kernel = None  # None: PyTorch picks; else one SDPBackend (set_sdpa_kernel)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.time_bias = TimeBias(heads, max_patches) if max_patches else None
        self.space_bias = SpaceBias(heads, space_features, space_rank) if space_rank else None

    def _biased(self, q, k, v, geo: TokenGeometry, q_start: int, kv_stop: int | None):
        """SDPA with the time and space biases as extra query/key channels (and the
        factorised layout's mask)."""
        hd = v.shape[-1]
        scale = hd ** -0.5
        gq, gk = geo.slice(q_start), geo.slice(0, kv_stop)
        qs, ks = [q], [k]
        if self.time_bias is not None:
            q_extra, k_extra = self.time_bias.channels(gq.time, gk.time, geo.n_patches, scale)
            qs.append(q_extra.to(q.dtype))
            ks.append(k_extra.to(k.dtype).expand(-1, self.heads, -1, -1))
        if self.space_bias is not None and geo.space is not None:
            q_extra, k_extra = self.space_bias.channels(gq.space, gk.space, scale)
            qs.append(q_extra.to(q.dtype))
            ks.append(k_extra.to(k.dtype))
        q, k = torch.cat(qs, dim=-1), torch.cat(ks, dim=-1)
        mask = factorised_mask(self.layout, gq, gk) if self.layout else None
        if self.eager:  # the benchmark's reference: [S, S] scores materialised
            scores = (q @ k.transpose(-2, -1)) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return scores.softmax(dim=-1) @ v
        v = F.pad(v, (0, q.shape[-1] - hd))  # fused kernels want one width
        with sdpa_kernel(self.sdpa_kernel) if self.sdpa_kernel is not None else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  scale=scale)[..., :hd]

    def forward(self, x: torch.Tensor, q_start: int = 0, kv_stop: int | None = None,
                geo: TokenGeometry | None = None) -> torch.Tensor:
        """x: [B, S, D] -> [B, S - q_start, D]; queries only for tokens q_start.., keys and
        values only from tokens ..kv_stop (all when None). geo: where the tokens sit, for the
        time and space biases."""
        b, s, d = x.shape
        h, hd = self.heads, d // self.heads
        # split along the features (not a [3, ...] permute): the backward then writes the
        # [B, S, 3D] gradient with one concatenation instead of a stack and a copy
        if q_start or kv_stop is not None:
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = self.qkv.bias.split([d, 2 * d])
            q = F.linear(x[:, q_start:], w_q, b_q)
            k, v = F.linear(x[:, :kv_stop], w_kv, b_kv).split(d, dim=-1)
        else:
            q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.unflatten(-1, (h, hd)).transpose(1, 2) for t in (q, k, v))  # [B, h, S, hd]
        if geo is not None and (self.time_bias is not None or self.space_bias is not None
                                or self.layout):
            out = self._biased(q, k, v, geo, q_start, kv_stop)
        elif self.eager:  # reference path for the benchmark: materialises [S, S] scores
            att = (q @ k.transpose(-2, -1)) * hd ** -0.5
            out = att.softmax(dim=-1) @ v
        elif self.sdpa_kernel is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(self.sdpa_kernel):
                out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s - q_start, d))
