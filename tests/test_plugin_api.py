"""The plugin API v2 seen from the core: exporter options, derived formats, verdicts, the
listing index, and the reference in docs/plugins.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from zoo.errors import ZooError
from zoo.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_onnx_int8_alone_exports_and_validates(tmp_path):
    report = zoo.export(tiny_model(), formats="onnx-int8", out=tmp_path / "out")
    art = report["artifacts"]["onnx-int8"]
    assert art["status"] == "passed", art
    assert art["validation"]["top1_agreement"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "export-report.json", "model.int8.onnx", "model.int8.onnx.json"]
    assert report["options"]["exporters"]["onnx-int8"]["int8_ops"] == "all"


def test_exporter_options_reach_only_their_exporter_and_unknown_ones_fail(tmp_path):
    with pytest.raises(ZooError, match=r"export option\(s\) 'opset' are not accepted by the chosen formats "
                                       r"\(torchscript: none\)"):
        zoo.export(tiny_model(), formats="torchscript", out=tmp_path / "a", opset=17)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(ZooError, match="option 'onnx_exporter' must be one of"):
        zoo.export(tiny_model(), formats="onnx", out=tmp_path / "b", onnx_exporter="fast")
    report = zoo.export(tiny_model(), formats="onnx", out=tmp_path / "c", options={"opset": "17"})
    assert report["artifacts"]["onnx"]["export"]["opset"] == 17  # a CLI string, parsed by the exporter's option


def test_a_verdict_is_required(tmp_path, monkeypatch):
    from zoo.plugin import registry
    from zoo.exporting import verdict

    assert verdict("x", zoo.ValidationResult(passed=True)).passed
    for bad in ({"max_abs_logit_diff": 0.0}, None, zoo.ValidationResult(passed=None)):
        v = verdict("x", bad)
        assert v.passed is False and "exporter 'x': validate() returned" in v.problems[0]
    reg = registry.exporters()

    class NoVerdict(type(reg.get("torchscript"))):
        def validate(self, *args):
            return None

    monkeypatch.setitem(reg._exporters, "torchscript", (NoVerdict(), "torchscript"))
    with pytest.raises(zoo.errors.ExportValidationError, match="validate\\(\\) returned NoneType"):
        zoo.export(tiny_model(), formats="torchscript", out=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export-report.json"]


def test_the_default_backbone_comes_from_its_provider():
    from zoo.plugin import registry

    assert registry.default_backbone() == "timm/tf_efficientnet_lite0.in1k"
    assert registry.default_backbone(with_tag=False) == "timm/tf_efficientnet_lite0"


# -- the listing index ------------------------------------------------------------------------------
def _zoo(args, cache, **env):
    code = ("import sys\nfrom zoo.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)\nsys.exit(rc)")
    e = {**os.environ, "ZOO_CACHE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env=e)


def test_zoo_list_warm_does_not_import_torch_and_rebuilds_on_change(tmp_path):
    cold = _zoo(["list", "resnet18*", "--json"], tmp_path)
    assert cold.returncode == 0, cold.stderr[-2000:]
    warm = _zoo(["list", "resnet18*", "--json"], tmp_path)
    assert warm.returncode == 0 and json.loads(warm.stdout) == json.loads(cold.stdout)
    imported = {line.split("|")[-1].strip() for line in warm.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "torchvision", "timm"}, sorted(imported & {"torch", "torchvision", "timm"})
    assert "NOTORCH" in warm.stderr.splitlines()
    info = _zoo(["info", "torchvision/resnet50.IMAGENET1K_V2", "--no-build", "--json"], tmp_path)
    assert info.returncode == 0 and "NOTORCH" in info.stderr.splitlines()
    assert json.loads(info.stdout)["normalization"]["resize_size"] == 232
    # a different set of plugins (here: one disabled) is another index, built afresh
    other = _zoo(["list", "resnet18*", "--json"], tmp_path, ZOO_DISABLE_PLUGINS="timm")
    assert "TORCH" in other.stderr.splitlines()  # cold: the plugins (and torch) were loaded
    assert [r["name"] for r in json.loads(other.stdout)] == ["torchvision/resnet18"]
    assert len(list(tmp_path.glob("index-*.json"))) == 2


def test_index_key_follows_installed_plugins(example_plugin, tmp_path, monkeypatch):
    from zoo import index

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    with_example = index.index_path()
    cat = index.catalog()
    assert "example/tinynet" in cat.list_models()
    assert isinstance(index.catalog(), index.IndexCatalog)  # warm now
    monkeypatch.setenv("ZOO_DISABLE_PLUGINS", "example")
    assert index.index_path() != with_example
    (with_example).write_text("{not json")  # damaged: rebuilt, never trusted
    monkeypatch.delenv("ZOO_DISABLE_PLUGINS")
    assert "example/tinynet" in index.catalog().list_models()
    assert json.loads(with_example.read_text())["index"] == index.INDEX_VERSION


# -- the reference ----------------------------------------------------------------------------------
def test_docs_carry_the_generated_reference():
    """docs/plugins.md must contain `zoo plugins --reference` verbatim: drift fails here."""
    from zoo.plugin.reference import reference_markdown

    doc = (ROOT / "docs" / "plugins.md").read_text()
    generated = reference_markdown()
    assert generated in doc, ("docs/plugins.md is out of date with zoo.plugin.api / zoo.plugin.hookspecs / zoo.records: "
                              "regenerate its reference section with `zoo plugins --reference`")
    # and the text around it only names parts that exist
    api = set(zoo.__all__) | {"hookimpl"}
    named = set(re.findall(r"`zoo\.([A-Z][A-Za-z]+)`", doc))
    assert named <= api, sorted(named - api)
