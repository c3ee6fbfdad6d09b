"""Fine-tuned models as transformers classes: whole-model save_pretrained / from_pretrained,
task heads and losses, starting from a pretrained folder, and a clear refusal otherwise."""

from __future__ import annotations

import json

import pytest
import torch

from brainlm.errors import ConfigError
from brainlm.model.config import BrainLMConfig
from brainlm.model.heads import ForecastHead, Head, pooled
from brainlm.model.modeling import BrainLMForPretraining
from brainlm.model.tasks import (BrainLMForForecasting, BrainLMForSequenceClassification,
                                 from_parts, is_task_folder, load_task_model)

P, T = 6, 40


def _encoder(seed: int = 0) -> BrainLMForPretraining:
    torch.manual_seed(seed)
    coords = (torch.rand(P, 3) * 100).round().tolist()
    cfg = BrainLMConfig.from_preset("tiny", window=T, patch_size=10, parcel_coords=coords)
    return BrainLMForPretraining(cfg).eval()


def _trained_head(width: int, out: int) -> Head:
    head = Head(width, out, 0.0)
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.fill_(0.3)
    return head.eval()


@pytest.mark.parametrize("pooling", ["cls", "mean", "connectivity"])
def test_regression_model_round_trips_whole(tmp_path, pooling):
    enc = _encoder()
    width = P * (P - 1) // 2 if pooling == "connectivity" else enc.config.hidden_size
    head = _trained_head(width, 1)
    x = torch.randn(3, P, T)
    expected = head(pooled(enc, x, None, pooling))
    model = from_parts(enc, head, pooling=pooling, classes=None, target_mean=40.0,
                       target_std=12.0)
    torch.testing.assert_close(model(x).logits, expected)
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["BrainLMForSequenceClassification"]
    assert (config["problem_type"], config["pooling"], config["target_std"]) == (
        "regression", pooling, 12.0)
    assert is_task_folder(tmp_path / "m")
    loaded = load_task_model(tmp_path / "m")
    torch.testing.assert_close(loaded(x).logits, expected)
    y = torch.tensor([0.5, -1.0, 2.0])
    out = loaded(x, labels=y)
    torch.testing.assert_close(out.loss, ((expected.squeeze(-1) - y) ** 2).mean())


def test_classification_model_keeps_its_classes_and_loss(tmp_path):
    enc = _encoder()
    head = _trained_head(enc.config.hidden_size, 2)
    model = from_parts(enc, head, pooling="cls", classes=["F", "M"])
    model.save_pretrained(tmp_path / "c")
    loaded = BrainLMForSequenceClassification.from_pretrained(tmp_path / "c")
    assert loaded.config.problem_type == "single_label_classification"
    assert loaded.config.id2label == {0: "F", 1: "M"}
    x, labels = torch.randn(4, P, T), torch.tensor([0, 1, 1, 0])
    out = loaded(x, labels=labels)
    assert out.logits.shape == (4, 2)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_forecasting_model_round_trips(tmp_path):
    enc = _encoder()
    head = ForecastHead(enc.config.hidden_size, 10)
    model = from_parts(enc, head, horizon=10)
    model.save_pretrained(tmp_path / "f")
    loaded = load_task_model(tmp_path / "f")
    assert isinstance(loaded, BrainLMForForecasting)
    x = torch.randn(2, P, T)
    y = loaded(x)
    assert y.shape == (2, P, 10)
    x2 = x.clone()
    x2[:, :, -10:] = 1e3  # the forecast never sees the horizon it predicts
    torch.testing.assert_close(loaded(x2), y)


def test_a_pretrained_folder_starts_a_task_model_from_its_encoder(tmp_path):
    enc = _encoder(seed=3)
    enc.save_pretrained(tmp_path / "pre")
    config = BrainLMConfig.from_pretrained(tmp_path / "pre", num_labels=3, pooling="mean")
    model = BrainLMForSequenceClassification.from_pretrained(tmp_path / "pre", config=config)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(model.brainlm.state_dict()[k], v)
    assert model(torch.randn(2, P, T)).logits.shape == (2, 3)


def test_a_folder_that_is_no_task_model_is_refused_by_name(tmp_path):
    _encoder().save_pretrained(tmp_path / "pre")
    assert not is_task_folder(tmp_path / "pre")
    with pytest.raises(ConfigError, match="not a BrainLM task model"):
        load_task_model(tmp_path / "pre")
    model = from_parts(_encoder(), _trained_head(64, 1), pooling="cls", classes=None,
                       target_mean=0.0, target_std=1.0)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot load the fine-tuned model"):
        load_task_model(tmp_path / "m")
