"""Reconstruction baselines: each is exact where it should be, scored like the model; the
gain over the best rung gets a subject-bootstrap interval that covers at its nominal rate."""

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


# ------------------------------------------------------------ the strongest linear rungs


def _masks(b: int, p: int, n: int, ratio: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids_mask = torch.rand(b, p * n, generator=g).argsort(dim=1)[:, : int(ratio * p * n)]
    return token_mask(p, n, ids_mask)


def _low_rank(rng, p: int, rank: int, t: int, smooth: bool = False) -> np.ndarray:
    """[p, t] = loadings [p, rank] x factors [rank, t] (AR(1) factors when smooth)."""
    loadings = rng.standard_normal((p, rank))
    f = rng.standard_normal((rank, t))
    if smooth:
        for i in range(1, t):
            f[:, i] = 0.9 * f[:, i - 1] + np.sqrt(1 - 0.81) * f[:, i]
    return loadings @ f


def test_cond_gaussian_recovers_masked_values_of_noiseless_low_rank_data():
    from brainlm.train.linear_rungs import GaussianRung

    rng = np.random.default_rng(0)
    p, n, ps = 24, 5, 4
    offset = rng.standard_normal((p, 1))  # the training mean is used, not assumed 0
    series = _low_rank(rng, p, 3, 3000 + 8 * n * ps) + offset  # one covariance, rank 3
    gauss = GaussianRung.fit([series[:, :3000]])
    assert 0 <= gauss.shrinkage < 0.05  # chosen on the training data: little is needed here
    x = torch.tensor(series[:, 3000:].reshape(p, 8, n * ps).transpose(1, 0, 2),
                     dtype=torch.float32)  # [8, p, T] held-out windows
    for ratio in (0.25, 0.5, 0.8):  # 18, 12 and 5 visible parcels for a rank-3 covariance
        m = _masks(8, p, n, ratio, seed=int(ratio * 100))
        pred = gauss.condition(x, m)
        meter = R2Meter(p)
        meter.add_targets(x, time_mask(m, ps))
        meter.add("cond_gaussian", x, pred, time_mask(m, ps))
        assert meter.r2("cond_gaussian") > 0.95, ratio
        # visible entries: each parcel from the other visible ones (leave-one-out), as exact
        vis = ~time_mask(m, ps)
        assert float(((pred - x)[vis] ** 2).mean() / (x[vis] ** 2).mean()) < 0.1


def test_cond_gaussian_matches_the_textbook_formula_on_either_side_of_the_partition():
    from brainlm.train.linear_rungs import GaussianRung

    rng = np.random.default_rng(1)
    p, n, ps = 10, 3, 2
    a = rng.standard_normal((p, p))
    cov, mu = a @ a.T / p + 0.2 * np.eye(p), rng.standard_normal(p)
    gauss = GaussianRung(mu, cov)
    x = torch.tensor(rng.standard_normal((2, p, n * ps)))
    for ratio in (0.2, 0.5, 0.9):  # small masked side, balanced, small visible side
        m = _masks(2, p, n, ratio, seed=3)
        pred = gauss.condition(x, m).numpy()
        for b in range(2):
            for j in range(n):
                vis = ~m[b, :, j].numpy()
                v, k = np.where(vis)[0], np.where(~vis)[0]
                z = x[b, :, j * ps:(j + 1) * ps].numpy() - mu[:, None]
                want = mu[k, None] + cov[np.ix_(k, v)] @ np.linalg.solve(cov[np.ix_(v, v)], z[v])
                assert np.allclose(pred[b, k, j * ps:(j + 1) * ps], want, atol=1e-8)


def _persistent(rng, n_windows: int, p: int, t: int) -> torch.Tensor:
    """[n, p, t]: a shared low-rank part plus a slow (AR 0.97) part of each parcel's own:
    what the visible parcels say, and what the parcel's own neighbouring patches say."""
    shared = _low_rank(rng, p, 2, n_windows * t, smooth=True)
    own = np.zeros((p, n_windows * t))
    e = rng.standard_normal((p, n_windows * t))
    for i in range(1, n_windows * t):
        own[:, i] = 0.97 * own[:, i - 1] + np.sqrt(1 - 0.97 ** 2) * e[:, i]
    x = shared + own + 0.2 * rng.standard_normal((p, n_windows * t))
    return torch.tensor(x.reshape(p, n_windows, t).transpose(1, 0, 2).copy(),
                        dtype=torch.float32)


def test_space_time_rung_beats_cond_gaussian_on_data_with_temporal_structure():
    from brainlm.train.linear_rungs import GaussianRung, SpaceTimeRung

    rng = np.random.default_rng(2)
    p, n, ps = 12, 5, 4
    windows = _persistent(rng, 64, p, n * ps)
    train, x = windows[:48], windows[48:]  # held out: the last 16 windows
    gauss = GaussianRung.fit(list(train.numpy()))
    rung = SpaceTimeRung(gauss)
    for i in range(0, 48, 16):
        rung.partial_fit(train[i:i + 16], _masks(16, p, n, 0.5, seed=i))
    rung.fit()
    m = _masks(16, p, n, 0.5, seed=99)
    preds = predict_baselines(x, m, gaussian=gauss, space_time=rung)
    assert {"cond_gaussian", "space_time"} <= set(preds)
    meter, mask = R2Meter(p), time_mask(m, ps)
    meter.add_targets(x, mask)
    for name, pred in preds.items():
        meter.add(name, x, pred, mask)
    r2 = {k: meter.r2(k) for k in preds}
    assert r2["cond_gaussian"] > r2["same_time"]
    assert r2["space_time"] > r2["cond_gaussian"] + 0.05, r2


# ------------------------------------------------------ intervals over subjects, verdicts


def _cohort(rng, n_subjects: int, err_model: float, err_base: float, p: int = 4, t: int = 30):
    """An R2Meter holding one cohort: each subject's values [p, t] with a subject offset, a
    model and a baseline whose errors scale with the subject's difficulty (shared: paired)."""
    y = rng.standard_normal((n_subjects, p, t)) + 0.5 * rng.standard_normal((n_subjects, p, 1))
    hard = rng.lognormal(0, 0.3, (n_subjects, 1, 1))
    noise = rng.standard_normal((2, n_subjects, p, t)) * hard
    x = torch.tensor(y)
    mask = torch.ones(x.shape, dtype=torch.bool)
    meter, groups = R2Meter(p, n_subjects), torch.arange(n_subjects)
    meter.add_targets(x, mask, groups)
    meter.add("model", x, x + err_model * torch.tensor(noise[0]), mask, groups)
    meter.add("baseline", x, x + err_base * torch.tensor(noise[1]), mask, groups)
    return meter


def test_the_subject_bootstrap_interval_of_a_gain_covers_the_true_gain_at_its_nominal_rate():
    from brainlm.train.reconstruction import gain_interval

    rng = np.random.default_rng(0)
    big = _cohort(rng, 20000, 0.6, 0.7)  # the population's gain, to the third decimal
    truth = big.r2("model") - big.r2("baseline")
    covered, learned = 0, 0
    for _ in range(200):
        ci = gain_interval(_cohort(rng, 16, 0.6, 0.7), "model", ["baseline"], n_boot=400,
                           seed=int(rng.integers(1 << 30)))
        assert ci["low"] <= ci["value"] <= ci["high"]
        covered += ci["low"] <= truth <= ci["high"]
        learned += ci["verdict"] == "learned"
    # percentile intervals run a little narrow on few subjects: ~0.92 at 16 (~0.85 at 8)
    assert 0.88 <= covered / 200 <= 0.99, covered
    assert learned > 100  # a gain of ~0.12 on 16 subjects is mostly decided


def test_gain_verdicts_and_per_subject_r2():
    from brainlm.train.reconstruction import gain_interval

    rng = np.random.default_rng(1)
    better, worse = _cohort(rng, 12, 0.3, 0.9), _cohort(rng, 12, 0.9, 0.3)
    assert gain_interval(better, "model", ["baseline"])["verdict"] == "learned"
    assert gain_interval(worse, "model", ["baseline"])["verdict"] == "not learned"
    same = _cohort(rng, 12, 0.6, 0.6)
    same.sse["model"] = same.sse["baseline"].clone()
    tie = gain_interval(same, "model", ["baseline"])
    assert tie["value"] == 0 and tie["verdict"] == "undecided"
    by_subject = better.r2_by_group("model")
    assert by_subject.shape == (12,) and np.all(by_subject > 0.7)
    # the pooled R^2 is the same definition on the summed sums
    one = R2Meter(4)
    one.sum_y, one.sum_y2, one.count = (v.sum(0, keepdim=True) for v in
                                        (better.sum_y, better.sum_y2, better.count))
    one.sse["model"] = better.sse["model"].sum(0, keepdim=True)
    assert one.r2("model") == pytest.approx(better.r2("model"))


def test_a_gain_too_small_to_matter_is_not_called_learned():
    """A model built on a rung differs from it almost without noise: its interval sits just
    above 0 yet below MIN_GAIN, and that is undecided, not learned."""
    from brainlm.train.reconstruction import MIN_GAIN, gain_interval

    rng = np.random.default_rng(2)
    near = _cohort(rng, 12, 0.6, 0.6)
    near.sse["model"] = near.sse["baseline"] * 0.995
    tiny = gain_interval(near, "model", ["baseline"])
    assert 0 < tiny["low"] < MIN_GAIN and tiny["verdict"] == "undecided"
    near.sse["model"] = near.sse["baseline"] * 0.9
    assert gain_interval(near, "model", ["baseline"])["verdict"] == "learned"


def test_verdicts_and_per_subject_scores_reach_metrics_but_not_numeric_metrics():
    from brainlm.train.scoring import _plan_metrics, numeric_metrics

    s = {"r2": {"model": 0.5, "same_time": 0.3, "cond_gaussian": 0.45},
         "gain": {"low": 0.01, "high": 0.09, "verdict": "learned"}, "best": "cond_gaussian",
         "by_subject": {"sub-01": 0.4, "sub-02": 0.6},
         "best_by_subject": {"sub-01": 0.35, "sub-02": 0.55}}
    m = _plan_metrics("val_common", s)
    assert m["val_common_verdict"] == "learned" and m["val_common_r2_gain_low"] == 0.01
    assert m["val_common_r2_gain"] == pytest.approx(0.05)
    assert m["val_common_r2_by_subject"] == {"sub-01": 0.4, "sub-02": 0.6}
    assert m["val_common_r2_best_baseline_by_subject"]["sub-02"] == 0.55
    numbers = numeric_metrics(m)
    assert "val_common_verdict" not in numbers and "val_common_r2_by_subject" not in numbers
    assert numbers["val_common_r2_gain_high"] == 0.09


def test_one_subject_gives_no_interval_and_no_verdict():
    from brainlm.train.reconstruction import gain_interval

    ci = gain_interval(_cohort(np.random.default_rng(3), 1, 0.1, 0.9), "model", ["baseline"])
    assert ci["value"] > 0.5 and np.isnan(ci["low"]) and ci["verdict"] == "undecided"
