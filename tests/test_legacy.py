"""Family B (released ViTMAE checkpoints): canvas geometry, safe loading, loss, masks, embeddings.

No network: checkpoints are random ones written by `save_random_released`. Coordinates are
random with deliberate y ties, so nothing depends on the real atlas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from brainlm.errors import ConfigError, OrientationError
from brainlm.model.legacy import (
    UPSTREAM_SCALE,
    CanvasLayout,
    ReleasedBrainLM,
    from_canvas,
    load_released,
    patchify,
    pixel_loss,
    region_mask,
    released_config,
    save_random_released,
    to_canvas,
    unpatchify,
)


def tied_coords(n: int, seed: int = 0, n_y: int = 77) -> np.ndarray:
    """[n, 3] coordinates whose y takes only `n_y` integer values (like A424's 77)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-70, 70, size=(n, 3)).astype(np.float32)
    xyz[:, 1] = rng.integers(0, n_y, size=n) * 2.0 - 80.0
    return xyz


def tiny_config(**kw) -> ViTMAEConfig:
    """32x32 canvas, patch 8 (4x4 grid): fast enough to run many times."""
    base = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
                decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=32, mask_ratio=0.75)
    base.update(kw)
    return ViTMAEConfig(**base)


@pytest.fixture(scope="module")
def folder_111m(tmp_path_factory):
    return save_random_released(tmp_path_factory.mktemp("vitmae_111M"), "111m", seed=0)


@pytest.fixture(scope="module")
def model_111m(folder_111m):
    return load_released(folder_111m)


@pytest.fixture(scope="module")
def wrapped_111m(model_111m):
    return ReleasedBrainLM(model_111m, tied_coords(424), n_time=200)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_random_released(tmp_path_factory.mktemp("tiny"), tiny_config(), seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """16 parcels x 12 timepoints on the tiny canvas: pad rows 8/8, columns 10/10, so patch
    columns 0 and 3 are pure padding and the window spans patch columns 1-2."""
    model = load_released(tiny_folder, n_parcels=16, n_time=12)
    return ReleasedBrainLM(model, tied_coords(16, seed=3, n_y=4), n_time=12)


# --- configs and geometry -------------------------------------------------------------------

def test_released_configs():
    c = released_config("111m")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        768, 12, 12, 3072)
    assert (c.image_size, c.patch_size, c.num_channels) == (432, 16, 3)
    assert (c.decoder_hidden_size, c.decoder_num_hidden_layers,
            c.decoder_num_attention_heads, c.decoder_intermediate_size) == (512, 8, 16, 2048)
    assert c.mask_ratio == 0.75 and c.norm_pix_loss is False
    c = released_config("vitmae_650M")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.image_size, c.patch_size) == (1280, 32, 16, 5120, 434, 14)
    with pytest.raises(ConfigError, match="unknown released"):
        released_config("1b")


def test_parameter_counts(model_111m):
    n = sum(p.numel() for p in model_111m.parameters())
    assert abs(n - 112.6e6) < 0.2e6
    with torch.device("meta"):
        big = ViTMAEForPreTraining(released_config("650m"))
    assert abs(sum(p.numel() for p in big.parameters()) - 658.3e6) < 0.2e6


