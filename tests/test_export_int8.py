"""int8 worth shipping: static QDQ int8 (the default) calibrated on the user's images, outputs
independent of batch composition, its value (accuracy, agreement, size, speed) reported, and
validation on the run's own validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import zoo
from zoo.cli.main import main

from trainhelpers import make_image_folder, train_kwargs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained run on a folder of images, with a recorded validation split."""
    root = tmp_path_factory.mktemp("int8")
    data = make_image_folder(root / "data", per_class=12, size=40)
    run = zoo.train(backbone="timm/mobilenetv3_small_050", data=str(data), weights=None, out=str(root / "run"),
                    **train_kwargs(root, image_size=64, epochs=2))
    return root, run.dir


@pytest.fixture(scope="module")
def exported(run_dir):
    root, run = run_dir
    report = zoo.export(run, formats="onnx", quantize="int8", out=root / "export")
    return root / "export", report


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _alone_and_in_a_batch(path, meta):
    """The logits of one image run alone, and run first in a batch of 8 with very different images."""
    _, h, w, c = meta["input_shape"]
    rng = np.random.default_rng(0)
    image = rng.integers(60, 120, (1, h, w, c), dtype=np.uint8)
    others = rng.integers(0, 256, (7, h, w, c), dtype=np.uint8)
    others[::2] = 255  # bright companions: a per-batch activation scale would move with them
    sess = _session(path)
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: image})[0][0], sess.run(None, {name: np.concatenate([image, others])})[0][0]


def _relative(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def test_static_int8_is_the_default_and_batch_independent(exported):
    out, report = exported
    meta = json.loads((out / "model.int8.onnx.json").read_text())
    assert meta["int8_mode"] == "static" and "QDQ" in meta["quantization"] and meta["int8_recipe"] == "nncf"
    # every runtime the file lists passed the int8 gate there (OpenVINO at compile_model defaults),
    # and every one it could have listed but does not failed it
    gates = report["artifacts"]["onnx-int8"]["validation"]["runtime_gates"]
    assert "onnxruntime" in meta["runtimes"] and set(meta["runtimes"]) <= set(gates)
    assert all(gates[r]["passed"] for r in meta["runtimes"])
    assert not any(g.get("passed") for r, g in gates.items() if r not in meta["runtimes"])
    from zoo_onnx import read_metadata

    assert read_metadata(out / "model.int8.onnx")["runtimes"] == meta["runtimes"]  # the file says the same
    alone, in_batch = _alone_and_in_a_batch(out / "model.int8.onnx", meta)
    assert _relative(alone, in_batch) < 1e-4


def test_dynamic_int8_is_opt_in_and_batch_dependent(run_dir, tmp_path):
    """The control: dynamic int8 (on request) computes activation scales per batch, so the same
    image's output moves with its companions; the test above could fail."""
    _, run = run_dir
    zoo.export(run, formats="onnx-int8", out=tmp_path, int8_mode="dynamic")
    meta = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert meta["int8_mode"] == "dynamic" and meta["runtimes"] == ["onnxruntime"]
    alone, in_batch = _alone_and_in_a_batch(tmp_path / "model.int8.onnx", meta)
    assert _relative(alone, in_batch) > 1e-3


def test_report_gives_accuracy_on_the_run_validation_split_size_and_speed(exported, run_dir):
    out, report = exported
    on_disk = json.loads((out / "export-report.json").read_text())
    images = on_disk["images"]
    assert "validation split" in images["source"] and images["labelled"] == images["count"] > 0
    recorded = json.loads((run_dir[1] / "validation.json").read_text())["items"]
    assert images["count"] == min(len(recorded), 64)
    assert "training images" in on_disk["calibration"]["source"]
    int8 = on_disk["artifacts"]["onnx-int8"]
    acc = int8["validation"]["accuracy"]
    assert 0 <= acc["artifact"] <= 1 and acc["images"] == images["count"]
    assert abs(acc["delta"]) <= 0.01 + 1e-9  # the gate: at most one point lost
    value = int8["export"]["value"]
    assert value["size_ratio"] == pytest.approx(value["int8_bytes"] / value["fp32_bytes"], abs=1e-3)
    assert value["size_ratio"] < 1 and value["smaller"] is True
    assert value["fp32_ms"] > 0 and value["int8_ms"] > 0
    assert value["faster"] == (value["speedup"] > 1)
    assert bool(value["notes"]) == (not value["smaller"] or not value["faster"])


def test_int8_is_judged_on_the_whole_validation_split(run_dir, tmp_path, monkeypatch):
    """fp32 formats check a sample of the run's split; int8 is judged on all of it (up to 1,000)."""
    from zoo.exporting import images as imgs

    _, run = run_dir
    monkeypatch.setattr(imgs, "RUN_VALIDATION_IMAGES", 4)
    report = zoo.export(run, formats="onnx", quantize="int8", out=tmp_path, int8_recipe="ort-minmax")
    recorded = json.loads((Path(run) / "validation.json").read_text())["items"]
    assert report["images"]["count"] == 4 < len(recorded)
    int8 = report["artifacts"]["onnx-int8"]
    assert int8["images"]["count"] == len(recorded) and int8["validation"]["accuracy"]["images"] == len(recorded)
    gate = int8["validation"]["gate"]
    assert gate["labelled"] == len(recorded) and gate["interval"] == "95% paired bootstrap"
    lo, hi = gate["drop_interval95"]
    assert lo <= gate["drop"] <= hi and gate["passed"] == (gate["drop"] <= 0.01 + 1e-12)
    assert "int8_recipe" in json.loads((tmp_path / "model.int8.onnx.json").read_text())


def test_int8_gate_gives_the_drop_with_a_paired_interval():
    from zoo.validation import Tolerance
    from zoo_onnx.int8 import int8_gate

    y = [0, 1] * 100
    ref = np.array(y)
    same = int8_gate(ref, ref.copy(), y, Tolerance())
    assert same["passed"] and same["drop"] == 0 and same["drop_interval95"] == [0.0, 0.0]
    worse = ref.copy()
    worse[:6] = 1 - worse[:6]  # 6 of 200 lost: 3 points
    g = int8_gate(ref, worse, y, Tolerance())
    assert not g["passed"] and g["drop"] == pytest.approx(0.03) and g["top1_agreement"] == pytest.approx(0.97)
    lo, hi = g["drop_interval95"]
    assert 0 < lo < 0.03 < hi < 0.06  # paired: only the 6 discordant images carry the spread
    unlabelled = int8_gate(ref, worse, None, Tolerance(int8_agreement=0.98))
    assert not unlabelled["passed"] and "drop" not in unlabelled and "agreement" in unlabelled["rule"]


def test_accuracy_drop_beyond_one_point_fails_closed():
    from zoo.validation import Tolerance, compare

    ref = {"logits": np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]], np.float32)}
    ref["probabilities"] = ref["logits"]
    worse = {"logits": np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]], np.float32)}
    worse["probabilities"] = worse["logits"]
    report = compare(ref, {1: worse}, Tolerance(), kind="int8", targets=[0, 1, 0, 1])
    assert not report["passed"] and "below fp32" in " ".join(report["problems"])
    unlabelled = compare(ref, {1: worse}, Tolerance(int8_agreement=0.9), kind="int8")
    assert not unlabelled["passed"] and "agreement" in " ".join(unlabelled["problems"])


