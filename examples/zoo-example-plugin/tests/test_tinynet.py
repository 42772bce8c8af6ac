"""How a plugin author tests a plugin: the zoo's conformance kit, then through the zoo as users reach it."""

import torch

import zoo
from zoo.testing import check_backbones, check_exporter


def test_backbones_conform():
    (result,) = check_backbones(provider="example")
    assert result["feature_dim"] == 32 and result["layer_groups"] == 2


def test_exporter_round_trips():
    report = check_exporter("example-npz")
    assert report["artifacts"]["example-npz"]["status"] == "passed"


def test_tinynet_through_the_zoo():
    assert "example/tinynet" in zoo.list_models()
    model, info = zoo.create_backbone("example/tinynet")
    assert info.normalization.mean == (0.5, 0.4, 0.3)
    x = torch.randn(2, *info.normalization.input_size)
    assert model(x).shape == (2, info.feature_dim)
