"""How a plugin author tests a plugin: through the zoo, as users will reach it."""

import torch

import zoo


def test_tinynet_through_the_zoo():
    assert "example/tinynet" in zoo.list_models()
    model, info = zoo.create_backbone("example/tinynet")
    assert info.normalization.mean == (0.5, 0.4, 0.3)
    x = torch.randn(2, *info.normalization.input_size)
    assert model(x).shape == (2, info.feature_dim)
