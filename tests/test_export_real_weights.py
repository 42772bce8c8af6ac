"""The real-weights path: torchvision's MobileNetV2 IMAGENET1K_V1 (seeded from ../shared/weights),
its ImageNet classifier as the zoo head, exported with baked preprocessing, gives the same ImageNet
top-5 from the ONNX file alone as eager torchvision (with torchvision's own transforms) on real
photos from scikit-image."""

from __future__ import annotations

import json

import pytest

import zoo

PHOTOS = ("chelsea", "coffee", "astronaut")
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture
def photos(tmp_path):
    skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos this test uses")
    from PIL import Image

    paths = []
    for name in PHOTOS:
        p = tmp_path / "photos" / f"{name}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(getattr(skdata, name)()).save(p)
        paths.append(p)
    return paths


def test_mobilenet_v2_imagenet_top5_matches_eager(torch_hub_seeded, photos, tmp_path):
    import torch
    import torchvision
    from PIL import Image

    from conftest import MOBILENET_FILE
    from zoo.model import build_model
    from zoo.predict import Predictor

    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    categories = weights.meta["categories"]
    model = build_model("torchvision/mobilenet_v2", categories, weights="IMAGENET1K_V1")
    state = torch.load(torch_hub_seeded / "hub" / "checkpoints" / MOBILENET_FILE, map_location="cpu", weights_only=True)
    model.head.load_state_dict({"0.weight": state["classifier.1.weight"], "0.bias": state["classifier.1.bias"]})
    model.eval()
    assert model.meta.weights == "IMAGENET1K_V1"

    report = zoo.export(model, formats="onnx", out=tmp_path / "out", preprocess="normalize", quantize="int8",
                        int8_ops="matmul")
    v = report["artifacts"]["onnx"]["validation"]
    assert v["passed"] and v["max_abs_logit_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    assert report["images"]["source"].startswith("scikit-image")
    q = report["artifacts"]["onnx-int8"]["validation"]
    assert q["passed"] and q["kind"] == "int8" and q["top1_agreement"] >= 0.9

    # the convolutions too: static QDQ calibrated on the photos against ONNX Runtime's dynamic int8
    # (0.75 top-1 agreement measured here before static int8 existed) on the same photos
    from zoo_onnx.int8 import export_onnx_int8, validate_onnx_int8
    from zoo.validation import load_validation_images

    pixels = load_validation_images(None, model.meta.normalization).pixels
    fp32 = {"onnx": str(tmp_path / "out" / "model.onnx")}
    reports = {}
    for mode in ("static", "dynamic"):
        path = tmp_path / f"{mode}.int8.onnx"
        export_onnx_int8(model, path, artifacts=fp32, int8_ops="all", int8_mode=mode, calibration=pixels)
        reports[mode] = validate_onnx_int8(model, path, pixels, int8_ops="all", int8_mode=mode)
    q_all = reports["static"]
    assert {"top1_agreement", "min_embedding_cosine", "max_abs_logit_diff", "agreement_delta"} <= set(q_all)
    assert q_all["top1_agreement"] >= reports["dynamic"]["top1_agreement"]
    assert q_all["mean_embedding_cosine"] > reports["dynamic"]["mean_embedding_cosine"]
    if not q_all["passed"]:
        assert any("int8_ops='matmul'" in p for p in q_all["problems"])

    # eager: torchvision's own full model and its own transforms (not the zoo's preprocessing)
    reference = torchvision.models.mobilenet_v2(weights=weights).eval()
    tf = weights.transforms()
    with torch.inference_mode():
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in photos])
        eager_top5 = torch.topk(reference(x), 5).indices.tolist()

    predictor = Predictor(tmp_path / "out" / "model.onnx")
    meta = predictor.metadata
    assert meta["input_shape"] == ["batch", 224, 224, 3] and meta["resize_size"] == 256
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    results = predictor.predict_files(photos, top_k=5)
    onnx_top5 = [[t["index"] for t in r["top"]] for r in results]
    assert onnx_top5 == eager_top5, json.dumps(results, indent=1)
    assert results[0]["top"][0]["label"] == categories[eager_top5[0][0]]
    assert CAT_CLASSES & set(onnx_top5[0]) and CUP_CLASSES & set(onnx_top5[1])  # sanity: a cat, a cup
    assert 0 < sum(t["probability"] for t in results[0]["top"]) <= 1 + 1e-6
