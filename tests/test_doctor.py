"""`zoo doctor`: what this machine can do, as JSON and as text, with plausible values."""

from __future__ import annotations

import json
import os
import platform
import sys

import pytest
import torch

from zoo.cli.main import main


@pytest.fixture(scope="module")
def doctor_json(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    (cache / "features" / "k").mkdir(parents=True)
    (cache / "features" / "k" / "a.safetensors").write_bytes(b"x" * 1000)
    (cache / "b.json").write_bytes(b"y" * 234)
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_CACHE_DIR", str(cache))
    try:
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["doctor", "--json"]) == 0
    finally:
        mp.undo()
    return json.loads(buf.getvalue()), cache


def test_versions_devices_and_cpu(doctor_json):
    d, _ = doctor_json
    assert d["python"] == platform.python_version()
    pk = d["packages"]
    assert pk["torch"] and torch.__version__.startswith(pk["torch"].split("+")[0])
    for dist in ("torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "scikit-image"):
        assert pk[dist], f"{dist} is a declared dependency, so it is installed"
    assert d["cpu"]["logical_cores"] == os.cpu_count() and d["cpu"]["torch_threads"] == torch.get_num_threads()
    assert isinstance(d["cpu"]["model"], str) and d["cpu"]["model"]
    dev = d["devices"]
    assert dev["cuda_available"] == torch.cuda.is_available()
    assert len(dev["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert all(isinstance(g["bf16"], bool) and g["memory_gib"] > 0 for g in dev["cuda"])
    assert dev["auto_device"].split(":")[0] in ("cuda", "mps", "cpu")


def test_exporter_self_checks_cache_and_plugins(doctor_json):
    d, cache = doctor_json
    onnx = d["exporters"]["onnx"]  # asked through the plugin API (zoo.Exporter.self_check), in a child process
    assert onnx["ok"] is True and onnx["plugin"] == "onnx", onnx
    probe = onnx["details"]["dynamo"]
    assert probe["works"] is True, probe  # onnxscript is declared: a clean install can export
    assert probe["max_abs_diff"] <= 1e-4
    assert "CPUExecutionProvider" in onnx["details"]["onnxruntime"]["providers"]
    assert onnx["requires"]["onnxruntime"] and d["packages"]["onnxruntime"] == onnx["requires"]["onnxruntime"]
    assert d["exporters"]["torchscript"]["ok"] is None  # implements no self-check
    assert d["validation_images"]["scikit_image"] is True
    assert d["cache"]["dir"] == str(cache) and d["cache"]["from"] == "ZOO_CACHE_DIR"
    assert d["cache"]["size_bytes"] >= 1234 and d["cache"]["files"] >= 2  # + the listing index
    plugins = {p["name"]: p for p in d["plugins"]}
    assert {"torchvision", "timm", "onnx", "torchscript"} <= set(plugins)
    assert all(plugins[n]["status"] == "ok" for n in ("torchvision", "timm", "onnx", "torchscript"))
    assert plugins["torchvision"]["backbones"] > 10 and plugins["timm"]["backbones"] > 10
    assert "onnx" in str(plugins["onnx"]["exporters"]) and "torchscript" in str(plugins["torchscript"]["exporters"])
    assert d["problems"] == []


def test_text_output_names_the_essentials(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "nowhere"))
    assert main(["doctor", "--no-probe"]) == 0
    out = capsys.readouterr().out
    for word in ("python", "torch", "onnxruntime", "CPUExecutionProvider", "cpu", "cuda",
                 "plugin       torchvision", "exporter     onnx (plugin onnx): not checked: not probed"):
        assert word in out, word


def test_a_missing_onnxscript_is_reported_with_the_fix(monkeypatch):
    from zoo_onnx import selfcheck

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as on an install without it
    monkeypatch.setattr(selfcheck, "_version", lambda d: None if d == "onnxscript" else "1.0")
    probe = selfcheck.dynamo_export_probe()
    assert probe["works"] is False and "onnxscript is not installed" in probe["error"]
    check = selfcheck.self_check(probe=False)
    assert check.ok is False and any("pip install onnxscript" in p for p in check.problems)


def test_a_failing_self_check_is_a_problem_not_a_crash(monkeypatch, fresh_plugins):
    from zoo import doctor
    from zoo.plugin import registry

    onnx = registry.exporters().get("onnx")
    monkeypatch.setattr(type(onnx), "self_check", lambda self, probe=True: 1 / 0)
    checks = doctor.exporter_checks(probe=False)
    assert checks["onnx"]["ok"] is False and "ZeroDivisionError" in checks["onnx"]["problems"][0]
    report = {"validation_images": {"scikit_image": True}, "exporters": checks, "plugins": []}
    assert any(p.startswith("exporter 'onnx': self_check() raised ZeroDivisionError") for p in doctor.problems(report))
