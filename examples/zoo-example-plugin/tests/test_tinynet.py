"""How a plugin author tests a plugin: the zoo's conformance kit, then through the zoo as users reach it."""

import pytest
import torch

import zoo
import zoo_example_plugin as plugin
from zoo.errors import WeightsUnavailableError
from zoo.testing import check_backbones, check_exporter, check_pretrained_head
from zoo_example_plugin.make_weights import write_weights


def test_backbones_conform():
    (result,) = check_backbones(provider="example")  # also checks that "example" is this plugin's
    assert result["feature_dim"] == 32 and result["layer_groups"] == 2


def test_exporter_round_trips():
    report = check_exporter("example-npz")
    assert report["artifacts"]["example-npz"]["status"] == "passed"
    assert report["artifacts"]["example-npz"]["validation"]["max_abs_logit_diff"] <= 1e-4


def test_tinynet_through_the_zoo():
    assert "example/tinynet" in zoo.list_models()
    model, info = zoo.create_backbone("example/tinynet")
    assert info.normalization.mean == (0.5, 0.4, 0.3)
    x = torch.randn(2, *info.normalization.input_size)
    assert model(x).shape == (2, info.feature_dim)


def test_v1_weights_and_pretrained_head():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        tmp_path = Path(tmp)
        mp.setenv(plugin.WEIGHTS_ENV, str(tmp_path))
        with pytest.raises(WeightsUnavailableError, match="pip install zoo-example-weights"):
            zoo.create_backbone("example/tinynet.v1")
        write_weights(tmp_path / plugin.WEIGHTS_FILE)
        module, info = zoo.create_backbone("example/tinynet.v1")
        assert torch.equal(module.state_dict()["stem.0.weight"], plugin.read_v1()[0]["backbone.stem.0.weight"])
        got = check_pretrained_head("example/tinynet", "v1")
        assert got is not None and got["labels"] == len(plugin.V1_LABELS)
