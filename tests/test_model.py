"""BrainLM model: shapes, masking, loss, embeddings, save/load, learning, bad configs."""

from __future__ import annotations

import pytest
import torch

from brainlm.errors import ConfigError
from brainlm.model.config import BrainLMConfig
from brainlm.model.modeling import BrainLMForPretraining


def tiny(**kw) -> BrainLMForPretraining:
    torch.manual_seed(0)
    return BrainLMForPretraining(BrainLMConfig.from_preset("tiny", **kw)).eval()


def data(b, p, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, t, generator=g), torch.rand(p, 3, generator=g) * 140 - 70


@pytest.mark.parametrize("p,t,patch", [(7, 40, 10), (50, 60, 20), (424, 200, 20)])
def test_shapes_for_any_parcel_count_and_window(p, t, patch):
    model = tiny(window=t, patch_size=patch)
    x, coords = data(2, p, t)
    out = model(x, coords)
    n = t // patch
    n_mask = round(0.75 * p * n)
    assert out.pred.shape == (2, n_mask, patch)
    assert out.ids_keep.shape == (2, p * n - n_mask)
    assert out.encoder_hidden.shape == (2, 1 + p * n - n_mask, model.config.hidden_size)
    recon, mask = model.reconstruct(x, out)
    assert recon.shape == mask.shape == (2, p, t)
    assert int(mask[0].sum()) == n_mask * patch
    torch.testing.assert_close(recon[~mask], x[~mask])  # visible values untouched


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.75, 0.9])
def test_visible_tokens_per_strategy(ratio):
    model = tiny(window=60, patch_size=10)
    p, n = 12, 6
    x, coords = data(3, p, 60)
    keep, masked = model.masking(3, p, n, ratio, "random", 1, None, "cpu")
    assert keep.shape[1] == p * n - round(ratio * p * n) and masked.shape[1] == round(ratio * p * n)
    both = torch.cat([keep, masked], 1).sort(dim=1).values
    assert torch.equal(both, torch.arange(p * n).expand(3, -1))  # a partition of the tokens

    keep, masked = model.masking(3, p, n, ratio, "parcel", 1, None, "cpu")
    per_parcel = torch.stack([(masked // n == q).sum(1) for q in range(p)], 1)
    assert (per_parcel == round(ratio * n)).all()  # the same count in every parcel

    keep, masked = model.masking(3, p, n, ratio, "future", 2, None, "cpu")
    assert ((masked % n) >= n - 2).all() and ((keep % n) < n - 2).all()
    assert masked.shape[1] == 2 * p


def test_loss_is_mse_on_masked_patches_only():
    model = tiny(window=40, patch_size=10)
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    out = model(x, coords, noise=noise)
    patches = model.patchify(x)
    target = torch.stack([patches[i, out.ids_mask[i]] for i in range(2)])
    torch.testing.assert_close(out.loss, ((out.pred - target) ** 2).mean())
    # changing a masked value changes the loss by exactly its own error term, nothing else
    x2 = x.clone()
    tok = int(out.ids_mask[0, 0])
    x2[0, tok // 4, (tok % 4) * 10] += 1.0
    out2 = model(x2, coords, noise=noise)
    torch.testing.assert_close(out2.pred, out.pred)  # the encoder never saw it
    assert not torch.isclose(out2.loss, out.loss)


def test_last_decoder_block_shortcut_equals_full_decoder():
    model = tiny(window=40, patch_size=10, decoder_cross_attention=False)
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    out = model(x, coords, noise=noise)
    # reference: run the decoder on the whole sequence and take the masked tail afterwards
    latent = model.encode(x, coords, out.ids_keep)
    dpos = model.decoder_pos_embed(torch.as_tensor(coords), 4).expand(2, -1, -1)
    h = model.decoder_embed(latent)
    d = dpos.shape[-1]
    vis = h[:, 1:] + dpos.gather(1, out.ids_keep[..., None].expand(-1, -1, d))
    msk = model.mask_token + dpos.gather(1, out.ids_mask[..., None].expand(-1, -1, d))
    seq = torch.cat([h[:, :1], vis, msk], 1)
    geo = model.geometry(torch.as_tensor(coords), 4, out.ids_keep, out.ids_mask)
    for block in model.decoder.blocks:
        seq = block(seq, geo=geo)
    full = model.decoder_pred(model.decoder.norm(seq))[:, 1 + out.ids_keep.shape[1]:]
    torch.testing.assert_close(full, out.pred, rtol=1e-5, atol=1e-6)


def test_cross_attention_decoder_predicts_each_masked_token_from_the_visible_ones_only():
    """With decoder_cross_attention, a masked patch's prediction does not depend on which other
    tokens are masked beside it: run alone, each gives the same prediction."""
    model = tiny(window=40, patch_size=10)
    assert model.config.decoder_cross_attention
    x, coords = data(1, 9, 40)
    out = model(x, coords, noise=torch.rand(1, 36, generator=torch.Generator().manual_seed(3)))
    latent = model.encode(x, coords, out.ids_keep)
    c = torch.as_tensor(coords)
    for j in (0, 5, out.ids_mask.shape[1] - 1):
        one = out.ids_mask[:, j:j + 1]
        seq = model.decoder_input(latent, c, 4, out.ids_keep, one)
        geo = model.geometry(c, 4, out.ids_keep, one)
        n_keep = out.ids_keep.shape[1]
        alone = model.decoder_pred(model.decoder(seq, last_q_start=1 + n_keep,
                                                 last_kv_stop=1 + n_keep, geo=geo))
        torch.testing.assert_close(alone[:, 0], out.pred[:, j], rtol=1e-5, atol=1e-6)


def test_attention_biases_start_where_they_should_and_are_saved(tmp_path):
    """Time bias: ALiBi distance penalty from the start (a head that looks at its moment);
    both biases round-trip through save_pretrained."""
    model = tiny(window=40, patch_size=10)
    tb = model.decoder.blocks[0].attn.time_bias.bias
    assert tb.shape == (2, 7)
    assert torch.all(tb[:, 3] == 0) and torch.all(tb[:, :3] < 0) and tb[0, 2] == -4.0
    sb = model.decoder.blocks[0].attn.space_bias
    assert sb.query.weight.shape == (2 * 16, 39)  # heads x rank, xyz + 6 frequencies x 6
    with torch.no_grad():
        sb.query.weight.normal_()
    model.save_pretrained(tmp_path)
    again = BrainLMForPretraining.from_pretrained(tmp_path)
    torch.testing.assert_close(again.decoder.blocks[0].attn.space_bias.query.weight,
                               sb.query.weight)
    assert again.config.space_attention_rank == model.config.space_attention_rank


def test_eager_attention_matches_sdpa_and_checkpointing_matches_plain():
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    sdpa = tiny(window=40, patch_size=10)
    eager = tiny(window=40, patch_size=10, attention_backend="eager")
    eager.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(eager(x, coords, noise=noise).pred, sdpa(x, coords, noise=noise).pred,
                               rtol=1e-5, atol=1e-5)
    sdpa.train()
    plain = sdpa(x, coords, noise=noise).loss
    plain.backward()
    grads = [p.grad.clone() for p in sdpa.parameters()]
    sdpa.zero_grad()
    sdpa.gradient_checkpointing_enable()
    ckpt = sdpa(x, coords, noise=noise).loss
    ckpt.backward()
    torch.testing.assert_close(ckpt, plain)
    for g, p in zip(grads, sdpa.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_embeddings_are_deterministic_and_unmasked():
    model = tiny(window=40, patch_size=10)
    x, coords = data(3, 9, 40)
    a, b = model.embed(x, coords), model.embed(x, coords)
    assert a["cls"].shape == a["mean"].shape == (3, 64)
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["mean"], b["mean"])
    out = model(x, coords, mask_ratio=0.0)
    assert out.loss is None and out.ids_mask.shape[1] == 0
    torch.testing.assert_close(out.encoder_hidden[:, 0], a["cls"])
    # embeddings depend on the input (not constant)
    assert not torch.allclose(model.embed(x + 1, coords)["cls"], a["cls"])


def test_save_and_load_roundtrip_with_coordinates(tmp_path):
    model = tiny(window=40, patch_size=10)
    x, coords = data(2, 9, 40)
    model.config.parcel_coords = coords.tolist()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = BrainLMForPretraining.from_pretrained(tmp_path).eval()
    noise = torch.rand(2, 36)
    torch.testing.assert_close(loaded(x, noise=noise).pred, model(x, coords, noise=noise).pred)
    assert loaded.config.window == 40 and loaded.config.patch_size == 10


def test_tiny_model_overfits_one_batch():
    from brainlm.train.pretrain import lr_lambda

    model = tiny(window=40, patch_size=10, mask_ratio=0.5).train()
    x, coords = data(2, 8, 40)
    x = x.cumsum(-1) / 5  # smooth, predictable series
    noise = torch.rand(2, 32, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, 20, 200, 0.0))
    losses = []
    for _ in range(200):
        loss = model(x, coords, noise=noise).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 45, "patch_size": 10}, "not a multiple of patch_size"),
    ({"hidden_size": 65}, "not divisible"),
    ({"mask_ratio": 1.0}, "must be in"),
    ({"mask_strategy": "blocks"}, "must be one of"),
    ({"mask_strategy": "future", "future_patches": 10}, "future_patches"),
    ({"num_hidden_layers": 0}, "positive integer"),
])
def test_bad_config_values_are_clear(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BrainLMConfig.from_preset("tiny", **kwargs)


def test_unknown_profile_and_wrong_coords():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        BrainLMConfig.from_preset("huge")
    model = tiny(window=40, patch_size=10)
    x, coords = data(1, 9, 40)
    with pytest.raises(ConfigError, match="do not match 9 parcels"):
        model(x, coords[:5])
    with pytest.raises(ConfigError, match="coords are needed"):
        model(x)


def test_per_window_coordinates_take_the_same_rows_as_a_shared_atlas():
    """[B, P, 3] coordinates go through a gather, [P, 3] through F.embedding: same result."""
    model = tiny(window=40, patch_size=10)
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    shared = model(x, coords, noise=noise)
    per_window = model(x, coords.expand(2, -1, -1), noise=noise)
    torch.testing.assert_close(per_window.pred, shared.pred)
    torch.testing.assert_close(per_window.loss, shared.loss)
    # and the second window really uses its own coordinates
    moved = coords.expand(2, -1, -1).clone()
    moved[1] += 30.0
    out = model(x, moved, noise=noise)
    torch.testing.assert_close(out.pred[0], shared.pred[0])
    assert not torch.allclose(out.pred[1], shared.pred[1])


def test_saved_coordinates_are_cached_but_follow_the_config():
    model = tiny(window=40, patch_size=10)
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    model.config.parcel_coords = coords.tolist()
    first = model(x, noise=noise).pred
    torch.testing.assert_close(model(x, noise=noise).pred, first)
    torch.testing.assert_close(model(x, coords, noise=noise).pred, first)
    model.config.parcel_coords = (coords + 25.0).tolist()  # a new atlas: no stale cache
    torch.testing.assert_close(model(x, noise=noise).pred, model(x, coords + 25.0, noise=noise).pred)
    assert not torch.allclose(model(x, noise=noise).pred, first)


def test_cached_tables_made_in_inference_mode_still_train():
    model = tiny(window=40, patch_size=10).train()
    x, coords = data(2, 9, 40)
    model.config.parcel_coords = coords.tolist()
    with torch.inference_mode():
        model.embed(x)  # fills the caches
    model(x).loss.backward()
    assert model.pos_embed.coord.weight.grad is not None
    assert model.decoder_pos_embed.coord.weight.grad.abs().sum() > 0


def test_pinned_attention_kernel_gives_the_same_result_and_bad_names_are_clear():
    model = tiny(window=40, patch_size=10)
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    auto = model(x, coords, noise=noise).pred
    model.set_sdpa_kernel("math")
    assert all(m.sdpa_kernel is not None for m in model.modules() if hasattr(m, "sdpa_kernel"))
    torch.testing.assert_close(model(x, coords, noise=noise).pred, auto, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="attention kernel 'fast' must be one of"):
        model.set_sdpa_kernel("fast")


def test_block_norms_keep_bf16_under_autocast(monkeypatch):
    """CUDA autocast would run layer_norm in fp32 and write an fp32 copy of the activations;
    the block norms run outside autocast on the bf16 stream (CPU autocast cannot show the
    dtype difference, so the test checks where the norm runs)."""
    import torch.nn.functional as F

    from brainlm.model import modeling

    seen = []
    real = F.layer_norm

    def spy(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        if not torch.is_autocast_enabled("cpu"):  # CUDA's kernel needs one dtype for all
            assert weight.dtype == bias.dtype == x.dtype
        return real(x, shape, weight, bias, eps)

    monkeypatch.setattr(modeling.F, "layer_norm", spy)
    model = tiny(window=40, patch_size=10)
    x, coords = data(2, 9, 40)
    noise = torch.rand(2, 36)
    reference = model(x, coords, noise=noise).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, coords, noise=noise).loss
    under_autocast = [enabled for dtype, enabled in seen if dtype == torch.bfloat16]
    # two per block (encoder 2 + decoder 1 blocks) outside autocast; the two final norms,
    # whose output is also what embed() returns, keep autocast's fp32 policy
    assert under_autocast.count(False) == 2 * (2 + 1) and under_autocast.count(True) == 2
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.05)
