"""`zoo export --preprocess full`: the graph takes the decoded image at any size and does the
reference resize, center crop and normalization itself. Checked against the reference
preprocessing (Pillow, zoo.preprocess) on real photos of different sizes and odd synthetic
sizes; the metadata of the other modes states the exact resize; the predictor honours `full`;
targets that cannot run it, and a wrong in-graph resize, fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from zoo.errors import ExportValidationError, ZooError

LABELS = tuple("abcdefgh")  # 8 classes: a top-5 set that can differ
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # 300x451, 400x600, 512x512, 427x640


def _photo(name):
    skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos")
    return np.ascontiguousarray(getattr(skdata, name)()[..., :3], dtype=np.uint8)


def _odd(h, w, seed=0):
    """A smooth synthetic RGB image of h x w (portrait, landscape or square)."""
    from zoo.validation import synthetic_image

    from PIL import Image

    return np.asarray(synthetic_image(seed, size=max(h, w)).resize((w, h), Image.Resampling.BICUBIC))


def _eager(model, raw_images):
    from PIL import Image

    from zoo.preprocess import resize_crop, to_uint8_hwc
    from zoo.validation import eager_outputs

    pixels = np.stack([to_uint8_hwc(resize_crop(Image.fromarray(r), model.meta.normalization)) for r in raw_images])
    return eager_outputs(model, pixels)


def _top5(logits):
    return [set(np.argsort(-row)[:5]) for row in logits]


def _tiny():
    """zoo.testing's conv backbone (fast to export) with an 8-class head, 32 px input, resize 37."""
    from zoo.testing import tiny_model

    return tiny_model(labels=LABELS, input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos")
    root = tmp_path_factory.mktemp("full")
    model = _tiny()
    full = zoo.export(model, formats=["onnx", "torchscript"], out=root / "full", preprocess="full")
    normalize = zoo.export(model, formats="onnx", out=root / "normalize", preprocess="normalize")
    return model, root, full, normalize


def test_full_matches_the_reference_top5_on_photos_of_different_sizes(exported):
    from zoo_onnx import targets as tg

    model, root, full, _ = exported
    for name in ("onnx", "torchscript"):
        v = full["artifacts"][name]["validation"]
        assert full["artifacts"][name]["status"] == "passed" and v["passed"], v["problems"]
        assert v["kind"] == "full" and v["max_abs_prob_diff"] <= 0.01 and v["top5_agreement_photos"] == 1.0
        assert v["min_embedding_cosine"] >= 0.999 and max(v["batch_sizes"]) > 1  # a batch of one size ran too
    assert full["images"]["count"] >= 13 and "own sizes" in full["images"]["source"]

    # and independently of the report: the ONNX file in ONNX Runtime, one photo at a time
    photos = [_photo(n) for n in PHOTOS]
    assert len({p.shape for p in photos}) == len(photos)
    run, _ = tg.runner("onnxruntime", root / "full" / "model.onnx")
    out = [run(p[None]) for p in photos]
    ref = _eager(model, photos)
    logits = np.concatenate([o["logits"] for o in out])
    assert _top5(logits) == _top5(ref["logits"])
    assert np.abs(np.concatenate([o["probabilities"] for o in out]) - ref["probabilities"]).max() <= 0.01


def test_full_takes_odd_non_square_sizes_alone_and_as_a_batch(exported):
    import torch

    from zoo_onnx import targets as tg
    from zoo_torchscript import load

    model, root, _, _ = exported
    portrait, landscape = _odd(517, 301, seed=3), _odd(301, 517, seed=4)
    same = np.stack([_odd(333, 250, seed=s) for s in (5, 6, 7)])  # N = 3 images of one size
    ref = _eager(model, [portrait, landscape, *same])
    run, _ = tg.runner("onnxruntime", root / "full" / "model.onnx")
    module, meta = load(root / "full" / "model.torchscript.pt")
    with torch.inference_mode():
        ts = lambda x: module(torch.from_numpy(np.ascontiguousarray(x)))[1].numpy()  # noqa: E731
        for fn in (lambda x: run(x)["probabilities"], ts):
            alone = np.concatenate([fn(x[None]) for x in (portrait, landscape, *same)])
            batch = fn(same)
            assert alone.shape == (5, len(LABELS)) and batch.shape == (3, len(LABELS))
            assert np.abs(alone - ref["probabilities"]).max() <= 0.01
            assert (alone.argmax(1) == ref["probabilities"].argmax(1)).all()
            np.testing.assert_allclose(batch, alone[2:], atol=1e-5)
    assert meta["preprocess"] == "full" and meta["input_shape"] == ["batch", "height", "width", 3]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_in_graph_resize_and_crop_match_pillow_pixels(interpolation):
    """The preprocessing alone, ONNX (in ONNX Runtime) and TorchScript, against zoo.preprocess:
    within 1 uint8 level on under 1% of the pixels; the crop offsets exactly (halves to even)."""
    import onnxruntime as ort
    import torch
    from PIL import Image

    from zoo.preprocess import resize_crop
    from zoo.preprocess_module import scripted
    from zoo.records import Normalization
    from zoo_onnx.preprocess_graph import preprocess_graph

    norm = Normalization(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_size=(3, 224, 224), resize_size=256,
                         interpolation=interpolation, crop_mode="center")
    sess = ort.InferenceSession(preprocess_graph(norm, 18).SerializeToString(), providers=["CPUExecutionProvider"])
    module = scripted(norm)
    mean, std = np.array(norm.mean)[:, None, None], np.array(norm.std)[:, None, None]
    images = [_photo("chelsea"), _photo("astronaut"), _odd(517, 301), _odd(301, 517), _odd(150, 200),
              _odd(291, 256), _odd(289, 256), _odd(256, 291)]  # the last: only a crop, margins 33.5 / 32.5
    for img in images:
        ref = np.asarray(resize_crop(Image.fromarray(img), norm), np.float64).transpose(2, 0, 1)
        with torch.inference_mode():
            outs = {"onnx": sess.run(None, {"image": img[None]})[0][0],
                    "torchscript": module(torch.from_numpy(img[None].copy()))[0].numpy()}
        for name, out in outs.items():
            levels = (out * std + mean) * 255.0
            diff = np.abs(levels - ref)
            assert out.shape == (3, 224, 224), (name, img.shape)
            assert diff.max() < 1.01 and (diff > 0.5).mean() < 0.01, (name, img.shape, diff.max(), (diff > 0.5).mean())
            if img.shape[1] == 256:  # no resampling: the crop must be exact
                assert diff.max() < 1e-3, (name, img.shape)


def test_metadata_states_the_exact_resize(exported):
    from zoo_onnx import read_metadata

    model, root, _, _ = exported
    norm = model.meta.normalization
    meta = read_metadata(root / "normalize" / "model.onnx")
    r = meta["resize"]
    assert r["library"] == "Pillow" and r["filter"] == norm.interpolation and r["antialias"] is True
    assert r["call"].endswith(f"Resampling.{norm.interpolation.upper()})") and r["in_graph"] is False
    assert r["shorter_side"] == norm.resize_size and r["crop_size"] == list(norm.input_size[1:])
    assert "int(" in r["size_rounding"] and "truncated" in r["size_rounding"]
    assert "halves to even" in r["crop_rounding"] and "INTER_LINEAR" in r["not_equivalent"]
    if norm.interpolation == "bicubic":
        assert r["cubic_coefficient"] == -0.5
    sidecar = json.loads((root / "normalize" / "model.onnx.json").read_text())
    assert sidecar["resize"] == r
    full = read_metadata(root / "full" / "model.onnx")
    assert full["resize"]["in_graph"] is True and full["preprocess"] == "full"
    assert full["input_shape"] == ["batch", "height", "width", 3] and full["input_dtype"] == "uint8"
    assert full["runtimes"] == ["onnxruntime"]


def test_predict_on_a_full_artifact_gives_the_normalize_artifacts_top1(exported, tmp_path):
    from PIL import Image

    from zoo.predict import Predictor

    _, root, _, _ = exported
    paths = []
    for name in PHOTOS[:3]:
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(_photo(name)).save(paths[-1])
    full, normalize = Predictor(root / "full" / "model.onnx"), Predictor(root / "normalize" / "model.onnx")
    assert full.preprocess_mode == "full"
    a, b = full.predict_files(paths, top_k=3), normalize.predict_files(paths, top_k=3)
    assert [r["top"][0]["index"] for r in a] == [r["top"][0]["index"] for r in b]
    assert max(abs(x["top"][0]["probability"] - y["top"][0]["probability"]) for x, y in zip(a, b)) <= 0.01


def test_a_wrong_in_graph_resize_fails_closed(tmp_path, monkeypatch):
    """Resize without antialiasing (what OpenVINO runs, and OpenCV's INTER_LINEAR does) is caught:
    exit-3 error, nothing left in place."""
    import zoo_onnx.preprocess_graph as pg

    pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos")
    real = pg.preprocess_graph

    def no_antialias(*args, **kwargs):
        proto = real(*args, **kwargs)
        for node in proto.graph.node:
            if node.op_type == "Resize":  # plain bilinear/bicubic taps, like cv2.resize INTER_LINEAR
                kept = [a for a in node.attribute if a.name not in ("antialias", "exclude_outside")]
                del node.attribute[:]
                node.attribute.extend(kept)
        return proto

    monkeypatch.setattr(pg, "preprocess_graph", no_antialias)
    model = _tiny()
    with pytest.raises(ExportValidationError) as info:
        zoo.export(model, formats="onnx", out=tmp_path, preprocess="full")
    v = info.value.report["artifacts"]["onnx"]["validation"]
    assert not v["passed"] and v.get("kind") == "full" and v["problems"], v
    assert not (tmp_path / "model.onnx").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_export_support import tiny_model
    from zoo.model import save_model

    model = tiny_model("timm/mobilenetv3_small_050", labels=LABELS, size=32, steps=0)  # a plugin's, to reload
    return save_model(model, tmp_path_factory.mktemp("full-cli") / "run")


@pytest.mark.parametrize("args, says", [
    (["--target", "opencv"], "cannot target opencv"),
    (["--target", "openvino"], "cannot target openvino"),
    (["--opset", "17"], "opset >= 18"),
    (["--dynamic-size"], "--dynamic-size does not apply"),
    (["--quantize", "int8"], "does not write --preprocess full"),
])
def test_full_where_it_cannot_run_is_a_clear_error(run_dir, tmp_path, capsys, args, says):
    from zoo.cli.main import main

    run = run_dir
    rc = main(["export", str(run), "--format", "onnx", "--preprocess", "full", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and says in err, err
    assert not list((tmp_path / "out").glob("model*.onnx")) if (tmp_path / "out").exists() else True


def test_preprocessing_a_graph_cannot_express_is_refused():
    import dataclasses

    model = _tiny()
    meta = model.meta
    for change, says in ((dict(crop_mode="border"), "crop mode is 'border'"), (dict(crop_mode="squash"), "'squash'"),
                         (dict(interpolation="lanczos"), "lanczos"),
                         (dict(resize_size=16), "smaller than the crop")):
        model.meta = dataclasses.replace(meta, normalization=dataclasses.replace(meta.normalization, **change))
        with pytest.raises(ZooError, match=says):
            zoo.export(model, formats="torchscript", out="/nonexistent/never-written", preprocess="full")