@pytest.mark.parametrize("size, canvas, patch, top, left", [
    ("111m", 432, 16, 4, 116),
    ("650m", 434, 14, 5, 117),
])
def test_released_canvas_geometry(size, canvas, patch, top, left):
    lay = CanvasLayout.from_config(released_config(size), tied_coords(424), n_time=200)
    assert (lay.canvas_size, lay.patch_size, lay.grid) == (canvas, patch, canvas // patch)
    assert (lay.top, lay.bottom, lay.left, lay.right) == (top, top, left, left)
    inside = region_mask(lay)
    assert inside.sum() == 424 * 200
    assert inside[top, left] and inside[top + 423, left + 199]
    assert not inside[top - 1, left] and not inside[top, left - 1]
    assert not inside[top + 424, left] and not inside[top, left + 200]
    assert 1 - inside.float().mean() == pytest.approx(0.55, abs=0.01)


def test_odd_padding_puts_extra_at_end():
    lay = CanvasLayout.from_config(tiny_config(), tied_coords(15), n_time=21)
    assert (lay.top, lay.bottom) == (8, 9)
    assert (lay.left, lay.right) == (5, 6)


def test_window_must_fit_canvas():
    with pytest.raises(ConfigError, match="does not fit"):
        CanvasLayout.from_config(tiny_config(), tied_coords(33), n_time=10)
    with pytest.raises(ConfigError, match="does not fit"):
        CanvasLayout.from_config(released_config("111m"), tied_coords(424), n_time=433)
    with pytest.raises(ConfigError, match=r"\[parcels, 3\]"):
        CanvasLayout.from_config(tiny_config(), np.zeros((3, 10)), n_time=10)
    with pytest.raises(ConfigError, match="multiple"):
        CanvasLayout.from_config(tiny_config(image_size=30), tied_coords(8), n_time=10)


def test_rows_sorted_by_y_stably():
    coords = tied_coords(424, seed=5)
    lay = CanvasLayout.from_config(released_config("111m"), coords, n_time=200)
    assert np.array_equal(lay.order, np.argsort(coords[:, 1], kind="stable"))
    y = coords[lay.order, 1]
    assert np.all(np.diff(y) >= 0)
    ties = np.diff(y) == 0
    assert ties.sum() > 300  # the test really exercises ties
    assert np.all(np.diff(lay.order)[ties] > 0)  # tied parcels keep their atlas order


# --- canvas values ----------------------------------------------------------------------------

def test_canvas_scale_padding_and_rows():
    coords = tied_coords(16, seed=3, n_y=4)
    lay = CanvasLayout.from_config(tiny_config(), coords, n_time=12)
    signals = torch.randn(2, 16, 12)
    canvas = to_canvas(signals, lay)
    assert canvas.shape == (2, 3, 32, 32)
    inside = region_mask(lay)
    assert torch.all(canvas[:, :, ~inside] == -1.0)
    window = canvas[:, :, 8:24, 10:22]
    for r, parcel in enumerate(lay.order):
        assert torch.equal(window[:, :, r, :], (signals[:, parcel, :] / 5.6430855)
                           .unsqueeze(1).expand(-1, 3, -1))
    assert UPSTREAM_SCALE == 5.6430855


def test_canvas_round_trip_exact():
    lay = CanvasLayout.from_config(released_config("650m"), tied_coords(424, seed=2), n_time=200)
    signals = torch.randn(2, 424, 200, dtype=torch.float64)
    canvas = to_canvas(signals, lay)
    torch.testing.assert_close(from_canvas(canvas, lay), signals, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_canvas(canvas[:, 0], lay), signals, rtol=1e-12, atol=1e-12)
    with pytest.raises(OrientationError, match="transposed"):
        to_canvas(signals.transpose(1, 2), lay)


def test_patchify_matches_transformers(tiny):
    canvas = torch.randn(2, 3, 32, 32)
    ours = patchify(canvas, tiny.layout)
    assert torch.equal(ours, tiny.model.patchify(canvas))
    assert torch.equal(unpatchify(ours, tiny.layout), tiny.model.unpatchify(ours))
    assert torch.equal(unpatchify(ours, tiny.layout), canvas)


# --- loading ----------------------------------------------------------------------------------

def test_save_and_load_round_trip(folder_111m, model_111m):
    assert (folder_111m / "model.safetensors").is_file()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = ViTMAEForPreTraining(released_config("111m"))  # what seed 0 writes
    loaded = model_111m.state_dict()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, loaded[name]), name
    assert model_111m.config.mask_ratio == 0.75 and not model_111m.training


