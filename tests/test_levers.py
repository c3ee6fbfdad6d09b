"""The pretraining levers tried against the linear ceiling: whole-time-step and whole-parcel
mask samplers, factorised space/time attention, MAE's normalised-patch loss, and a JEPA-style
latent objective. Each does what it says, and stays off unless asked for."""

from __future__ import annotations

import pytest
import torch

from brainlm.errors import ConfigError
from brainlm.model.attention import Attention, TokenGeometry, factorised_mask
from brainlm.model.config import BrainLMConfig
from brainlm.model.modeling import BrainLMForPretraining

P, T, PS = 8, 60, 10  # 6 patches per parcel
N = T // PS


def _model(**over) -> BrainLMForPretraining:
    torch.manual_seed(0)
    coords = (torch.rand(P, 3) * 100).round().tolist()
    cfg = BrainLMConfig.from_preset("tiny", window=T, patch_size=PS, parcel_coords=coords,
                                    **over)
    return BrainLMForPretraining(cfg)


@pytest.mark.parametrize("strategy, rows, per", [("time", N, P), ("space", P, N)])
def test_whole_masks_take_whole_time_steps_or_parcels(strategy, rows, per):
    model = _model()
    noise = torch.rand(4, P * N, generator=torch.Generator().manual_seed(1))
    keep, masked = model.masking(4, P, N, 0.5, strategy, 1, noise, "cpu")
    k = round(0.5 * rows)
    assert masked.shape == (4, k * per) and keep.shape == (4, (rows - k) * per)
    for b in range(4):
        ids = masked[b]
        assert sorted(torch.cat([keep[b], ids]).tolist()) == list(range(P * N))
        # time: every parcel masked at the same patches; space: every patch of a parcel
        line = ids % N if strategy == "time" else ids // N
        other = ids // N if strategy == "time" else ids % N
        for value in line.unique():
            assert sorted(other[line == value].tolist()) == list(range(per))
    again = model.masking(4, P, N, 0.5, strategy, 1, noise, "cpu")[1]
    assert torch.equal(again, masked)  # the noise decides: reproducible


def test_a_whole_mask_that_masks_nothing_or_everything_is_refused():
    with pytest.raises(ConfigError, match="masks 0"):
        _model().masking(1, P, N, 0.01, "space", 1, None, "cpu")


@pytest.mark.parametrize("layout", ["space", "time"])
def test_factorised_attention_sees_its_own_time_step_or_parcel_only(layout):
    torch.manual_seed(0)
    attn = Attention(16, 2, layout=layout).eval()
    ids = torch.arange(P * N)[None]
    time = torch.cat([torch.tensor([[-1]]), ids % N], dim=1)
    parcel = torch.cat([torch.tensor([[-1]]), ids // N], dim=1)
    geo = TokenGeometry(time, N, None, parcel)
    x = torch.randn(1, 1 + P * N, 16)
    y = attn(x, geo=geo)
    # change every token outside query 5's time step (space) or parcel (time), CLS kept
    q = 5
    same = (time[0] == time[0, q]) if layout == "space" else (parcel[0] == parcel[0, q])
    x2 = x.clone()
    x2[0, ~same & (time[0] >= 0)] += 3.0
    torch.testing.assert_close(attn(x2, geo=geo)[0, q], y[0, q])
    assert not torch.allclose(attn(x2, geo=geo)[0, 0], y[0, 0])  # CLS sees everything
    mask = factorised_mask(layout, geo, geo)
    assert mask[0, 0, 0].all() and mask[0, 0, :, 0].all()


def test_factorised_model_alternates_space_and_time_in_the_encoder():
    model = _model(attention_layout="factorised", num_hidden_layers=4)
    assert [b.attn.layout for b in model.encoder.blocks] == ["space", "time", "space", "time"]
    assert all(b.attn.layout is None for b in model.decoder.blocks)
    assert all(b.attn.layout is None for b in _model().encoder.blocks)
    out = model(torch.randn(2, P, T))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_normalised_patch_loss_is_mse_on_each_patch_standardised():
    model = _model(norm_patch_loss=True).eval()
    x = torch.randn(2, P, T) * 5 + 3
    out = model(x)
    target = model.patchify(x).gather(1, out.ids_mask[..., None].expand(-1, -1, PS))
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True,
                                                                    unbiased=False) + 1e-6).sqrt()
    torch.testing.assert_close(out.loss, ((out.pred - target) ** 2).mean())


def test_latent_objective_adds_a_trained_term_in_training_only():
    model = _model(latent_loss_weight=1.0)
    plain = _model()
    plain.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, P, T)
    noise = torch.rand(2, P * N, generator=torch.Generator().manual_seed(0))
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x, noise=noise).loss, plain(x, noise=noise).loss)
    model.train(), plain.train()
    out = model(x, noise=noise)
    assert out.loss > plain(x, noise=noise).loss
    out.loss.backward()
    assert model.latent_pred.weight.grad.abs().sum() > 0
    assert _model().latent_pred is None  # off by default: nothing extra in the weights


@pytest.mark.parametrize("over, message", [
    (dict(attention_layout="axial"), "attention_layout"),
    (dict(latent_loss_weight=-1.0), "latent_loss_weight"),
    (dict(norm_patch_loss="yes"), "norm_patch_loss"),
])
def test_bad_lever_values_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        _model(**over)
