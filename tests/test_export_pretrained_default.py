"""`zoo export BACKBONE --head pretrained` without --weights uses the backbone's default pretrained
weights (not random init), and where those are not available offline the error names the file to
place; `--weights none` is still refused with the reason."""

from __future__ import annotations

import urllib.error

import pytest

from zoo.cli import cmd_export
from zoo.cli.main import build_parser, main


def _source(argv):
    return cmd_export._source(build_parser().parse_args(["export", *argv]))


def test_absent_weights_means_the_default_weights():
    # timm/tf_efficientnet_lite0's default weights ship with a package: always offline
    model, out = _source(["timm/tf_efficientnet_lite0", "--head", "pretrained"])
    assert model.meta.weights == "in1k"
    assert len(model.meta.labels) == 1000
    assert out == "timm-tf_efficientnet_lite0-pretrained"


def test_weights_none_is_refused_with_the_reason():
    from zoo.errors import ZooError

    with pytest.raises(ZooError, match="no pretrained classifier with weights=none"):
        _source(["timm/tf_efficientnet_lite0", "--head", "pretrained", "--weights", "none"])


def test_default_weights_absent_offline_names_the_file(tmp_path, monkeypatch, capsys):
    """torchvision/mobilenet_v2's default is IMAGENET1K_V2; with an empty hub cache and no network
    the command fails with exit 2 naming the file, not with "weights=none"."""
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))

    def offline(url, *a, **k):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    rc = main(["export", "torchvision/mobilenet_v2", "--head", "pretrained", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "mobilenet_v2-7ebf99e0.pth" in err and "not available offline" in err, err
    assert "weights=none" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
