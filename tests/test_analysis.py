"""Analysis: rotating-mask reconstruction, network identification, in-silico perturbation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.signal import detrend

from brainlm.analysis.networks import (cluster_parcels, fc_matrix, identify_networks,
                                       network_agreement, parcel_representations)
from brainlm.analysis.perturbation import (apply_perturbation, effect_summary,
                                           perturb_recording, save_effect)
from brainlm.analysis.reconstruction import (plot_reconstruction, reconstruct_recording,
                                             rotating_masks, window_starts)
from brainlm.data.synthetic import simulate_cohort
from brainlm.errors import BrainLMError, ConfigError
from brainlm.model.config import BrainLMConfig
from brainlm.model.modeling import BrainLMForPretraining

PNG = b"\x89PNG\r\n\x1a\n"
WINDOW, PATCH = 40, 10


def tiny(seed: int = 0) -> BrainLMForPretraining:
    torch.manual_seed(seed)
    cfg = BrainLMConfig.from_preset("tiny", window=WINDOW, patch_size=PATCH)
    return BrainLMForPretraining(cfg).eval()


def brain_coords(n: int, seed: int = 0) -> np.ndarray:
    """Random points in a brain-sized ellipsoid (MNI-like mm)."""
    rng = np.random.default_rng(seed)
    pts = []
    while len(pts) < n:
        c = rng.uniform(-1, 1, 3)
        if (c ** 2).sum() <= 1:
            pts.append(c * [65, 95, 55] + [0, -15, 15])
    return np.array(pts, dtype=np.float32)


@pytest.fixture(scope="module")
def synth():
    """48 parcels, 4 modules, 8 subjects x 400 TRs; drift removed and each parcel z-scored
    (what the robust scaler roughly does), so FC reflects the coupling, not the drift."""
    coords = brain_coords(48)
    cohort = simulate_cohort(coords, 8, 400, tr=0.735, seed=1, n_modules=4)
    x = detrend(cohort.signals.astype(np.float64), axis=2)
    x = (x / x.std(2, keepdims=True)).astype(np.float32)
    windows = np.stack([r[:, s:s + WINDOW] for r in x for s in range(0, 400 - WINDOW + 1, WINDOW)])
    return {"coords": coords, "x": x, "windows": windows, "modules": cohort.modules}


@pytest.fixture(scope="module")
def trained(synth):
    """The tiny model after 300 AdamW steps on random windows of the synthetic cohort."""
    model = tiny(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    coords = torch.as_tensor(synth["coords"])
    x = synth["x"]
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(300):
        rec = rng.integers(0, len(x), 16)
        start = rng.integers(0, x.shape[2] - WINDOW + 1, 16)
        batch = torch.from_numpy(np.stack([x[r, :, s:s + WINDOW] for r, s in zip(rec, start)]))
        loss = model(batch, coords).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    print(f"\ntiny model: loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}")
    return model.eval()


# ----------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("p,n,passes", [(5, 4, 4), (7, 3, 4), (3, 4, 5), (6, 4, 2)])
def test_rotating_masks_partition_and_match_the_models_masking(p, n, passes):
    plan = rotating_masks(p, n, passes, seed=3)
    length = p * n
    assert plan.groups.shape == (length,) and plan.noise.shape == (passes, length)
    assert sorted(plan.groups.tolist()) == sorted(i % passes for i in range(length))
    sizes = plan.sizes()
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == length
    model = tiny()
    for g in range(passes):
        assert ((plan.noise[g] >= 0) & (plan.noise[g] < 1)).all()
        _, masked = model.masking(1, p, n, plan.ratios[g], "random", 1, plan.noise[g][None], "cpu")
        assert sorted(masked[0].tolist()) == torch.nonzero(plan.groups == g)[:, 0].tolist()
    again = rotating_masks(p, n, passes, seed=3)
    assert torch.equal(again.noise, plan.noise)
    assert not torch.equal(rotating_masks(p, n, passes, seed=4).groups, plan.groups)


@pytest.mark.parametrize("passes", [1, 0, 13])
def test_rotating_masks_reject_impossible_pass_counts(passes):
    with pytest.raises(ConfigError):
        rotating_masks(3, 4, passes)


def test_window_starts_cover_the_tail():
    assert window_starts(80, 40) == [0, 40]
    assert window_starts(95, 40) == [0, 40, 55]
    with pytest.raises(ConfigError, match="shorter"):
        window_starts(30, 40)


def test_reconstruct_recording_predicts_every_value_once_and_matches_a_manual_pass(tmp_path):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(12, 3, generator=g) * 140 - 70
    x = torch.randn(12, 95, generator=g).numpy()
    res = reconstruct_recording(model, x, coords, n_passes=4, seed=0, batch_size=2)
    assert res.recon.shape == x.shape and res.recon.dtype == np.float32
    assert np.isfinite(res.recon).all() and res.r2.shape == (12,)
    assert (res.coverage[:, :55] == 1).all() and (res.coverage[:, 55:80] == 2).all()
    assert (res.coverage[:, 80:] == 1).all()
    assert not np.allclose(res.recon, x)  # predictions, not the input copied back

    # manual: window 2 ([40, 80), no overlap there for t < 55), pass 2 of the same plan
    plan = rotating_masks(12, WINDOW // PATCH, 4, seed=0)
    w = torch.from_numpy(x[None, :, 40:80])
    with torch.no_grad():
        out = model(w, coords, mask_ratio=plan.ratios[2], mask_strategy="random",
                    noise=plan.noise[2][None])
        recon, mask = model.reconstruct(w, out)
    mask = mask[0].numpy()
    expected_mask = (plan.groups == 2).reshape(12, -1).repeat_interleave(PATCH, 1).numpy()
    np.testing.assert_array_equal(mask, expected_mask)
    early = mask.copy()
    early[:, 15:] = False  # [40, 55): predicted by this window only
    np.testing.assert_allclose(res.recon[:, 40:80][early], recon[0].numpy()[early], atol=1e-5)

    # same seed, same answer; a batch size does not change it
    again = reconstruct_recording(model, x, coords, n_passes=4, seed=0, batch_size=8)
    np.testing.assert_allclose(again.recon, res.recon, atol=1e-5)

    path = plot_reconstruction(x, res.recon, tmp_path / "recon.png", parcels=(0, 3))
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ConfigError):
        plot_reconstruction(x, res.recon, tmp_path / "bad.png", parcels=(12,))


def test_reconstruct_recording_bad_input():
    model = tiny()
    coords = np.zeros((12, 3), np.float32)
    with pytest.raises(ConfigError, match="shorter"):
        reconstruct_recording(model, np.zeros((12, 30), np.float32), coords)
    with pytest.raises(BrainLMError, match="transposed"):
        reconstruct_recording(model, np.zeros((60, 12), np.float32), coords)
    bad = np.zeros((12, 40), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        reconstruct_recording(model, bad, coords)


def _tiny_released(n_parcels: int, n_time: int):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from brainlm.model.legacy import ReleasedBrainLM

    torch.manual_seed(0)
    cfg = ViTMAEConfig(image_size=48, patch_size=8, num_channels=3, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=64,
                       mask_ratio=0.75, norm_pix_loss=False)
    coords = np.random.default_rng(0).uniform(-60, 60, (n_parcels, 3))
    return ReleasedBrainLM(ViTMAEForPreTraining(cfg), coords, n_time=n_time).eval(), coords


def test_released_model_reconstructs_and_refuses_parcel_analyses():
    model, coords = _tiny_released(12, 40)
    x = np.random.default_rng(1).standard_normal((12, 70)).astype(np.float32)
    res = reconstruct_recording(model, x, n_passes=3)  # raises unless each value masked once
    assert res.recon.shape == x.shape and np.isfinite(res.recon).all()
    with pytest.raises(ConfigError, match="Family A"):
        parcel_representations(model, x[None, :, :40], coords)


# ----------------------------------------------------------------------------- networks


def test_network_agreement_without_a_model():
    truth = np.repeat(np.arange(4), 25)
    assert network_agreement(truth, truth) == pytest.approx(1.0)
    renamed = np.array([3, 0, 2, 1])[truth]
    assert network_agreement(renamed, truth) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    chance = [network_agreement(rng.integers(0, 4, 100), truth) for _ in range(20)]
    assert abs(np.mean(chance)) < 0.05
    with pytest.raises(ConfigError):
        network_agreement(truth[:10], truth)


def test_fc_and_clustering_basics():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((2, 500))
    x = np.repeat(src, 5, axis=0) + 0.5 * rng.standard_normal((10, 500))
    fc = fc_matrix(x)
    assert fc.shape == (10, 10) and np.allclose(np.diag(fc), 1) and np.allclose(fc, fc.T)
    np.testing.assert_allclose(fc, np.corrcoef(x), atol=1e-12)
    np.testing.assert_allclose(fc_matrix([x[:, :250], x[:, 250:]]),
                               (np.corrcoef(x[:, :250]) + np.corrcoef(x[:, 250:])) / 2, atol=1e-12)
    labels = cluster_parcels(fc, 2, seed=0)
    assert network_agreement(labels, np.repeat([0, 1], 5)) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        cluster_parcels(fc, 11)


def test_raw_fc_recovers_synthetic_modules(synth):
    ari = network_agreement(cluster_parcels(fc_matrix(synth["windows"]), 4), synth["modules"])
    print(f"\nraw FC ARI (48 parcels, 4 modules, window FC): {ari:.3f}")
    assert ari > 0.8  # measured 1.0


def test_identify_networks_reports_model_and_fc(synth, trained):
    res = identify_networks(trained, synth["windows"], synth["coords"], k=4,
                            truth=synth["modules"])
    assert res["model"]["features"].shape == (48, trained.config.hidden_size)
    assert res["fc"]["features"].shape == (48, 48)
    for name in ("model", "fc"):
        assert res[name]["labels"].shape == (48,) and np.isfinite(res[name]["ari"])
    print(f"\nARI model {res['model']['ari']:.3f} vs raw FC {res['fc']['ari']:.3f}")
    assert res["fc"]["ari"] > 0.8
    # representations average each parcel's tokens: one window by hand
    w = torch.from_numpy(synth["windows"][:1])
    with torch.no_grad():
        h = trained.encode(w, torch.as_tensor(synth["coords"]))[0, 1:]
    by_hand = h.reshape(48, WINDOW // PATCH, -1).mean(1).numpy()
    np.testing.assert_allclose(parcel_representations(trained, w, synth["coords"]), by_hand,
                               atol=1e-5)
    assert identify_networks(trained, synth["windows"][:4], synth["coords"], 4)["fc"]["ari"] is None


# ----------------------------------------------------------------------------- perturbation


def test_apply_perturbation_modes():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for mode, value, expected in (("scale", 2.0, x[1, 1:3] * 2), ("shift", -1.0, x[1, 1:3] - 1),
                                  ("clamp", 7.5, [7.5, 7.5])):
        y, mask = apply_perturbation(x, [1], mode, value, 1, 3)
        np.testing.assert_array_equal(y[1, 1:3], expected)
        np.testing.assert_array_equal(y[~mask], x[~mask])
        assert mask.sum() == 2 and mask[1, 1:3].all()
    for kwargs in (dict(mode="boost"), dict(parcels=[3]), dict(parcels=[]), dict(t_start=3, t_stop=3),
                   dict(t_stop=5), dict(value=float("nan"))):
        args = dict(parcels=[0], mode="shift", value=1.0, t_start=0, t_stop=2) | kwargs
        with pytest.raises(ConfigError):
            apply_perturbation(x, **args)


@pytest.mark.parametrize("mode,value", [("scale", 1.0), ("shift", 0.0)])
def test_neutral_perturbation_has_exactly_zero_effect(mode, value):
    model = tiny()
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(12, 3, generator=g) * 140 - 70
    x = torch.randn(12, 100, generator=g).numpy()
    out = perturb_recording(model, x, coords, [0, 5], mode, value, 10, 50)
    assert out["effect"].shape == x.shape
    assert np.array_equal(out["effect"], np.zeros_like(x))
    assert out["perturbed_mask"].sum() == 2 * 40


def test_perturbing_part_of_a_module(synth, trained, tmp_path):
    modules, x = synth["modules"], synth["x"][0]  # [48, 400]
    members = np.flatnonzero(modules == 0)
    chosen = members[: len(members) // 2].tolist()  # the rest of module 0 stays unperturbed
    out = perturb_recording(trained, x, synth["coords"], chosen, "shift", 2.0, 50, 70)
    effect = out["effect"]
    # model-independent: only the window [40, 80) saw the edit, and every value is predicted
    # from that window's input alone, so nothing outside it can move
    assert np.abs(effect[:, :40]).max() <= 1e-6 and np.abs(effect[:, 80:]).max() <= 1e-6
    assert np.abs(effect[:, 40:80]).max() > 1e-4  # the edit was seen
    summary = effect_summary(effect, chosen, groups=modules, time_range=(50, 70))
    assert np.isnan(summary["per_parcel"][chosen]).all()
    assert summary["n_same"] == len(members) - len(chosen)
    assert summary["n_same"] + summary["n_other"] + len(chosen) == 48
    assert np.isfinite(summary["ratio"]) and summary["ratio"] > 0
    print(f"\nshift +2 on {len(chosen)}/{len(members)} parcels of module 0: mean |effect| "
          f"same-module {summary['same_group']:.4f}, other {summary['other_group']:.4f}, "
          f"ratio {summary['ratio']:.3f}; perturbed parcels {summary['perturbed']:.4f}")

    names = [f"p{i}" for i in range(48)]
    folder = save_effect(effect, tmp_path / "effect", chosen, names=names, time_range=(50, 70),
                         groups=modules)
    saved = np.load(folder / "effect.npy", allow_pickle=False)
    assert saved.dtype == np.float32 and np.array_equal(saved, effect)
    assert (folder / "effect.png").read_bytes()[:8] == PNG
    doc = json.loads((folder / "summary.json").read_text())
    assert doc["time_range"] == [50, 70] and doc["parcels"] == chosen
    assert doc["perturbed_names"] == [names[i] for i in chosen]
    assert doc["per_parcel"][chosen[0]] is None
    assert doc["ratio"] == pytest.approx(summary["ratio"])
    assert sorted(p.name for p in folder.iterdir()) == ["effect.npy", "effect.png", "summary.json"]


def test_effect_summary_on_a_known_map():
    effect = np.zeros((6, 10))
    effect[1, 2:5] = 3.0  # same group as the perturbed parcel 0
    effect[4, 2:5] = -1.0  # other group
    effect[0] = 100.0  # the perturbed parcel itself: left out of the comparison
    s = effect_summary(effect, [0], groups=[0, 0, 0, 1, 1, 1], time_range=(2, 5))
    assert s["same_group"] == pytest.approx(1.5) and s["other_group"] == pytest.approx(1 / 3)
    assert s["ratio"] == pytest.approx(4.5) and s["perturbed"] == pytest.approx(100.0)
    assert np.isnan(effect_summary(effect, [0, 1, 2], groups=[0, 0, 0, 1, 1, 1])["ratio"])
