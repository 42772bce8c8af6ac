"""Round trips: train a tiny head -> save the run -> zoo.export (validated) -> zoo predict from the
ONNX file alone, for a torchvision ResNet, a torchvision VGG, a timm model and the example
third-party backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from test_export_support import LABELS, eager_probabilities, tiny_model, write_images
from zoo.model import load_model, save_model


def _check_report(report, formats):
    assert report["status"] == "passed"
    assert list(report["artifacts"]) == formats
    for name in formats:
        art = report["artifacts"][name]
        v = art["validation"]
        assert art["status"] == "passed", v["problems"]
        assert v["batch_sizes"] == [1, 3, 8]
        assert v["max_abs_logit_diff"] <= 1e-4
        assert v["top1_agreement"] == 1.0
        assert v["min_embedding_cosine"] >= 0.9999
        assert set(v["per_batch_size"]) == {"1", "3", "8"}


def _round_trip(tmp_path, model, formats):
    from zoo.predict import Predictor

    run = save_model(model, tmp_path / "run")
    reloaded = load_model(run)  # what `zoo export RUN` sees
    report = zoo.export(run, formats=formats)
    expected = ["onnx", "pt2", "torchscript"] if formats == "all" else [formats]
    _check_report(report, expected)
    out = run / "export"
    assert json.loads((out / "export-report.json").read_text())["status"] == "passed"
    assert not list(out.glob(".*staging*"))  # no staging leftovers

    images = write_images(tmp_path / "images")
    predictor = Predictor(out / "model.onnx")
    results = predictor.predict_files([tmp_path / "images"], top_k=3)
    probs = eager_probabilities(reloaded, images)
    assert [r["path"] for r in results] == [str(p) for p in images]
    for res, p in zip(results, probs):
        assert [t["index"] for t in res["top"]] == list(np.argsort(-p, kind="stable")[:3])
        assert [t["label"] for t in res["top"]] == [LABELS[i] for i in np.argsort(-p, kind="stable")[:3]]
        np.testing.assert_allclose([t["probability"] for t in res["top"]], np.sort(p)[::-1][:3], atol=1e-5)
    return report, predictor


@pytest.mark.parametrize("name,formats", [
    ("torchvision/resnet18", "all"),
    ("torchvision/vgg11", "onnx"),  # 129M parameters even at 64 px (fc6/fc7): ONNX only, to stay quick
    ("timm/mobilenetv3_small_050", "all"),
])
def test_round_trip(tmp_path, name, formats):
    model = tiny_model(name, size=64)
    report, predictor = _round_trip(tmp_path, model, formats)
    assert predictor.metadata["backbone"] == name
    assert predictor.metadata["input_size"] == [3, 64, 64]
    assert report["artifacts"]["onnx"]["export"]["dynamic_batch"] is True
    assert report["artifacts"]["onnx"]["export"]["opset"] == 18


def test_round_trip_example_third_party_backbone(tmp_path, example_plugin):
    """The example plugin's tinynet (found through entry points), with its own stats, end to end."""
    model = tiny_model("example/tinynet", weights="seed0", keep_normalization=True)
    report, predictor = _round_trip(tmp_path, model, "all")
    meta = predictor.metadata
    assert meta["backbone"] == "example/tinynet" and meta["weights"] == "seed0"
    assert meta["mean"] == [0.5, 0.4, 0.3] and meta["std"] == [0.25, 0.25, 0.25]
    assert meta["input_size"] == [3, 64, 64] and meta["resize_size"] == 72
    # the run did not need the backbone's weights: it is rebuilt from the plugin ("seed0")
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_example_plugin_exporter_found_through_discovery(tmp_path, example_plugin, monkeypatch):
    """A third-party format registered by the example package is listed, usable and validated;
    a format with no validate() gets its artifact reported as unvalidated, not as passed."""
    from zoo.plugin import registry

    reg = registry.exporters()
    names = reg.names()
    assert {"onnx", "onnx-int8", "torchscript", "example-npz"} <= set(names)
    assert reg.owner("example-npz") == "example"
    model = tiny_model("example/tinynet", weights="seed0", keep_normalization=True)
    report = zoo.export(model, formats=["example-npz"], out=tmp_path / "out")
    assert report["artifacts"]["example-npz"]["status"] == "passed"
    # the exporter wrote to a staging path and reported it: the report names the final place only
    assert report["artifacts"]["example-npz"]["export"]["path"] == str(tmp_path / "out" / "model.npz")
    assert ".staging" not in (tmp_path / "out" / "export-report.json").read_text()
    with np.load(tmp_path / "out" / "model.npz") as npz:
        assert "backbone.stem.0.weight" in npz.files

    class Unchecked(type(reg.get("example-npz"))):
        validate = zoo.Exporter.validate  # the default: no validation

    monkeypatch.setitem(reg._exporters, "example-npz", (Unchecked(), "example"))
    report = zoo.export(model, formats=["example-npz"], out=tmp_path / "out2")
    art = report["artifacts"]["example-npz"]
    assert art["status"] == "unvalidated" and "no validate()" in art["reason"]
    sidecar = json.loads((tmp_path / "out2" / "model.npz.json").read_text())
    assert sidecar["status"] == "unvalidated" and sidecar["artifact"] == "model.npz"
