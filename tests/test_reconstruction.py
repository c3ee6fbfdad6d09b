"""Reconstruction baselines: each is exact where it should be, scored like the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainlm.train.reconstruction import (R2Meter, RidgeBaseline, parcel_interp, parcel_mean,
                                          predict_baselines, same_time, time_mask, token_mask)

B, P, N, PS = 6, 8, 5, 4
T = N * PS


def _random_mask(seed: int, ratio: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(B, P * N, generator=g)
    ids_mask = noise.argsort(dim=1)[:, : int(ratio * P * N)]
    return token_mask(P, N, ids_mask)


def _score(x, m, pred) -> float:
    mask = time_mask(m, PS)
    meter = R2Meter(P)
    meter.add_targets(x, mask)
    meter.add("p", x, pred, mask)
    return meter.r2("p")


def test_token_mask_and_time_mask_follow_the_token_order():
    m = token_mask(P, N, torch.tensor([[0, N + 2]]))  # parcel 0 patch 0, parcel 1 patch 2
    assert m.shape == (1, P, N) and m.sum() == 2 and m[0, 0, 0] and m[0, 1, 2]
    tm = time_mask(m, PS)
    assert tm[0, 1, 2 * PS:3 * PS].all() and tm.sum() == 2 * PS


def test_r2_meter_is_the_per_parcel_r2_averaged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, P, T, generator=g)
    pred = x + 0.5 * torch.randn(B, P, T, generator=g)
    m = _random_mask(1)
    mask = time_mask(m, PS)
    expected = []
    for p in range(P):
        y = x[:, p][mask[:, p]].double().numpy()
        yhat = pred[:, p][mask[:, p]].double().numpy()
        expected.append(1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert _score(x, m, pred) == pytest.approx(float(np.mean(expected)), rel=1e-9)


def test_same_time_mean_is_exact_when_all_parcels_are_identical():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, T, generator=g).expand(B, P, T).contiguous()
    m = _random_mask(2)
    m[:, 0] = False  # every time patch has a visible parcel
    assert _score(x, m, same_time(x, m)) == pytest.approx(1.0)
    assert _score(x, m, parcel_mean(x, m)) < 0.5  # not what the other baselines see


def test_parcel_mean_is_exact_for_parcels_constant_in_a_window():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, P, 1, generator=g).expand(B, P, T).contiguous()
    m = _random_mask(3)
    m[..., 0] = False  # every parcel has a visible patch
    assert _score(x, m, parcel_mean(x, m)) == pytest.approx(1.0)


def test_parcel_interp_is_exact_between_visible_patches_of_a_linear_signal():
    g = torch.Generator().manual_seed(0)
    slope, offset = torch.randn(B, P, 1, generator=g), torch.randn(B, P, 1, generator=g)
    x = offset + slope * torch.arange(T, dtype=torch.float32)
    m = _random_mask(4)
    m[..., 0] = m[..., -1] = False  # interpolation, not extrapolation
    pred = parcel_interp(x, m)
    assert torch.allclose(pred, x, atol=1e-5)
    assert _score(x, m, pred) == pytest.approx(1.0)
    # beyond the last visible value it holds that value
    m2 = m.clone()
    m2[0, 0, -1] = True
    last_visible = int((~time_mask(m2, PS))[0, 0].nonzero().max())
    assert torch.allclose(parcel_interp(x, m2)[0, 0, last_visible:], x[0, 0, last_visible])


def test_a_parcel_with_nothing_visible_is_predicted_as_zero():
    x = torch.ones(1, P, T)
    m = torch.zeros(1, P, N, dtype=torch.bool)
    m[0, 3] = True
    for name in ("parcel_mean", "parcel_interp"):
        assert predict_baselines(x, m)[name][0, 3].abs().max() == 0, name


def _loaded_signals(n, seed):
    """Parcels = loading_p x global + noise: same_time recovers the global, ridge its scale."""
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(n, 1, T, generator=g)
    loading = torch.linspace(0.5, 1.5, P)[None, :, None]
    return 2.0 * loading * glob + 0.3 * torch.randn(n, P, T, generator=g)


def test_ridge_is_fitted_on_training_windows_and_beats_the_mean_it_builds_on():
    ridge = RidgeBaseline()
    for seed in range(4):
        ridge.partial_fit(_loaded_signals(B, seed), _random_mask(10 + seed))
    ridge.fit()
    x, m = _loaded_signals(B, 99), _random_mask(99)  # held-out windows and masks
    preds = predict_baselines(x, m, ridge)
    assert set(preds) == {"zero", "parcel_mean", "parcel_interp", "same_time", "ridge"}
    r2 = {k: _score(x, m, v) for k, v in preds.items()}
    assert r2["same_time"] > 0.5
    assert r2["ridge"] >= r2["same_time"] - 0.02
    assert abs(r2["zero"]) < 0.2  # zero-mean signals: predicting 0 is the mean


def test_ridge_is_exact_for_a_linear_function_of_its_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, T, generator=g).expand(B, P, T).contiguous()
    ridge = RidgeBaseline(alpha=1e-9)
    m = _random_mask(5)
    m[:, 0] = False
    ridge.partial_fit(x, m)
    ridge.fit()
    assert _score(x, m, ridge.predict(x, m)) == pytest.approx(1.0, abs=1e-6)
