"""Evaluation: metrics against hand-computed values, subject-level bootstrap, baselines that
recover planted effects, and the reports."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from brainlm.errors import ConfigError
from brainlm.evaluate import (
    FCBaseline,
    LinearAR,
    RawROIMLP,
    bootstrap_ci,
    classification_metrics,
    fc_features,
    forecast_metrics,
    metric_fn,
    parcel_mean,
    persistence,
    plot_comparison,
    plot_forecast,
    regression_metrics,
    results_table,
    roi_block_features,
    score_rows,
    subject_split_check,
    write_results,
)


def mae(t, p):
    return float(np.mean(np.abs(t - p)))


# ----------------------------------------------------------------------------- metrics

def test_regression_metrics_hand_values():
    m = regression_metrics([1, 2, 3], [1, 2, 4])
    assert m["r2"] == pytest.approx(0.5)  # SSE 1, SST 2
    assert m["mae"] == pytest.approx(1 / 3)
    assert m["pearson_r"] == pytest.approx(9 / math.sqrt(84))
    assert all(type(v) is float for v in m.values())


def test_regression_r2_negative_not_clipped():
    m = regression_metrics([1, 2, 3], [3, 2, 1])  # SSE 8, SST 2
    assert m["r2"] == pytest.approx(-3.0)
    assert m["mae"] == pytest.approx(4 / 3)
    assert m["pearson_r"] == pytest.approx(-1.0)


def test_regression_constant_target_is_nan():
    m = regression_metrics([2, 2, 2], [1, 2, 3])
    assert math.isnan(m["r2"]) and math.isnan(m["pearson_r"])
    assert m["mae"] == pytest.approx(2 / 3)


def test_classification_binary_hand_values():
    proba1 = np.array([0.1, 0.6, 0.4, 0.8])
    m = classification_metrics([0, 0, 1, 1], np.column_stack([1 - proba1, proba1]))
    assert m == pytest.approx({"accuracy": 0.5, "balanced_accuracy": 0.5, "roc_auc": 0.75})
    # imbalanced: recall 2/3 and 1 -> balanced 5/6 while accuracy is 3/4
    proba1 = np.array([0.2, 0.7, 0.3, 0.9])
    m = classification_metrics([0, 0, 0, 1], np.column_stack([1 - proba1, proba1]))
    assert m == pytest.approx({"accuracy": 0.75, "balanced_accuracy": 5 / 6, "roc_auc": 1.0})


def test_classification_one_class_auc_is_nan():
    proba = np.array([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics([1, 1, 1], proba)
    assert math.isnan(m["roc_auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_classification_multiclass_matches_sklearn_and_labels():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    proba = rng.dirichlet(np.ones(3), size=30)
    proba[np.arange(30), y] += 0.3
    proba /= proba.sum(1, keepdims=True)
    m = classification_metrics(y, proba)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    labels = np.array(["a", "b", "c"])
    m2 = classification_metrics(labels[y], proba, classes=labels)
    assert m2 == pytest.approx(m)
    with pytest.raises(ConfigError, match="classes"):
        classification_metrics(labels[y], proba)


def test_forecast_metrics_hand_values():
    y = np.zeros((2, 2, 2))
    p = np.zeros((2, 2, 2))
    y[:, 0, 0], p[:, 0, 0] = [0, 2], [1, 1]  # R^2 0
    y[:, 1, 0], p[:, 1, 0] = [5, 5], [4, 6]  # constant target: left out of the mean
    y[:, 0, 1], p[:, 0, 1] = [0, 2], [0, 2]  # R^2 1
    y[:, 1, 1], p[:, 1, 1] = [1, 3], [2, 2]  # R^2 0
    m = forecast_metrics(y, p)
    assert m["r2_by_horizon"] == pytest.approx([0.0, 0.5])
    assert m["mse"] == pytest.approx((1 + 1 + 1 + 1 + 1 + 1) / 8)
    with pytest.raises(ConfigError):
        forecast_metrics(y[:, :, 0], p[:, :, 0])


# ----------------------------------------------------------------------------- bootstrap

def _one_big_subject():
    """Subject 0: 50 rows with error 10; subjects 1-9: one row each with error 0."""
    y_true = np.r_[np.full(50, 10.0), np.zeros(9)]
    subjects = np.r_[np.zeros(50, int), np.arange(1, 10)]
    return y_true, np.zeros_like(y_true), subjects


def test_bootstrap_resamples_subjects_not_rows():
    y_true, y_pred, subjects = _one_big_subject()
    by_subject = bootstrap_ci(mae, y_true, y_pred, subjects, n_boot=500)
    by_row = bootstrap_ci(mae, y_true, y_pred, np.arange(len(y_true)), n_boot=500)
    assert by_subject["value"] == by_row["value"] == pytest.approx(500 / 59)
    # P(subject 0 never drawn) = 0.9 ** 10 = 0.35, so error 0 is inside the subject CI
    assert by_subject["low"] == 0.0
    width_subject = by_subject["high"] - by_subject["low"]
    width_row = by_row["high"] - by_row["low"]
    assert width_subject > 4 * width_row


def test_bootstrap_deterministic_per_seed():
    rng = np.random.default_rng(0)
    y_true, y_pred, subjects = rng.normal(size=30), np.zeros(30), np.repeat(np.arange(10), 3)
    a = bootstrap_ci(mae, y_true, y_pred, subjects, n_boot=200, seed=3)
    b = bootstrap_ci(mae, y_true, y_pred, subjects, n_boot=200, seed=3)
    c = bootstrap_ci(mae, y_true, y_pred, subjects, n_boot=200, seed=4)
    assert a == b
    assert (a["low"], a["high"]) != (c["low"], c["high"])


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(1)
    r2 = metric_fn("regression", "r2")
    for _ in range(5):
        subjects = rng.integers(0, 12, 40)
        y = rng.normal(size=40)
        pred = y + rng.normal(scale=rng.uniform(0.3, 2), size=40)
        ci = bootstrap_ci(r2, y, pred, subjects, n_boot=200, seed=int(rng.integers(100)))
        assert ci["low"] <= ci["value"] <= ci["high"]
        assert not ci["widened"]


def test_bootstrap_widens_when_percentiles_miss_the_value():
    # distinct subjects in a resample are ~63 % of all, so every resample is below the value
    subjects = np.arange(20)
    ci = bootstrap_ci(lambda t, p: float(len(np.unique(t))), subjects, subjects, subjects,
                      n_boot=100)
    assert ci["value"] == 20 and ci["high"] == 20 and ci["low"] < 20 and ci["widened"]


def test_bootstrap_skips_nan_resamples():
    y = np.array([0, 1, 0, 1])
    proba = np.column_stack([1 - np.array([0.2, 0.8, 0.3, 0.7]), [0.2, 0.8, 0.3, 0.7]])
    subjects = np.array(["a", "b", "c", "d"])  # one class drawn in ~1/8 of resamples
    auc = metric_fn("classification", "roc_auc")
    ci = bootstrap_ci(auc, y, proba, subjects, n_boot=200)
    assert 0 < ci["n_skipped"] < 200 and ci["n_boot"] == 200 - ci["n_skipped"]
    assert ci["value"] == 1.0 and ci["low"] == ci["high"] == 1.0


def test_bootstrap_forecast_3d():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(30, 4, 5))
    pred = 0.7 * y + rng.normal(scale=0.5, size=y.shape)
    subjects = np.repeat(np.arange(10), 3)
    for name in ("mse", "r2"):
        ci = bootstrap_ci(metric_fn("forecast", name), y, pred, subjects, n_boot=100)
        assert np.isfinite([ci["value"], ci["low"], ci["high"]]).all()
        assert ci["low"] <= ci["value"] <= ci["high"] and ci["high"] > ci["low"]
    with pytest.raises(ConfigError, match="groups"):
        bootstrap_ci(mae, y, pred, subjects[:-1])


def test_score_rows_one_row_per_metric():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    proba1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(scale=0.2, size=40), 0, 1)
    rows = score_rows("classification", "sex", "brainlm", y, np.column_stack([1 - proba1,
                      proba1]), np.repeat(np.arange(20), 2), n_boot=50)
    assert [r["metric"] for r in rows] == ["accuracy", "balanced_accuracy", "roc_auc"]
    assert all(r["n_subjects"] == 20 and r["low"] <= r["value"] <= r["high"] for r in rows)


def test_subject_split_check():
    subject_split_check(["sub-01", "sub-02"], ["sub-03"])
    with pytest.raises(ConfigError, match="sub-02.*sub-05|sub-05.*sub-02") as e:
        subject_split_check(["sub-01", "sub-02", "sub-05"], ["sub-05", "sub-02", "sub-09"])
    assert "sub-01" not in str(e.value) and "sub-09" not in str(e.value)


# ----------------------------------------------------------------------------- features

def test_fc_features_match_manual():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 50))
    x[1] += x[0]
    expected = np.arctanh(np.corrcoef(x)[np.triu_indices(4, k=1)])
    np.testing.assert_allclose(fc_features(x), expected, rtol=1e-6)
    assert fc_features(rng.normal(size=(12, 30))).shape == (66,)


def test_fc_features_constant_parcel_is_zero():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 40))
    x[2] = 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = fc_features(x)
    assert np.isfinite(f).all()
    assert f[1] == 0 and f[2] == 0  # pairs (0, 2) and (1, 2)
    assert np.isfinite(fc_features(np.tile([[0.0, 1.0]], (2, 5)))).all()  # r = 1 is clipped


def test_roi_block_features():
    x = np.arange(2 * 240, dtype=float).reshape(2, 240)
    f = roi_block_features(x, block=20, window=200)
    assert f.shape == (2 * 10,)
    assert f[0] == pytest.approx(9.5) and f[10] == pytest.approx(240 + 9.5)
    with pytest.raises(ConfigError, match="window"):
        roi_block_features(x[:, :150])


# ----------------------------------------------------------------------------- baselines

def _planted_fc(n_subjects=30, per_subject=2, parcels=12, time=150, seed=0):
    """corr(parcel 0, parcel 1) = 0.8 tanh(y) for subject variable y; 60 recordings."""
    rng = np.random.default_rng(seed)
    ys = rng.normal(size=n_subjects)
    xs, y, subjects = [], [], []
    for s, ys_s in enumerate(ys):
        rho = 0.8 * np.tanh(ys_s)
        for _ in range(per_subject):
            x = rng.normal(size=(parcels, time))
            x[1] = rho * x[0] + np.sqrt(1 - rho**2) * x[1]
            xs.append(x)
            y.append(ys_s)
            subjects.append(f"sub-{s:02d}")
    return xs, np.array(y), np.array(subjects)


def _split(subjects, n_train):
    train = np.isin(subjects, np.unique(subjects)[:n_train])
    subject_split_check(subjects[train], subjects[~train])
    return np.flatnonzero(train), np.flatnonzero(~train)


def _take(xs, idx):
    return [xs[i] for i in idx]


def test_fc_baseline_recovers_planted_regression_effect():
    xs, y, subjects = _planted_fc()
    tr, te = _split(subjects, 22)
    model = FCBaseline("regression").fit(_take(xs, tr), y[tr], groups=subjects[tr])
    assert regression_metrics(y[te], model.predict(_take(xs, te)))["r2"] > 0.5


def test_fc_baseline_recovers_planted_classification_effect():
    xs, y, subjects = _planted_fc()
    label = (y > np.median(y)).astype(int)
    tr, te = _split(subjects, 22)
    model = FCBaseline("classification").fit(_take(xs, tr), label[tr], groups=subjects[tr])
    proba = model.predict_proba(_take(xs, te))
    assert proba.shape == (len(te), 2)
    m = classification_metrics(label[te], proba, model.classes_)
    assert m["balanced_accuracy"] > 0.75


def test_fc_baseline_errors():
    with pytest.raises(ConfigError, match="task"):
        FCBaseline("forecast")
    with pytest.raises(ConfigError, match="fit"):
        FCBaseline("regression").predict([np.zeros((3, 10))])
    with pytest.raises(ConfigError, match="targets"):
        FCBaseline("regression").fit([np.ones((3, 10)), np.ones((3, 10))], [1.0])
    with pytest.raises(ConfigError, match="one class"):
        FCBaseline("classification").fit([np.ones((3, 10))] * 4, [1, 1, 1, 1])


def _planted_mean(task, n=120, parcels=8, time=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n) if task == "classification" else rng.normal(size=n)
    xs = rng.normal(size=(n, parcels, time))
    xs[:, 0] += 0.8 * y[:, None]  # the mean level of parcel 0 carries the target
    return xs, y


def test_raw_roi_mlp_classification_beats_chance():
    xs, y = _planted_mean("classification")
    model = RawROIMLP("classification", seed=0).fit(xs[:80], y[:80])
    m = classification_metrics(y[80:], model.predict_proba(xs[80:]), model.classes_)
    assert m["balanced_accuracy"] > 0.7


def test_raw_roi_mlp_regression_beats_chance():
    xs, y = _planted_mean("regression")
    model = RawROIMLP("regression", seed=0).fit(xs[:80], y[:80])
    pred = model.predict(xs[80:])
    assert pred.shape == (40,)
    assert regression_metrics(y[80:], pred)["pearson_r"] > 0.4
    with pytest.raises(ConfigError, match="window"):
        RawROIMLP("regression").fit(xs[:10, :, :100], y[:10])


def _ar(n, parcels, length, phi, seed):
    rng = np.random.default_rng(seed)
    burn = 50
    x = np.zeros((n, parcels, length + burn))
    e = rng.normal(size=x.shape)
    for t in range(len(phi), x.shape[2]):
        x[..., t] = sum(p * x[..., t - 1 - k] for k, p in enumerate(phi)) + e[..., t]
    return x[..., burn:]


def test_forecast_baseline_shapes():
    ctx = np.arange(2 * 3 * 6, dtype=float).reshape(2, 3, 6)
    p = persistence(ctx, 4)
    assert p.shape == (2, 3, 4) and (p == ctx[..., -1:]).all()
    m = parcel_mean(ctx, 4)
    assert m.shape == (2, 3, 4) and np.allclose(m, ctx.mean(-1, keepdims=True))
    ar = LinearAR(order=5).fit(ctx, np.zeros((2, 3, 4)))
    assert ar.predict(ctx[:1]).shape == (1, 3, 4)
    with pytest.raises(ConfigError, match="order"):
        LinearAR(order=10).fit(ctx, np.zeros((2, 3, 4)))


@pytest.mark.parametrize("phi", [(0.9,), (1.5, -0.75)])
def test_linear_ar_beats_naive_forecasts(phi):
    train, test = _ar(150, 8, 35, phi, 1), _ar(60, 8, 35, phi, 2)
    ar = LinearAR(order=10).fit(train[..., :30], train[..., 30:])
    ctx, future = test[..., :30], test[..., 30:]
    mse = {name: forecast_metrics(future, pred)["mse"]
           for name, pred in [("ar", ar.predict(ctx)), ("persistence", persistence(ctx, 5)),
                              ("mean", parcel_mean(ctx, 5))]}
    assert mse["ar"] < 0.95 * mse["persistence"] and mse["ar"] < 0.95 * mse["mean"]


# ----------------------------------------------------------------------------- reports

def _rows():
    base = {"task": "regression", "target": "age", "metric": "r2", "n_subjects": 20}
    return [
        {**base, "method": "fc_linear", "value": 0.41, "low": 0.2, "high": 0.55},
        {**base, "method": "raw_roi_mlp", "value": 0.1, "low": -0.1, "high": 0.3},
        {**base, "method": "brainlm", "value": 0.35, "low": 0.1, "high": 0.5},
        {**base, "method": "brainlm", "metric": "mae", "value": 4.2, "low": 3.9,
         "high": 4.61},
        {**base, "method": "persistence", "metric": "mae", "value": float("nan"),
         "low": float("nan"), "high": float("nan")},
    ]


def test_results_table_model_first_with_ci():
    table = results_table(_rows())
    lines = table.strip().splitlines()
    assert "95 % CI" in lines[0] and len(lines) == 2 + 5
    for method in ("brainlm", "fc_linear", "raw_roi_mlp", "persistence"):
        assert method in table
    assert "[0.100, 0.500]" in table and "[3.900, 4.610]" in table and "n/a" in table
    r2_lines = [ln for ln in lines if "| r2 |" in ln]
    assert ["brainlm" in r2_lines[0], "fc_linear" in r2_lines[1],
            "raw_roi_mlp" in r2_lines[2]] == [True, True, True]


def test_write_results(tmp_path):
    paths = write_results(_rows(), tmp_path / "eval")
    assert set(paths) == {"markdown", "json"}
    assert paths["markdown"].read_text() == results_table(_rows())
    data = json.loads(paths["json"].read_text())
    assert len(data) == 5 and data[0]["method"] == "brainlm"
    assert any(r["value"] is None for r in data)  # NaN written as null
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json",
                                                                      "results.md"]


def test_plots_write_png(tmp_path):
    png = plot_comparison(_rows(), tmp_path / "cmp.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    png = plot_forecast({"brainlm": [0.5, 0.3, 0.1], "persistence": [0.4, 0.1, -0.2]},
                        tmp_path / "fc" / "horizon.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- sane baselines

def test_fc_baseline_row_space_projection_is_exact():
    """_RowSpace changes the solver's problem size, not the answer: same penalty grid, same
    choice and same predictions as the full-width L2 fits (ridge and logistic) on the same
    inner folds."""
    from sklearn.pipeline import make_pipeline

    from brainlm.evaluate.baselines import _inner_cv
    from brainlm.evaluate.heads import ScaledLogisticCV, ScaledRidgeCV, _PooledScaler

    xs, y, subjects = _planted_fc(n_subjects=16, parcels=20)
    tr, te = _split(subjects, 12)
    fast = FCBaseline("regression").fit(_take(xs, tr), y[tr], groups=subjects[tr])
    X = np.stack([fc_features(x) for x in xs])
    full = make_pipeline(_PooledScaler(), ScaledRidgeCV(
        cv=_inner_cv("regression", y[tr], subjects[tr], 0)))
    full.fit(X[tr], y[tr])
    np.testing.assert_allclose(fast.model[-1].alphas_, full[-1].alphas_, rtol=1e-9)
    np.testing.assert_allclose(fast.predict(_take(xs, te)), full.predict(X[te]), rtol=1e-6,
                               atol=1e-8)
    # weakly informative labels: a well-conditioned optimum (separable data has none)
    label = ((y + np.random.default_rng(1).normal(0, 1.5, len(y))) > 0).astype(int)
    fast = FCBaseline("classification").fit(_take(xs, tr), label[tr], groups=subjects[tr])
    full = make_pipeline(_PooledScaler(), ScaledLogisticCV(
        cv=_inner_cv("classification", label[tr], subjects[tr], 0)))
    full.fit(X[tr], label[tr])
    assert fast.model[-1].C_ == pytest.approx(full[-1].C_)
    np.testing.assert_allclose(fast.predict_proba(_take(xs, te)), full.predict_proba(X[te]),
                               atol=1e-3)


def test_train_mean_and_majority():
    from brainlm.evaluate import TrainMean

    xs = np.zeros((5, 3, 10))
    m = TrainMean("regression").fit(xs, [1.0, 2.0, 3.0, 4.0, 10.0])
    assert m.name == "train_mean"
    np.testing.assert_allclose(m.predict(xs[:2]), [4.0, 4.0])
    c = TrainMean("classification").fit(xs, ["F", "M", "M", "M", "F"])
    assert c.name == "majority" and list(c.classes_) == ["F", "M"]
    np.testing.assert_allclose(c.predict_proba(xs[:3]), [[0.4, 0.6]] * 3)
    assert list(c.predict(xs[:2])) == ["M", "M"]
    metrics = classification_metrics(["F", "M", "M"], c.predict_proba(xs[:3]), c.classes_)
    assert metrics["roc_auc"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="fit"):
        TrainMean("regression").predict(xs)


def _noise_cohort(n_subjects, seed, parcels=30, time=200):
    """Targets unrelated to the signals: nothing to learn, so the floor is the best there is."""
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n_subjects, parcels, time))
    xs += 3.0 * rng.normal(size=(n_subjects, parcels, 1))  # large nuisance offsets per parcel
    y = rng.uniform(20, 80, n_subjects)
    return xs, y, np.array([f"sub-{i:02d}" for i in range(n_subjects)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raw_roi_mlp_never_far_below_train_mean(seed):
    """The demo's failure (R^2 -59, MAE 63.7 years where the mean gives ~9): 24 training
    subjects, thousands of inputs, nothing to learn. The inner-CV'd penalty must keep the MLP
    near the training-mean predictor on the held-out subjects."""
    from brainlm.evaluate import TrainMean

    xs, y, subjects = _noise_cohort(32, seed)
    tr, te = np.arange(24), np.arange(24, 32)
    mlp = RawROIMLP("regression", seed=0).fit(xs[tr], y[tr], groups=subjects[tr])
    floor = TrainMean("regression").fit(xs[tr], y[tr])
    m_mlp = regression_metrics(y[te], mlp.predict(xs[te]))
    m_floor = regression_metrics(y[te], floor.predict(xs[te]))
    assert m_mlp["mae"] <= 1.25 * m_floor["mae"], (m_mlp, m_floor, mlp.alpha_)
    assert m_mlp["r2"] >= m_floor["r2"] - 0.25, (m_mlp, m_floor, mlp.alpha_)


def test_raw_roi_mlp_penalty_chosen_by_inner_cv():
    """Signal present -> a light penalty wins; no signal -> the heaviest on the grid."""
    xs, y = _planted_mean("regression")
    subjects = np.array([f"s{i // 2}" for i in range(len(y))])
    learn = RawROIMLP("regression", seed=0).fit(xs[:80], y[:80], groups=subjects[:80])
    noise, target, subj = _noise_cohort(40, 3)
    floor = RawROIMLP("regression", seed=0).fit(noise, target, groups=subj)
    assert learn.alpha_ < floor.alpha_
    # the chosen penalty shrinks the network to (nearly) the training mean
    assert np.std(floor.predict(noise)) < 0.1 * np.std(target), floor.alpha_
    assert regression_metrics(y[80:], learn.predict(xs[80:]))["pearson_r"] > 0.4



# ----------------------------------------------------------------------------- fair baselines

def test_window_starts_are_brainlms_windows():
    """The MLP's windows are exactly those BrainLM averages over (sliding_batches)."""
    from brainlm.data.windows import sliding_batches
    from brainlm.evaluate.baselines import window_starts

    assert window_starts(300, 100) == [0, 100, 200]
    assert window_starts(350, 100) == [0, 100, 200, 250]  # the last ends at the last timepoint
    assert window_starts(100, 100) == [0] and window_starts(120, 40, 30) == [0, 30, 60, 80]
    xs = [np.arange(2 * t, dtype=np.float32).reshape(2, t) for t in (100, 130, 255)]
    seen = [x.numpy() for x, _ in sliding_batches(xs, 50, 50, 100)][0]
    mine = [x[:, s:s + 50] for x in xs for s in window_starts(x.shape[1], 50)]
    np.testing.assert_array_equal(seen, np.stack(mine))
    with pytest.raises(ConfigError, match="no window"):
        window_starts(40, 50)


