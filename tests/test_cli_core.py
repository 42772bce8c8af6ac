"""`zoo list`, `zoo info`, `zoo plugins`, `zoo --help`: output, JSON, errors, and import weight."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zoo.cli.main import main


def test_help_does_not_import_torch():
    code = ("import sys\nfrom zoo.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'zoo --help imported torch'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_list_shows_both_resnet18s_without_building_models(capsys, monkeypatch):
    import torch.nn as nn

    built = []
    original = nn.Module.__init__

    def counting_init(self, *a, **k):
        if type(self).__name__ != "ImageClassification":  # torchvision's eval-transform object, not a model
            built.append(type(self).__name__)
        original(self, *a, **k)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    assert main(["list", "resnet18*"]) == 0
    out = capsys.readouterr().out
    assert built == [], f"zoo list instantiated {built[:5]}"
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("timm/", "torchvision/"))}
    assert "torchvision/resnet18" in lines and "timm/resnet18" in lines
    assert "512" in lines["timm/resnet18"] and "(0.485,0.456,0.406)" in lines["torchvision/resnet18"]


def test_list_json_and_filters(capsys):
    assert main(["list", "--provider", "torchvision", "vgg*", "--exclude", "*_bn", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [f"torchvision/vgg{n}" for n in (11, 13, 16, 19)]
    assert all(r["feature_dim"] == 4096 for r in rows)


def test_info_vgg16_json(capsys):
    assert main(["info", "torchvision/vgg16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["feature_dim"] == 4096 and d["default_weights"] == "IMAGENET1K_V1"
    assert d["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert d["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert d["num_params"] == sum(g["num_params"] for g in d["layer_groups"])
    assert [g["name"] for g in d["layer_groups"]][-2:] == ["classifier.0", "classifier.3"]


def test_info_lite0_shows_timm_half_stats(capsys):
    assert main(["info", "timm/tf_efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    assert "mean            (0.5,0.5,0.5)" in out and "std             (0.5,0.5,0.5)" in out
    assert "bicubic" in out and "feature dim     1280" in out


def test_unknown_name_suggests_and_exits_nonzero(capsys):
    assert main(["info", "torchvision/resnet81"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'torchvision/resnet81'" in err and "torchvision/resnet18" in err


def test_plugins_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "torchvision" in out and "timm" in out and "register_backbones" in out