def test_cli_int8_prints_its_value(run_dir, tmp_path, capsys):
    _, run = run_dir
    code = main(["export", str(run), "-f", "onnx-int8", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "the fp32 file's size" in printed and "labelled images" in printed


def test_calibration_uses_the_training_sample_the_run_recorded(exported, run_dir):
    """Calibration runs on training images the run recorded (never its validation files), and
    validation reports how far the artifact's own outputs move between batch sizes."""
    _, run = run_dir
    out, report = exported
    recorded = json.loads((Path(run) / "validation.json").read_text())
    train_files = {p for p, _ in recorded["calibration"]["items"]}
    val_files = {p for p, _ in recorded["items"]}
    assert train_files and not train_files & val_files
    assert "the run's training images" in report["calibration"]["source"]
    assert report["calibration"]["count"] == len(train_files)
    v = report["artifacts"]["onnx-int8"]["validation"]
    assert v["max_batch_size_diff"] <= 1e-5 and isinstance(v["mean_abs_logit_diff"], float)
    assert v["mean_abs_logit_diff"] <= v["max_abs_logit_diff"]


def test_calibration_reader_reduces_batch_by_batch():
    """The reader speaks onnxruntime's strided protocol: each range yields only its own batches."""
    from zoo_onnx.int8 import _Calibration

    reader = _Calibration("image", [np.full((2, 1), i) for i in range(3)])
    assert len(reader) == 3
    reader.set_range(1, 2)
    assert reader.get_next()["image"][0, 0] == 1 and reader.get_next() is None
