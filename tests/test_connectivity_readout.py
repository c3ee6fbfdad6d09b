"""The connectivity readout: the encoder's tokens read out as FC is (`model.heads`), with the
FC baseline's head fitted in closed form (`train.closed_form`) and served like any head."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import age_effect_setup
from brainlm.data.store import BrainStore
from brainlm.errors import ConfigError
from brainlm.evaluate.baselines import RIDGE_FACTORS, _linear_head
from brainlm.model.heads import Head, token_connectivity
from brainlm.predictor import FinetunedModel
from brainlm.train.closed_form import affine_of, fit_head
from brainlm.train.finetune import FinetuneConfig, finetune


def test_token_connectivity_is_the_fisher_z_correlation_of_parcel_embeddings():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 4 * 3, 5)).astype(np.float32)  # P=4, N=3, H=5
    got = token_connectivity(torch.from_numpy(tokens), 4).numpy()
    per = tokens.reshape(2, 4, 3, 5)
    per = (per - per.mean(2, keepdims=True)).reshape(2, 4, 15)
    iu = np.triu_indices(4, 1)
    assert got.shape == (2, 6)
    cos = np.stack([(lambda e: (e @ e.T)[iu])(per[b] / np.linalg.norm(per[b], axis=1,
                                                                        keepdims=True))
                    for b in range(2)])
    np.testing.assert_allclose(got, np.arctanh(cos), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task,n,d", [("regression", 30, 200), ("regression", 60, 8),
                                      ("classification", 30, 200)])
def test_the_closed_form_head_is_the_baselines_pipeline(task, n, d):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d)) * 3 + 1
    y = x[:, 0] + 0.5 * rng.standard_normal(n)
    if task == "classification":
        y = (y > np.median(y)).astype(int)
    groups = np.arange(n)
    pipe = _linear_head(task, y, groups, 0, "pooled", RIDGE_FACTORS).fit(x, y)
    w, b = affine_of(pipe)
    if task == "regression":
        want = pipe.predict(x)
    else:  # the logit of class 1
        proba = pipe.predict_proba(x)
        want = np.log(proba[:, 1] / proba[:, 0])
    np.testing.assert_allclose((x @ w + b).squeeze(-1), want, rtol=1e-6, atol=1e-6)
    head = Head(d, 2 if task == "classification" else 1, 0.0)
    fit_head(head, x, y, groups, task, 2, 0)
    with torch.no_grad():
        out = head(torch.as_tensor(x, dtype=torch.float32)).numpy()
    if task == "classification":
        np.testing.assert_allclose(out[:, 1] - out[:, 0], want, rtol=1e-3, atol=1e-3)
    else:
        np.testing.assert_allclose(out[:, 0], want, rtol=1e-3, atol=1e-3)


def test_a_connectivity_probe_is_fitted_once_and_served_as_it_predicted(tmp_path):
    root = age_effect_setup(tmp_path, 20, 120, 8)
    run = tmp_path / "run"
    meta = finetune(FinetuneConfig(model=root / "model", data=root / "store", out=run,
                                   target="age", pooling="connectivity", progress=False))
    assert meta["epochs_run"] == 1 and "alpha" in meta["history"][0]
    store = BrainStore(root / "store")
    rows = store.recordings("test")
    want = pd.read_parquet(run / "predictions.parquet").set_index("recording_id").loc[
        rows["recording_id"], "y_pred"].to_numpy()
    got = FinetunedModel(run).predict([np.asarray(store.load(r)) for _, r in rows.iterrows()],
                                      scaled=True)["prediction"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert np.ptp(want) > 0


def test_the_closed_form_head_chooses_its_penalty_over_subjects_not_rows():
    """Several recordings per subject: the inner CV keeps a subject's rows together, so a
    subject-specific offset (which says nothing about new subjects) cannot pick the penalty."""
    from brainlm.evaluate.baselines import _inner_cv

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(12), 3)
    y = rng.standard_normal(36)
    for train, test in _inner_cv("regression", y, groups, 0):
        assert not set(groups[train]) & set(groups[test])
    x = rng.standard_normal((36, 50)) + np.repeat(rng.standard_normal((12, 50)), 3, axis=0)
    head = Head(50, 1, 0.0)
    chosen = fit_head(head, x, y, groups, "regression", 1, 0)
    pipe = _linear_head("regression", y, groups, 0, "pooled", RIDGE_FACTORS).fit(x, y)
    assert chosen["alpha"] == pytest.approx(pipe.steps[-1][1].alpha_)


def test_a_connectivity_probe_never_reads_held_out_targets(tmp_path, monkeypatch):
    """The head is the same whatever the validation and test targets are."""
    from safetensors.torch import load_file

    import brainlm.train.finetune as ft

    root = age_effect_setup(tmp_path, 20, 120, 8)
    cfg = dict(model=root / "model", data=root / "store", target="age",
               pooling="connectivity", progress=False)
    finetune(FinetuneConfig(out=tmp_path / "a", **cfg))
    real = ft._subject_targets

    def scrambled(cfg_, splits):
        targets, *rest = real(cfg_, splits)
        for s in ("val", "test"):
            targets[s] = np.random.default_rng(0).permutation(targets[s]) * 3 + 1
        return (targets, *rest)

    monkeypatch.setattr(ft, "_subject_targets", scrambled)
    finetune(FinetuneConfig(out=tmp_path / "b", **cfg))
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_connectivity_is_a_probe_only():
    with pytest.raises(ConfigError, match="--mode probe"):
        FinetuneConfig(model="m", data="d", out="o", target="age", mode="full",
                       pooling="connectivity").validate()