def test_raw_roi_mlp_sees_every_window():
    """The target is only in the SECOND window of each recording (a first-window MLP sees
    nothing); trained on every window and averaged per recording, the MLP finds it."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=120)
    xs = rng.normal(size=(120, 8, 400))
    xs[:, 0, 200:] += 0.8 * y[:, None]
    subjects = np.array([f"s{i // 2}" for i in range(120)])
    model = RawROIMLP("regression", seed=0).fit(xs[:80], y[:80], groups=subjects[:80])
    X, owner = model._design(list(xs[80:]))
    assert X.shape == (80, 8 * 10) and list(np.bincount(owner)) == [2] * 40
    window_pred = model.model.predict(X)
    pred = model.predict(xs[80:])  # the mean of each recording's two windows
    np.testing.assert_allclose(pred, window_pred.reshape(40, 2).mean(axis=1))
    assert regression_metrics(y[80:], pred)["pearson_r"] > 0.4


def test_penalty_grid_follows_the_data_scale():
    """Features x 1e3 -> every candidate penalty and the chosen one x 1e6 (logistic C / 1e6),
    the same predictions; the grid spans the trace of the centred Gram matrix."""
    from brainlm.evaluate.heads import RIDGE_FACTORS, ScaledLogisticCV, ScaledRidgeCV

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 30))
    y = X[:, 0] + rng.normal(size=60)
    a, b = ScaledRidgeCV().fit(X, y), ScaledRidgeCV().fit(1e3 * X, y)
    trace = float(np.sum((X - X.mean(0)) ** 2))
    np.testing.assert_allclose(a.alphas_, trace * np.asarray(RIDGE_FACTORS))
    assert b.alpha_ == pytest.approx(1e6 * a.alpha_, rel=1e-9) and a.edge_ is None
    np.testing.assert_allclose(a.predict(X), b.predict(1e3 * X), rtol=1e-6)
    label = (y > 0).astype(int)
    c, d = ScaledLogisticCV().fit(X, label), ScaledLogisticCV().fit(1e3 * X, label)
    assert d.C_ == pytest.approx(c.C_ / 1e6, rel=1e-6) and c.edge_ is None


def test_penalty_edge_warned_only_when_the_grid_limits_it():
    """Healthy data: an interior penalty and no warning. A grid forced far below the data's
    scale (nothing to learn, every penalty too light): the highest edge, warned with the
    baseline's name and penalty, and marked for the results row."""
    xs, y, subjects = _planted_fc()
    tr, _ = _split(subjects, 22)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        healthy = FCBaseline("regression").fit(_take(xs, tr), y[tr], groups=subjects[tr])
    assert not [w for w in caught if "penalty" in str(w.message)]
    assert healthy.penalty_["penalty_edge"] is None and not healthy.penalty_["penalty_at_edge"]
    noise, target, subj = _noise_cohort(30, 1)
    with pytest.warns(UserWarning, match=r"fc_linear: .*highest penalty .*alpha="):
        forced = FCBaseline("regression", factors=(1e-9, 1e-8, 1e-7)).fit(
            list(noise), target, groups=subj)
    assert forced.penalty_["penalty_at_edge"] and forced.penalty_["penalty_edge"] == "highest"
    # on the default grid the same data end on the floor's plateau: not limiting, not warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        floor = FCBaseline("regression").fit(list(noise), target, groups=subj)
    assert not floor.penalty_["penalty_at_edge"]
    assert not [w for w in caught if "penalty" in str(w.message)]


