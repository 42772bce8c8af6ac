"""int8 ONNX: static QDQ quantization calibrated on the user's images (onnxruntime dynamic
quantization on request), the int8 file's value (size, speed) and its validation.

Built on the fp32 export of this package: `export_onnx_int8` quantizes the validated fp32 file
(or a fresh one), `validate_onnx_int8` judges it in its target runtime.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

# The fp32 side (export_onnx, read_metadata, session, ...) is imported inside the functions: the
# package imports this module to declare OnnxInt8's options.

INT8_OPS = {"all": ["Conv", "MatMul", "Gemm"], "matmul": ["MatMul", "Gemm"]}
INT8_MODES = ("static", "dynamic")
# Static QDQ int8 is standard ONNX (QuantizeLinear/DequantizeLinear around float ops): it loaded
# and ran in ONNX Runtime 1.32, OpenVINO 2026.4 and OpenCV 5.0, each with its own int8 arithmetic,
# so each file is validated in its own target. Dynamic int8 uses ConvInteger/MatMulInteger and
# DynamicQuantizeLinear, which only ONNX Runtime runs.
INT8_RUNTIMES = {"static": ["onnxruntime", "openvino", "opencv"], "dynamic": ["onnxruntime"]}


class _Calibration:
    """onnxruntime's CalibrationDataReader over the user's images, a few at a time. It has a
    length and a range (onnxruntime's "CalibStridedMinMax" protocol, used with stride 1), so the
    calibrator reduces each batch to ranges before the next runs: memory stays at one batch of
    activations however many images calibrate (collecting all 128 at once holds every
    activation of every image: gigabytes for a 224 px model). onnxruntime's own bound,
    CalibMaxIntermediateOutputs, discards the batches it drops in 1.32 instead of reducing them."""

    def __init__(self, input_name: str, batches):
        self.input_name, self.batches = input_name, list(batches)
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self):
        batch = next(self.pending, None)
        return None if batch is None else {self.input_name: batch}


def _calibration_batches(model, calibration, preprocess: str, batch: int = 8):
    import numpy as np

    from zoo.errors import ZooError
    from zoo.validation import model_inputs

    if calibration is None or len(calibration) == 0:
        raise ZooError("static int8 needs calibration images (the run's training images, or --images DIR); "
                       "none were given: pass --images DIR or use -O int8_mode=dynamic")
    x = model_inputs(np.asarray(calibration), model.meta.normalization, preprocess)
    return [x[i:i + batch] for i in range(0, len(x), batch)]


def _quantize_static(model, source: str, path: Path, calibration, preprocess: str, int8_ops: str, tmp: str) -> str:
    """QDQ int8 with per-channel weights and activation ranges calibrated (MinMax) on the user's
    images, so every scale is a constant of the file: an image's output never depends on what
    else is in its batch (dynamic int8 computes activation scales per batch). MinMax rather than
    percentile/entropy: with the frozen backbone's real activations and a small sample it keeps
    the rare large activations that ReLU6-style networks clip to anyway."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    prepared = os.path.join(tmp, "prepared.onnx")
    try:  # shape inference + ORT's basic fusions first, as onnxruntime recommends for static quantization
        quant_pre_process(str(source), prepared, skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - the plain fp32 graph quantizes too, just less fused
        prepared = str(source)
    graph = onnx.load(prepared, load_external_data=False).graph
    input_name = graph.input[0].name
    # The first convolution stays fp32: it sees the normalized pixels (3 channels, few weights,
    # little speed to gain) and quantizing its input costs the most accuracy of any layer
    # (MobileNetV2 on 8 photos: top-1 agreement 0.75 -> 1.0, file 0.28x fp32 either way).
    first_conv = next((n.name for n in graph.node if n.op_type == "Conv"), None)
    excluded = [first_conv] if first_conv else []
    if int8_ops == "all":
        # The whole backbone in int8 (every op type: Add, pooling and Clip too, so activations stay
        # int8 between convolutions instead of round-tripping through float), the head in float: it
        # is a few weights, and its logits are what the user reads (lite0 on Fashion-MNIST, 200
        # validation images: 74.5% -> 78.5% against fp32's 79.5%, agreement 0.855 -> 0.975).
        excluded += _head_nodes(graph)
    reader = _Calibration(input_name, _calibration_batches(model, calibration, preprocess))
    quantize_static(prepared, str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=None if int8_ops == "all" else INT8_OPS[int8_ops],
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibStridedMinMax": 1})
    what = ("every backbone op; first convolution and head fp32" if int8_ops == "all"
            else f"{'/'.join(INT8_OPS[int8_ops])}; first convolution fp32")
    return (f"QDQ static int8 (per-channel QInt8 weights, QUInt8 activations, MinMax calibration on {len(calibration)} "
            f"images; {what})")


def _head_nodes(graph) -> list[str]:
    """The nodes from the head on: those reading the head's weights ("head.*" initializers) or the
    pooled "embedding", and everything downstream of them (softmax included)."""
    weights = {i.name for i in graph.initializer if i.name.startswith("head.")}
    produced: set[str] = set()
    names = []
    for node in graph.node:  # ONNX keeps nodes in topological order
        if any(x in weights or x == "embedding" or x in produced for x in node.input):
            names.append(node.name)
            produced.update(node.output)
    return names


def _value(fp32: str, int8: Path, model, calibration, preprocess: str) -> dict[str, Any]:
    """What the int8 file buys: its size and ONNX Runtime CPU speed against the fp32 file (same
    threads, same batch, best of a few runs). A measurement for the report, not a verdict."""
    import time

    import numpy as np

    from zoo.validation import model_inputs

    from . import session

    if calibration is not None and len(calibration):
        x = model_inputs(np.asarray(calibration[:8]), model.meta.normalization, preprocess)
    else:
        from zoo.exporting import example_input

        x = example_input(model, preprocess, batch=8).numpy()

    def best_ms(p):
        sess = session(p)
        name = sess.get_inputs()[0].name
        sess.run(None, {name: x})  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    fp32_ms, int8_ms = best_ms(fp32), best_ms(int8)
    size_ratio = int8.stat().st_size / os.path.getsize(fp32)
    speed = fp32_ms / int8_ms if int8_ms > 0 else None
    notes = []
    if size_ratio >= 1:
        notes.append(f"the int8 file is not smaller than fp32 ({size_ratio:.2f}x its size)")
    if speed is not None and speed <= 1:
        notes.append(f"the int8 file is not faster than fp32 in ONNX Runtime on this CPU ({speed:.2f}x)")
    return {"fp32_bytes": os.path.getsize(fp32), "int8_bytes": int8.stat().st_size, "size_ratio": round(size_ratio, 4),
            "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3), "speedup": None if speed is None else round(speed, 3),
            "batch": int(len(x)), "smaller": size_ratio < 1, "faster": bool(speed and speed > 1), "notes": notes}


def export_onnx_int8(model, path, *, artifacts: dict[str, str] | None = None, int8_ops: str = "all",
                     int8_mode: str = "static", calibration=None, **options: Any) -> dict[str, Any]:
    """int8 ONNX of the validated fp32 export (exported first when there is none).

    int8_mode="static" (default): QDQ, per-channel weights, activation ranges calibrated on the
    user's images; batch-independent, and a standard-op graph that OpenVINO reads as well.
    int8_mode="dynamic": onnxruntime dynamic quantization (activation scales computed per batch,
    so an image's output depends on its batch; ONNX Runtime only).
    int8_ops="all" quantizes Conv, MatMul and Gemm; "matmul" only MatMul and Gemm.
    The report's "value" holds the size and speed against fp32; an int8 file that is neither
    smaller nor faster is reported as such."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from zoo.errors import ZooError

    from . import batch_axis_is_dynamic, export_onnx, read_metadata, set_metadata

    if int8_ops not in INT8_OPS:
        raise ZooError(f"int8_ops must be one of {sorted(INT8_OPS)}, got {int8_ops!r}")
    if int8_mode not in INT8_MODES:
        raise ZooError(f"int8_mode must be one of {INT8_MODES}, got {int8_mode!r}")
    preprocess = options.get("preprocess", "normalize")
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source = (artifacts or {}).get("onnx")
        fp32_report = None
        if source is None:
            source = os.path.join(tmp, "fp32.onnx")
            fp32_report = export_onnx(model, source, **options)
        if int8_mode == "static":
            how = _quantize_static(model, source, path, calibration, preprocess, int8_ops, tmp)
        else:
            quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS[int8_ops])
            how = f"onnxruntime dynamic int8 (QInt8 weights, activation scales per batch; {'/'.join(INT8_OPS[int8_ops])})"
        meta = dict(read_metadata(source))
        value = _value(str(source), path, model, calibration, preprocess)
    target = meta.get("target", "onnxruntime")
    runtimes = [r for r in INT8_RUNTIMES[int8_mode] if r in (meta.get("runtimes") or [r])]
    meta.update(format="onnx-int8", int8_ops=int8_ops, int8_mode=int8_mode, runtimes=runtimes, quantization=how,
                quantized_from=os.path.basename(str(source)) if fp32_report is None else "fresh fp32 export")
    if target not in runtimes:
        raise ZooError(f"{int8_mode} int8 does not run in the {target!r} target (it runs in {', '.join(runtimes)}); "
                       "export int8 for one of those, or export fp32 for this target")
    proto = onnx.load(str(path))
    set_metadata(proto, meta)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    ops = sorted({n.op_type for n in proto.graph.node if "Integer" in n.op_type or "Quantize" in n.op_type})
    return {"metadata": meta, "quantized_ops": ops, "source": str(source), "value": value,
            "dynamic_batch": batch_axis_is_dynamic(proto)}


def validate_onnx_int8(model, path, images, **options: Any) -> dict[str, Any]:
    from . import validate_onnx

    options["kind"] = "int8"
    options.pop("calibration", None)
    report = validate_onnx(model, path, images, **options)
    if not report["passed"] and options.get("int8_ops", "all") == "all":
        report["problems"] = list(report["problems"]) + [
            f"{options.get('int8_mode', 'static')} int8 on convolutions is too lossy for this model: try "
            "int8_ops='matmul' (CLI --int8-ops matmul), which quantizes only MatMul/Gemm layers"]
    return report
