"""The linear prior a decoder can start from (`brainlm.model.prior`): the batched conditional
Gaussian is the ladder's, an untrained model with the prior predicts exactly the space-time
rung, and the prior travels with the saved weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainlm.errors import ConfigError
from brainlm.model.config import BrainLMConfig
from brainlm.model.modeling import BrainLMForPretraining
from brainlm.model.prior import conditional_gaussian
from brainlm.train.linear_rungs import GaussianRung, SpaceTimeRung
from brainlm.train.reconstruction import predict_baselines, token_mask

P, T, PATCH = 12, 40, 10


def _series(n: int, seed: int) -> list[np.ndarray]:
    """Correlated parcels (two latent sources) with a slow time course."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((P, 2))
    out = []
    for _ in range(n):
        src = np.cumsum(rng.standard_normal((2, T)), axis=1) * 0.3
        out.append((mix @ src + 0.5 * rng.standard_normal((P, T))).astype(np.float32))
    return out


def _fitted(ratio: float = 0.5):
    train = _series(16, 0)
    gaussian = GaussianRung.fit(train)
    rung = SpaceTimeRung(gaussian)
    x = torch.from_numpy(np.stack(train))
    model = _model(ratio)
    for seed in range(3):
        _, ids_mask = model.masking(len(x), P, T // PATCH, ratio, "random", 1,
                                    torch.rand(len(x), P * T // PATCH,
                                               generator=torch.Generator().manual_seed(seed)),
                                    "cpu")
        m = token_mask(P, T // PATCH, ids_mask)
        rung.partial_fit(x, m, predict_baselines(x, m, gaussian=gaussian))
    return gaussian, rung.fit()


def _model(ratio: float = 0.5, **kw) -> BrainLMForPretraining:
    torch.manual_seed(0)
    coords = np.random.default_rng(1).uniform(-60, 60, (P, 3)).round(3).tolist()
    return BrainLMForPretraining(BrainLMConfig.from_preset(
        "tiny", window=T, patch_size=PATCH, mask_ratio=ratio, parcel_coords=coords,
        linear_prior=True, **kw)).eval()


def test_batched_conditional_gaussian_is_the_ladders():
    gaussian, _ = _fitted()
    x = torch.from_numpy(np.stack(_series(4, 5))).double()
    m = torch.rand(4, P, T // PATCH, generator=torch.Generator().manual_seed(3)) < 0.6
    m[0, :, 0] = True  # a time patch with nothing visible: the training mean
    m[1, :, 1] = False  # one with everything visible: leave-one-out everywhere
    want = gaussian.condition(x, m)
    got = conditional_gaussian(x, m, gaussian.mean, gaussian.cov)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got[0, :, :PATCH].numpy(),
                               gaussian.mean.numpy()[:, None].repeat(PATCH, 1), atol=1e-8)
    # the model runs it in float32: the same predictions to float32's precision
    single = conditional_gaussian(x.float(), m, gaussian.mean.float(), gaussian.cov.float())
    np.testing.assert_allclose(single.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_untrained_model_with_the_prior_predicts_the_space_time_rung(tmp_path):
    gaussian, rung = _fitted()
    model = _model()
    assert not model.prior.fitted
    model.prior.load_fitted(gaussian.mean, gaussian.cov, rung.weight)
    x = torch.from_numpy(np.stack(_series(3, 9)))
    noise = torch.rand(3, P * T // PATCH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x, noise=noise)
    recon, mask = model.reconstruct(x, out)
    m = token_mask(P, T // PATCH, out.ids_mask)
    want = rung.predict(x, m, predict_baselines(x, m, gaussian=gaussian))
    np.testing.assert_allclose(recon[mask].numpy(), want[mask].numpy(), rtol=1e-5, atol=1e-5)
    # training moves the residual head, and the prior is saved with the weights
    model.train()
    out = model(x, noise=noise)
    out.loss.backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")
    again = BrainLMForPretraining.from_pretrained(tmp_path / "m").eval()
    assert again.prior.fitted
    for name in ("mean", "cov", "weight"):
        torch.testing.assert_close(getattr(again.prior, name), getattr(model.prior, name))


def test_the_prior_needs_its_atlas():
    with pytest.raises(ConfigError, match="parcel_coords"):
        BrainLMConfig.from_preset("tiny", window=T, patch_size=PATCH, linear_prior=True)
    model = _model()
    x = torch.zeros(1, P + 1, T)
    coords = torch.zeros(P + 1, 3)
    with pytest.raises(ConfigError, match=f"fitted on {P} parcels"):
        model(x, coords)


def test_the_rungs_are_fitted_on_windows_spread_over_the_training_subjects(tmp_path):
    """A cap on the rungs' training windows takes them from every subject, not from the first
    few (a large cohort's first 64 windows are a handful of subjects)."""
    from tests.helpers import age_effect_setup
    from brainlm.data.store import BrainStore
    from brainlm.train.config import PretrainConfig
    from brainlm.train.scoring import _eval_windows

    store = BrainStore(age_effect_setup(tmp_path, 20, 120, 8) / "store")
    train = set(store.recordings("train")["subject"])
    cfg = PretrainConfig(data=tmp_path, out=tmp_path / "m", window=40)  # 3 windows each
    seen = [s for _, x, subjects in _eval_windows(store, "train", cfg, len(train))
            for s in subjects]
    assert len(seen) == len(train) and set(seen) == train
