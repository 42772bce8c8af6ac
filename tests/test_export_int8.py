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



def _residual_block_qdq():
    """An inverted-residual block as NNCF writes it: a signed block input (int8 Q/DQ), a 1x1
    expansion with ReLU6 into an unsigned (uint8) Q/DQ, a 1x1 projection into a signed one, and the
    residual Add reading the block input's DQ as well."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def qdq(name, src, scale, zdtype):
        inits.extend([nh.from_array(np.float32(scale), name + "s"), nh.from_array(np.zeros((), zdtype), name + "z")])
        nodes.extend([helper.make_node("QuantizeLinear", [src, name + "s", name + "z"], [name + "q"]),
                      helper.make_node("DequantizeLinear", [name + "q", name + "s", name + "z"], [name + "d"])])
        return name + "d"

    def conv(name, src, relu6=False):
        inits.extend([nh.from_array(rng.integers(-127, 128, (3, 3, 1, 1)).astype(np.int8), name + "w"),
                      nh.from_array(rng.uniform(0.01, 0.02, 3).astype(np.float32), name + "ws"),
                      nh.from_array(np.zeros(3, np.int8), name + "wz")])
        nodes.extend([helper.make_node("DequantizeLinear", [name + "w", name + "ws", name + "wz"], [name + "wd"], axis=0),
                      helper.make_node("Conv", [src, name + "wd"], [name + "y"])])
        if not relu6:
            return name + "y"
        inits.extend([nh.from_array(np.float32(0), name + "lo"), nh.from_array(np.float32(6), name + "hi")])
        nodes.append(helper.make_node("Clip", [name + "y", name + "lo", name + "hi"], [name + "r"]))
        return name + "r"

    block_in = qdq("a", "x", 0.03, np.int8)
    expanded = qdq("e", conv("c1", block_in, relu6=True), 6 / 255, np.uint8)
    projected = qdq("p", conv("c2", expanded), 0.03, np.int8)
    nodes.append(helper.make_node("Add", [block_in, projected], ["sum"]))
    nodes.append(helper.make_node("Identity", [qdq("o", "sum", 0.04, np.int8)], ["out"]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 4, 4])], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_uint8_reencoding_keeps_the_numbers_and_lets_onnxruntime_fuse(tmp_path):
    """nncf-ort's re-encoding: every int8 Q/DQ becomes uint8 (zero point + 128). The graph computes
    the same numbers (ORT with no optimization, bit for bit), and ORT then runs the whole block in
    integer kernels (QLinearConv, QLinearAdd); on NNCF's mixed int8/uint8 original it leaves a
    convolution and the Add in float between DequantizeLinear and QuantizeLinear."""
    import collections
    import copy

    import onnx
    import onnxruntime as ort
    from zoo_onnx.int8 import reencode_uint8

    before = _residual_block_qdq()
    after = copy.deepcopy(before)
    assert reencode_uint8(after) == 8  # the int8 Q/DQ pairs a, p, o and the two weights' DQ
    onnx.checker.check_model(after, full_check=True)
    assert onnx.TensorProto.INT8 not in {i.data_type for i in after.graph.initializer}

    x = np.random.default_rng(1).normal(0, 1.5, (2, 3, 4, 4)).astype(np.float32)

    def run(proto, optimize):
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        out = tmp_path / f"opt-{len(list(tmp_path.iterdir()))}.onnx"
        so.optimized_model_filepath = str(out)
        y = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return y, collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)

    (a, _), (b, _) = run(before, False), run(after, False)
    assert np.array_equal(a, b)
    _, ops_before = run(before, True)
    fused, ops_after = run(after, True)
    assert ops_before["Conv"] == 1 and ops_before["Add"] == 1  # the original: float kernels left
    assert ops_after["QLinearConv"] == 2 and ops_after["QLinearAdd"] == 1 and not ops_after["Conv"] + ops_after["Add"]
    assert np.abs(fused - a).max() <= 2 * 0.04 + 1e-6  # integer rounding: within two steps of the output


def test_a_graph_onnxruntime_cannot_run_is_named_with_the_reason():
    """nncf-ort refuses a re-encoded graph ONNX Runtime cannot run (at any optimization level a
    consumer may pick) instead of writing it: here a per-channel activation zero point, which
    QLinearConv refuses at run time."""
    from onnx import helper
    from onnx import numpy_helper as nh
    from zoo_onnx.int8 import _onnxruntime_failure, reencode_uint8

    x = np.random.default_rng(1).normal(0, 1.5, (1, 3, 4, 4)).astype(np.float32)
    good = _residual_block_qdq()
    reencode_uint8(good)
    assert _onnxruntime_failure(good, "x", np.concatenate([x, x])) is None
    bad = _residual_block_qdq()
    for init in bad.graph.initializer:  # the expansion's activation Q/DQ: per channel
        if init.name in ("es", "ez"):
            value = nh.to_array(init)
            init.CopyFrom(nh.from_array(np.full((3,), value, value.dtype), init.name))
    for node in bad.graph.node:
        if node.input[1:2] == ["es"]:
            node.attribute.append(helper.make_attribute("axis", 1))
    reencode_uint8(bad)
    reason = _onnxruntime_failure(bad, "x", np.concatenate([x, x]))
    assert reason and reason.startswith("ORT_ENABLE_") and "zero point" in reason



def test_nncf_ort_recipe_runs_in_integer_kernels(tmp_path):
    """-O int8_recipe=nncf-ort on a real export (MobileNetV2-style blocks): no int8 tensor is left
    and every quantized convolution becomes a QLinearConv, where the default recipe's file keeps
    float ones."""
    import collections

    import onnx
    import onnxruntime as ort
    from zoo.model import build_model
    from zoo_onnx.int8 import KEEP_FIRST_CONVS, _quantize_static

    def fp32(backbone):
        import torch

        import dataclasses

        torch.manual_seed(0)
        model = build_model(backbone, ["a", "b", "c"], weights=None)
        norm = dataclasses.replace(model.meta.normalization, input_size=(3, 64, 64), resize_size=73)
        model.meta = dataclasses.replace(model.meta, normalization=norm)
        model.eval()
        zoo.export(model, formats="onnx", out=tmp_path / backbone.replace("/", "-"))
        return model, str(tmp_path / backbone.replace("/", "-") / "model.onnx")

    calibration = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)

    def quantized_ops(model, source, recipe):
        path = tmp_path / f"{recipe}.onnx"
        how = _quantize_static(model, source, path, calibration, "normalize", "all", str(tmp_path), recipe)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{recipe}.opt.onnx")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: calibration[:2]})
        proto = onnx.load(str(path))
        return how, proto, collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)

    model, source = fp32("timm/mobilenetv2_050")
    how, proto, ops = quantized_ops(model, source, "nncf-ort")
    convs = sum(n.op_type == "Conv" for n in proto.graph.node)
    assert "uint8 weights" in how
    assert onnx.TensorProto.INT8 not in {i.data_type for i in proto.graph.initializer}
    assert ops["QLinearConv"] == convs - KEEP_FIRST_CONVS  # all but the float stem and first block
    _, _, default_ops = quantized_ops(model, source, "nncf")
    assert default_ops["QLinearConv"] < ops["QLinearConv"]
