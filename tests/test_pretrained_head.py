"""`--head pretrained`: a backbone exported with the classifier and labels its weights came with,
through the provider's `pretrained_head`, validated like a trained run, in every deployment target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
from zoo.cli.main import main
from zoo.errors import ZooError

TARGETS = ("onnxruntime", "openvino", "opencv")


def _torchvision_top5(photos):
    """torchvision's own answer: its model with the weights' own transforms, on PIL images."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    model = mobilenet_v2(weights=weights).eval()
    batch = torch.stack([weights.transforms()(img) for _, img in photos])
    with torch.no_grad():
        logits = model(batch)
    return logits.topk(5, dim=1).indices.numpy(), list(weights.meta["categories"])


@pytest.fixture(scope="module")
def photos():
    from zoo.validation import sample_photos

    got = sample_photos()
    if len(got) < 3:
        pytest.skip("scikit-image's sample photos are not installed")
    return got


def test_pretrained_model_is_the_library_model(torch_hub_seeded):
    """The zoo's backbone + pretrained head computes exactly what torchvision's whole model does."""
    from torchvision.models import mobilenet_v2

    model = zoo.pretrained_classifier("torchvision/mobilenet_v2", weights="IMAGENET1K_V1")
    ref = mobilenet_v2(weights="IMAGENET1K_V1").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    assert model.meta.labels[:2] == ("tench", "goldfish") and len(model.meta.labels) == 1000
    assert model.meta.head.to_dict() == {"kind": "linear", "hidden": [], "dropout": 0.0}


@pytest.mark.parametrize("target", TARGETS)
def test_cli_pretrained_gives_torchvisions_top5_in_each_target(target, torch_hub_seeded, tmp_path, photos):
    from zoo.preprocess import resize_crop, to_uint8_hwc
    from zoo_onnx.targets import import_runtime, runner

    try:
        import_runtime(target)
    except ZooError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "export"
    code = main(["export", "torchvision/mobilenet_v2", "--head", "pretrained", "--weights", "IMAGENET1K_V1",
                 "-f", "onnx", "--target", target, "--out", str(out)])
    assert code == 0
    meta = json.loads((out / "model.onnx.json").read_text())
    assert meta["head"]["kind"] == "linear" and meta["head"]["out_features"] == 1000
    assert "pretrained" in meta["head"]["source"]

    # the artifact, run in the target's own runtime, on the metadata's preprocessing
    expected, categories = _torchvision_top5(photos)
    assert meta["labels"] == categories
    norm = zoo.get_normalization("torchvision/mobilenet_v2.IMAGENET1K_V1")
    batch = np.stack([to_uint8_hwc(resize_crop(img, norm)) for _, img in photos])
    run, _ = runner(target, out / "model.onnx")
    if target == "openvino":
        from zoo_onnx.openvino_ir import ir_runner

        if ir_runner(out / "model.onnx")[1] != "f32":  # a bf16 CPU: its defaults passed the reduced-precision
            run, _ = ir_runner(out / "model.onnx", {"INFERENCE_PRECISION_HINT": "f32"})  # rule; f32 is exact
    got = np.argsort(-run(batch)["logits"], axis=1)[:, :5]
    for (name, _), g, e in zip(photos, got, expected):
        assert g[0] == e[0], f"{name}: top-1 {categories[g[0]]} != torchvision's {categories[e[0]]}"
        assert set(g) == set(e), f"{name}: top-5 differs from torchvision's"


def test_backbone_name_without_pretrained_head_is_refused(capsys, tmp_path):
    code = main(["export", "torchvision/resnet18", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--head pretrained" in err and "zoo train" in err
    assert not (tmp_path / "x").exists()


def test_pretrained_head_of_a_run_directory_is_refused(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    code = main(["export", str(tmp_path / "run"), "--head", "pretrained", "--out", str(tmp_path / "x")])
    assert code == 2 and "run directory" in capsys.readouterr().err


def test_unknown_source_names_both_readings(capsys, tmp_path):
    code = main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "neither a run directory" in err and "backbone" in err


def test_random_init_has_no_pretrained_classifier():
    with pytest.raises(ZooError, match="no pretrained classifier"):
        zoo.pretrained_classifier("timm/mobilenetv3_small_050", weights=None)


@pytest.fixture(scope="module")
def lite0_weights():
    from zoo_timm import lite0_package

    if not lite0_package.available():
        pytest.skip(f"{lite0_package.PACKAGE} (EfficientNet-Lite0 ImageNet weights) is not installed")
    return lite0_package


def test_timm_pretrained_model_is_the_library_model(lite0_weights):
    """timm's own classifier on the zoo's pooled features: the whole timm model's logits."""
    import timm

    model = zoo.pretrained_classifier("timm/tf_efficientnet_lite0", weights="in1k")
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ref.load_state_dict(lite0_weights.load_state_dict(), strict=True)
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    assert len(model.meta.labels) == 1000 and model.meta.labels[:2] == ("tench", "goldfish")
    assert "timm" in model.meta.extra["head_source"]


def test_conformance_kit_checks_pretrained_heads(lite0_weights, monkeypatch):
    from zoo import PretrainedHead
    from zoo.testing import ConformanceError, check_pretrained_head
    from zoo_timm import TimmBackbones

    got = check_pretrained_head("timm/tf_efficientnet_lite0", "in1k")
    assert got["labels"] == 1000 and got["head"]["kind"] == "linear"
    # a provider whose classifier and labels disagree is caught, naming the backbone
    three = PretrainedHead(labels=("a", "b", "c"), module=torch.nn.Linear(1280, 4))
    monkeypatch.setattr(TimmBackbones, "pretrained_head", lambda self, spec, weights: three)
    with pytest.raises(ConformanceError, match="tf_efficientnet_lite0.*4.*3 labels"):
        check_pretrained_head("timm/tf_efficientnet_lite0", "in1k")
    # and so is one that offers a classifier for random-init weights
    from zoo.testing import check_backbone

    with pytest.raises(ConformanceError, match="random-init"):
        check_backbone("timm/mobilenetv3_small_050")