def test_tangent_baseline_recovers_planted_covariance_effect():
    """Tangent-space connectome + ridge finds a planted covariance effect; its reference mean
    is the training recordings' alone."""
    from nilearn.connectome import ConnectivityMeasure

    from brainlm.evaluate.baselines import TangentBaseline

    xs, y, subjects = _planted_fc(seed=1)
    tr, te = _split(subjects, 22)
    model = TangentBaseline("regression").fit(_take(xs, tr), y[tr], groups=subjects[tr])
    assert model.name == "tangent_linear"
    assert regression_metrics(y[te], model.predict(_take(xs, te)))["r2"] > 0.5
    ref = ConnectivityMeasure(kind="tangent").fit([xs[i].T for i in tr])
    np.testing.assert_allclose(model.measure_.mean_, ref.mean_, rtol=1e-6)
    with pytest.raises(ConfigError, match="fit"):
        TangentBaseline("regression").predict(xs[:2])


def test_paired_comparisons_orientation_and_verdict_rule():
    """BrainLM minus the baseline with > 0 = BrainLM better, error metrics flipped; `better`
    / `worse` only when the interval excludes 0, `undecided` when it spans 0."""
    from brainlm.evaluate.comparisons import paired_comparisons

    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(30), 2)
    y = rng.normal(size=60)
    good, bad = y + 0.3 * rng.normal(size=60), y + 1.5 * rng.normal(size=60)
    twin = good + 0.01 * rng.normal(size=60)  # as good as BrainLM
    out = paired_comparisons("regression", "age", "val", y,
                             {"brainlm": good, "bad": bad, "twin": twin}, subjects,
                             n_boot=200)
    by = {(c["baseline"], c["metric"]): c for c in out}
    assert len(out) == 6 and {c["split"] for c in out} == {"val"}
    for metric in ("r2", "mae", "pearson_r"):
        assert by["bad", metric]["verdict"] == "better" and by["bad", metric]["value"] > 0
    mae = by["bad", "mae"]
    assert mae["value"] == pytest.approx(mae["baseline_value"] - mae["brainlm"])
    assert mae["brainlm"] == pytest.approx(mae_fn := float(np.mean(np.abs(y - good))))
    assert mae_fn < mae["baseline_value"] and not mae["higher_is_better"]
    flipped = paired_comparisons("regression", "age", "val", y, {"brainlm": bad, "x": good},
                                 subjects, n_boot=200)
    assert {c["verdict"] for c in flipped} == {"worse"}
    for c in out + flipped:
        assert c["verdict"] == ("better" if c["low"] > 0 else "worse" if c["high"] < 0
                                else "undecided")
    assert any(c["verdict"] == "undecided" and c["low"] < 0 < c["high"]
               for c in out if c["baseline"] == "twin")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A store (tests.helpers.age_effect_setup) and a fine-tuning run folder written by hand:
    BrainLM's val and test predictions are the truth itself (so it beats the floor on any
    resample), no training needed."""
    import pandas as pd

    from brainlm.data.store import BrainStore, store_fingerprint
    from tests.helpers import age_effect_setup

    root = age_effect_setup(tmp_path_factory.mktemp("ev"), 20, 120, 6)
    store = BrainStore(root / "store")
    rows = [{"recording_id": r["recording_id"], "subject": r["subject"], "split": split,
             "y_true": r["age"], "y_pred": r["age"]}
            for split in ("val", "test") for _, r in store.recordings(split).iterrows()]
    run = root / "run"
    run.mkdir()
    pd.DataFrame(rows).to_parquet(run / "predictions.parquet", index=False)
    (run / "finetune.json").write_text(json.dumps({
        "config": {"task": "regression", "target": "age"}, "store": str(root / "store"),
        "store_fingerprint": store_fingerprint(root / "store"), "window": 40,
        "patch_size": 10, "classes": None}))
    return run


def test_evaluate_run_scores_val_and_test_and_compares_paired(scored_run):
    from brainlm.evaluate import evaluate_run
    from brainlm.evaluate.comparisons import tracking_values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grid edges on 12 training subjects
        result = evaluate_run(scored_run, n_boot=100)
    out = scored_run / "evaluation"
    rows = json.loads((out / "results.json").read_text())
    methods = {"brainlm", "fc_linear", "tangent_linear", "raw_roi_mlp", "train_mean"}
    for split in ("val", "test"):
        assert {r["method"] for r in rows if r["split"] == split} == methods
    assert all("penalty" in r and "penalty_at_edge" in r for r in rows
               if r["method"] in ("fc_linear", "tangent_linear", "raw_roi_mlp"))
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert {(c["split"], c["baseline"]) for c in comparisons} == {
        (s, m) for s in ("val", "test") for m in methods - {"brainlm"}}
    keys = {"split", "metric", "baseline", "value", "low", "high", "verdict", "brainlm",
            "baseline_value", "n_subjects"}
    for c in comparisons:
        assert keys <= set(c)
        assert c["verdict"] == ("better" if c["low"] > 0 else "worse" if c["high"] < 0
                                else "undecided"), c
    perfect = [c for c in comparisons if c["baseline"] == "train_mean" and c["metric"] == "r2"]
    assert [c["verdict"] for c in perfect] == ["better", "better"]  # test, then val
    text = (out / "results.md").read_text()
    assert "## Validation split" in text and "paired over subjects" in text
    assert text.index("## Validation split") < text.index("## Positive control")
    values = tracking_values(result["rows"], result["comparisons"])
    assert values["verdict.vs_train_mean.r2"] == "better"
    assert values["verdict.val_vs_train_mean.r2"] == "better"
    assert values["vs_fc_linear_mae_low"] <= values["vs_fc_linear_mae"] <= \
        values["vs_fc_linear_mae_high"]
    assert "val_brainlm_r2" in values and "brainlm_r2" in values


# ----------------------------------------------------------------------------- positive controls

def _control_rows(value, metric="r2", task="regression", target="age", high=0.9):
    base = {"task": task, "target": target, "n_subjects": 8}
    return [{**base, "method": "brainlm", "metric": metric, "value": -0.1, "low": -0.5,
             "high": 0.2},
            {**base, "method": "fc_linear", "metric": metric, "value": value, "low": 0.1,
             "high": high}]


def test_positive_control_section():
    from brainlm.evaluate import positive_controls

    truth = {"effects": {"positive_controls": {
        "age": {"task": "regression", "method": "fc_linear", "metric": "r2", "threshold": 0.5},
        "sex": {"task": "classification", "method": "fc_linear", "metric": "roc_auc",
                "threshold": 0.8}, "symptom": None}}}
    summary, md = positive_controls(_control_rows(0.62), "age", "regression", truth, "gt.json")
    assert summary["status"] == "passed" and summary["threshold"] == 0.5
    assert summary["brainlm"]["value"] == -0.1  # reported whatever it scores
    assert "## Positive control" in md and "PASSED" in md and "brainlm" in md and "-0.100" in md
    summary, md = positive_controls(_control_rows(0.31, high=0.45), "age", "regression", truth)
    assert summary["status"] == "failed" and "FAILED" in md
    summary, _ = positive_controls(_control_rows(0.79, "roc_auc", "classification", "sex",
                                                 high=0.79), "sex", "classification", truth)
    assert summary["status"] == "failed"
    summary, _ = positive_controls(_control_rows(float("nan"), "roc_auc", "classification",
                                                 "sex"), "sex", "classification", truth)
    assert summary["status"] == "undetermined"
    summary, md = positive_controls(_control_rows(0.9), "symptom", "regression", truth)
    assert summary["status"] == "none" and "no positive control" in md
    summary, md = positive_controls(_control_rows(0.9), "age", "regression", None)
    assert summary["status"] == "none" and "not a brainlm synthetic cohort" in md


def test_plot_keeps_a_wild_baseline_off_scale(tmp_path):
    from brainlm.evaluate.report import _axis_limits

    base = {"task": "regression", "target": "age", "metric": "r2", "low": None, "high": None}
    group = [{**base, "method": "brainlm", "value": 0.3},
             {**base, "method": "raw_roi_mlp", "value": -59.0},
             {**base, "method": "train_mean", "value": -0.01}]
    lo, hi = _axis_limits("r2", group)
    assert -1.2 < lo <= -1.0 and hi >= 0.3
    mae = [{**r, "metric": "mae", "value": v} for r, v in zip(group, (7.0, 63.7, 8.5))]
    lo, hi = _axis_limits("mae", mae)
    assert lo == 0 and 25 < hi < 30  # 3x the train-mean row
    assert plot_comparison(group + mae, tmp_path / "p.png").stat().st_size > 1000
