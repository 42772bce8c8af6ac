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


def test_info_text_shows_each_weights_license(capsys):
    assert main(["info", "timm/resnet18", "--no-build"]) == 0
    out = capsys.readouterr().out
    assert "LICENSE" in out and "cc-by-nc-4.0" in out and "apache-2.0" in out


def test_warm_plugins_listing_imports_no_plugin_and_check_verifies(tmp_path):
    """`zoo plugins` answers from the listing index; `--check` imports and verifies every plugin."""
    import os

    env = dict(os.environ, ZOO_CACHE_DIR=str(tmp_path))
    code = ("import sys, json\nfrom zoo.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, "
            "'plugins': sorted(m for m in sys.modules if m.split('.')[0] in ('zoo_timm', 'zoo_torchvision', "
            "'zoo_onnx', 'zoo_pt2', 'zoo_torchscript'))}))")

    def zoo(*args):
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        *shown, last = proc.stdout.strip().splitlines()
        return "\n".join(shown), json.loads(last)

    cold_out, cold = zoo("plugins")
    assert cold["plugins"] and cold["rc"] == 0  # cold: every plugin imported, the index written
    warm_out, warm = zoo("plugins")
    assert warm == {"rc": 0, "torch": False, "plugins": []} and warm_out == cold_out
    assert "timm (built-in)" in warm_out and "onnx, onnx-int8" in warm_out
    _, as_json = zoo("plugins", "--json")
    assert not as_json["plugins"]
    check_out, check = zoo("plugins", "--check")
    assert check["rc"] == 0 and check["plugins"] and "torchvision (built-in)" in check_out