def test_seed_controls_random_weights(tmp_path):
    a = load_released(save_random_released(tmp_path / "a", tiny_config(), seed=7), 16, 12)
    b = load_released(save_random_released(tmp_path / "b", tiny_config(), seed=7), 16, 12)
    c = load_released(save_random_released(tmp_path / "c", tiny_config(), seed=8), 16, 12)
    wa, wb, wc = (m.decoder.decoder_pred.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_sharded_safetensors(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_released(tmp_path, 16, 12)
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


@pytest.mark.parametrize("keys", ["module", "file", "v4"])
def test_load_pytorch_model_bin(tmp_path, tiny, tiny_folder, keys):
    """In-memory (transformers 5), saved-file and transformers-4 key names all load from a .bin
    (upstream's .bin files use the transformers-4 names)."""
    if keys == "module":
        state = tiny.model.state_dict()
    else:
        from safetensors.torch import load_file
        state = load_file(tiny_folder / "model.safetensors")
        assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in state)
        if keys == "v4":  # transformers 4 named the decoder blocks decoder.decoder_layers.N
            state = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
                     for k, v in state.items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    loaded = load_released(tmp_path, 16, 12)
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


class _Payload:
    """Would leave a marker file behind if anything unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_with_pickled_object_is_refused(tmp_path, tiny, tiny_folder):
    marker = tmp_path / "pwned"
    state = dict(tiny.model.state_dict())
    state["extra"] = _Payload(marker)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="pytorch_model.bin: refused") as err:
        load_released(tmp_path, 16, 12)
    assert str(tmp_path) in str(err.value)
    assert not marker.exists()


def test_bin_with_wrong_shapes_is_refused(tmp_path, tiny, tiny_folder):
    state = dict(tiny.model.state_dict())
    state["decoder.decoder_pred.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="do not load"):
        load_released(tmp_path, 16, 12)
    state.pop("decoder.decoder_pred.weight")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="lacks"):
        load_released(tmp_path, 16, 12)


def test_bad_folders(tmp_path, tiny_folder):
    with pytest.raises(ConfigError, match="not a folder"):
        load_released(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        load_released(tmp_path)
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="no model.safetensors or pytorch_model.bin") as err:
        load_released(tmp_path, 16, 12)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match="large enough"):  # tiny canvas, released window
        load_released(tiny_folder)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="expected 'vit_mae'"):
        load_released(tmp_path)


# --- loss, masks, embeddings ------------------------------------------------------------------

def test_pixel_loss_matches_hand_computation(tiny):
    lay = tiny.layout
    torch.manual_seed(0)
    canvas = to_canvas(torch.randn(2, 16, 12), lay)
    noise = torch.rand(2, lay.num_patches)
    with torch.no_grad():
        out = tiny.model(pixel_values=canvas, noise=noise)
    target = tiny.model.patchify(canvas)  # [B, L, p*p*C] in transformers' own layout
    p, total, count = lay.patch_size, 0.0, 0
    for b in range(2):
        for i in range(lay.num_patches):
            if out.mask[b, i] != 1:
                continue
            row0, col0 = (i // lay.grid) * p, (i % lay.grid) * p
            for k in range(p * p * 3):
                pixel = k // 3
                y, x = row0 + pixel // p, col0 + pixel % p
                if 8 <= y < 24 and 10 <= x < 22:
                    total += float(out.logits[b, i, k] - target[b, i, k]) ** 2
                    count += 1
    assert count > 0
    assert float(pixel_loss(out, canvas, lay)) == pytest.approx(total / count, rel=1e-5)
    assert float(out.loss) != pytest.approx(total / count, rel=1e-3)  # HF also scores padding


def test_forward_random_mask(tiny):
    lay = tiny.layout
    signals = torch.randn(3, 16, 12)
    noise = torch.rand(3, lay.num_patches)
    with torch.no_grad():
        res = tiny(signals, noise=noise)
        out = tiny.model(pixel_values=to_canvas(signals, lay), noise=noise)
    assert res["reconstruction"].shape == res["mask"].shape == (3, 16, 12)
    assert res["mask"].dtype == torch.bool
    torch.testing.assert_close(res["loss"], pixel_loss(out, to_canvas(signals, lay), lay))
    torch.testing.assert_close(res["reconstruction"], from_canvas(unpatchify(out.logits, lay), lay))
    # the mask is the patch mask, cropped and returned to atlas parcel order
    pix = out.mask.reshape(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
    expected = pix[:, 8:24, 10:22][:, lay.inverse_order(), :] > 0
    assert torch.equal(res["mask"], expected)
    with torch.no_grad():
        half = tiny(signals, mask_ratio=0.5)
    assert tiny.model.config.mask_ratio == 0.75
    assert half["mask"].shape == (3, 16, 12)
    with pytest.raises(ConfigError, match="mask_ratio"):
        tiny(signals, mask_ratio=1.0)


def test_forecast_mask_tiny(tiny):
    with torch.no_grad():
        res = tiny(torch.randn(2, 16, 12), future_patches=1)
    # patch column 2 covers canvas columns 16-23, i.e. timepoints 6-11 of the window
    expected = torch.zeros(2, 16, 12, dtype=torch.bool)
    expected[:, :, 6:] = True
    assert torch.equal(res["mask"], expected)
    assert tiny.model.config.mask_ratio == 0.75
    with pytest.raises(ConfigError, match="choose 1 to 1"):
        tiny(torch.randn(1, 16, 12), future_patches=2)
    with pytest.raises(ConfigError, match="fixes the mask"):
        tiny(torch.randn(1, 16, 12), future_patches=1, mask_ratio=0.5)


def test_forecast_mask_111m(wrapped_111m):
    lay = wrapped_111m.layout
    assert list(lay.data_patch_columns()) == list(range(7, 20))
    # 2 columns: patch columns 18-19 of all 27 rows, i.e. timepoints 172-199 (geometry only)
    _, ratio, future = wrapped_111m.forecast_noise(1, 2)
    cols = torch.arange(729) % 27
    assert torch.equal(future, (cols >= 18) & (cols <= 19))
    assert int(729 * (1 - ratio)) == 729 - 54
    # run the model with 11 columns (fewer kept tokens, faster): columns 9-19 = timepoints 28-199
    with torch.no_grad():
        res = wrapped_111m(torch.randn(1, 424, 200), future_patches=11)
    assert torch.equal(res["mask"][0], torch.arange(200).expand(424, -1) >= 28)
    assert torch.isfinite(res["loss"]) and res["reconstruction"].shape == (1, 424, 200)
    assert wrapped_111m.model.config.mask_ratio == 0.75


def test_embed_deterministic_111m(wrapped_111m):
    signals = torch.randn(1, 424, 200)
    with torch.no_grad():
        a = wrapped_111m.embed(signals)
        b = wrapped_111m.embed(signals)
    assert a["cls"].shape == a["mean"].shape == (1, 768)
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["mean"], b["mean"])
    assert wrapped_111m.model.config.mask_ratio == 0.75


def test_embed_batch_and_unmasked_tiny(tiny):
    signals = torch.randn(3, 16, 12)
    with torch.no_grad():
        emb = tiny.embed(signals)
        one = tiny.embed(signals[1:2])
    assert emb["cls"].shape == emb["mean"].shape == (3, 32)
    torch.testing.assert_close(one["cls"][0], emb["cls"][1], rtol=1e-5, atol=1e-6)
    assert tiny.model.config.mask_ratio == 0.75  # restored after the unmasked call
    # embed sees all 16 patches in grid order; mean over the 4 window-touching patches (rows 1-2 x columns 1-2 of the 4x4 grid)
    tiny.model.config.mask_ratio = 0.0
    try:
        with torch.no_grad():
            seq = tiny.model.vit(pixel_values=to_canvas(signals, tiny.layout),
                                 noise=torch.arange(16.).expand(3, -1)).last_hidden_state
    finally:
        tiny.model.config.mask_ratio = 0.75
    idx = torch.tensor([5, 6, 9, 10]) + 1
    torch.testing.assert_close(emb["mean"], seq[:, idx].mean(1))
    torch.testing.assert_close(emb["cls"], seq[:, 0])
