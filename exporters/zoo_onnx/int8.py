"""int8 ONNX: static QDQ quantization calibrated on the user's images (onnxruntime dynamic
quantization on request), the int8 file's value (size, speed) and its validation.

Built on the fp32 export of this package: `export_onnx_int8` quantizes the validated fp32 file
(or a fresh one), `validate_onnx_int8` judges it in its target runtime.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
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


# The recipes `-O int8_recipe=...` selects (benchmarks/bench_int8.py compares them). All are static
# QDQ with per-channel int8 weights and per-tensor 8-bit activations calibrated on the user's
# images; all keep the head and the first KEEP_FIRST_CONVS convolutions (the stem and the first
# block) in float.
INT8_RECIPES = {
    "nncf": "NNCF post-training quantization (nncf.quantize on the ONNX graph), bias correction",
    "nncf-fast": "NNCF post-training quantization, fast bias correction",
    "nncf-ort": "NNCF with per-tensor activation ranges, re-encoded as uint8 so that ONNX Runtime fuses it "
                "into integer kernels (faster there; less accurate where per-channel ranges matter)",
    "ort-minmax": "ONNX Runtime quantize_static, MinMax ranges",
    "ort-percentile": "ONNX Runtime quantize_static, 99.999th-percentile ranges",
}
DEFAULT_RECIPE = "nncf"
# Measured by keeping one block at a time in float (MobileNetV2 on real photos, NNCF): the stem and
# the first inverted-residual block cost the most agreement (0.90 all-int8; 0.95 with block 1 in
# float); the first three convolutions are the stem and that block in both MobileNetV2 and
# EfficientNet-Lite (lite0 main job, fast bias correction: NNCF 0.935 -> 0.955 agreement, ONNX
# Runtime 0.92 -> 0.94).
KEEP_FIRST_CONVS = 3


def _kept_in_float(graph) -> list[str]:
    """The head's nodes and the first KEEP_FIRST_CONVS convolutions."""
    convs = [n.name for n in graph.node if n.op_type == "Conv"][:KEEP_FIRST_CONVS]
    return _head_nodes(graph) + convs


def _quantize_static(model, source: str, path: Path, calibration, preprocess: str, int8_ops: str, tmp: str,
                     recipe: str = DEFAULT_RECIPE) -> str:
    """QDQ int8 with per-channel weights and activation ranges calibrated on the user's images, so
    every scale is a constant of the file: an image's output never depends on what else is in its
    batch (dynamic int8 computes activation scales per batch)."""
    batches = _calibration_batches(model, calibration, preprocess)
    if recipe.startswith("nncf"):
        return _quantize_nncf(source, path, batches, int8_ops, fast=recipe == "nncf-fast", for_ort=recipe == "nncf-ort")
    return _quantize_ort(source, path, batches, int8_ops, tmp,
                         method="Percentile" if recipe == "ort-percentile" else "MinMax")


def _quantize_nncf(source: str, path: Path, batches, int8_ops: str, fast: bool, for_ort: bool = False) -> str:
    """NNCF's post-training quantization: min/max-style ranges per activation, quantizers placed where
    OpenVINO fuses them, then bias correction (the shift int8 weights give each channel's mean
    output, measured on the calibration images and folded back into the bias). Against ONNX
    Runtime's MinMax quantizer on the main job (lite0, Fashion-MNIST, 200 validation images) it
    halves the top-1 disagreements with fp32, and OpenVINO runs its file as ONNX Runtime does
    (benchmarks/bench_int8.py has the numbers)."""
    import logging

    import numpy as np
    import onnx

    nncf = _import_nncf()
    nncf.set_log_level(logging.ERROR)
    proto = onnx.load(str(source))
    input_name = proto.graph.input[0].name
    keep = _kept_in_float(proto.graph) if int8_ops == "all" else []  # matmul: every Conv in float, the head int8
    images = [np.ascontiguousarray(b[i:i + 1]) for b in batches for i in range(len(b))]
    scope = nncf.IgnoredScope(names=keep, types=[] if int8_ops == "all" else ["Conv"], validate=False)
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        QuantizationParameters,
    )

    def run(advanced=None):
        return nncf.quantize(proto, nncf.Dataset(images, lambda x: {input_name: x}),
                             preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(images),
                             fast_bias_correction=fast, ignored_scope=scope, advanced_parameters=advanced)

    per_tensor = AdvancedQuantizationParameters(
        activations_quantization_params=QuantizationParameters(per_channel=False))
    quantized = run(per_tensor if for_ort else None)
    if not for_ort and not _runs_in_onnxruntime(quantized, input_name, images[0]):
        # NNCF picked per-channel activation scales (MobileNetV3's squeeze-excite convolutions),
        # which ONNX Runtime's QLinearConv refuses at run time: again with per-tensor ones. Only
        # then: forcing them everywhere cost MobileNetV2 agreement (0.974 -> 0.895 on the photos).
        quantized = run(per_tensor)
    if for_ort:
        reencode_uint8(quantized)
        failure = _onnxruntime_failure(quantized, input_name, images[0])
        if failure:  # e.g. squeeze-excite blocks (MobileNetV3), where ORT's own fusion breaks the graph
            from zoo.errors import ZooError

            raise ZooError(f"int8 recipe 'nncf-ort': ONNX Runtime cannot run this backbone's re-encoded graph "
                           f"({failure}); use -O int8_recipe=nncf (the default)")
    onnx.save(quantized, str(path))
    what = "every backbone op" if int8_ops == "all" else "MatMul/Gemm only"
    codes = ("per-channel uint8 weights, per-tensor uint8 activations (re-encoded from NNCF's int8 for ONNX Runtime's "
             "integer kernels)" if for_ort else "per-channel int8 weights, 8-bit activations")
    return (f"QDQ static int8 by NNCF {nncf.__version__} ({codes} calibrated on "
            f"{len(images)} images, {'fast ' if fast else ''}bias correction; {what}; first {KEEP_FIRST_CONVS} convolutions and head fp32)")


def reencode_uint8(proto) -> int:
    """Re-encode every int8 QuantizeLinear/DequantizeLinear (activations and weights) as uint8 with
    its zero point moved by 128: q_u8 = q_i8 + 128 dequantizes to the same (q - zp) x scale, and
    quantizing saturates at the same ends, so the numbers the graph defines do not change. Returns
    how many nodes it re-encoded.

    Why: ONNX Runtime runs a QDQ convolution (or Add) in an integer kernel (QLinearConv, QLinearAdd)
    only where its fusion matches, and on NNCF's residual blocks, which mix int8 (signed: block
    inputs, projections) and uint8 (after ReLU6) tensors, it leaves the convolution and the Add that
    read the block input in float between a DequantizeLinear and a QuantizeLinear. Main job (lite0):
    11 of 46 int8 convolutions fused from NNCF's default file (per-channel activation ranges, which
    QLinearConv cannot take, on the depthwise inputs), 32 with per-tensor ranges, all 46 and the 9
    Adds after this re-encoding; the default file ran at 0.3-0.5x fp32. uint8 weights, not int8: on
    a CPU without VNNI (AVX2), ONNX Runtime's uint8 x int8 kernel adds pairs of products in 16 bits,
    which saturates with full-range 8-bit weights (the main job's re-encoded file with int8 weights,
    fused: 81.0% -> 78.0% top-1, unfused 81.0%); uint8 x uint8 does not (81.0%)."""
    import numpy as np
    from onnx import TensorProto
    from onnx import numpy_helper as nh

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    moved: dict[str, str] = {}  # int8 initializer -> its uint8 copy

    def to_uint8(name: str) -> str | None:
        if name not in inits or inits[name].data_type != TensorProto.INT8:
            return None
        if name not in moved:
            u = (nh.to_array(inits[name]).astype(np.int16) + 128).astype(np.uint8)
            g.initializer.append(nh.from_array(u, f"{name}__uint8"))
            moved[name] = f"{name}__uint8"
        return moved[name]

    outputs = set()
    count = 0
    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = to_uint8(node.input[2])
        if zp is None:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # a weight stored as int8
            node.input[0] = to_uint8(node.input[0]) or node.input[0]
        node.input[2] = zp
        if node.op_type == "QuantizeLinear":
            outputs.add(node.output[0])
        count += 1
    for vi in g.value_info:  # NNCF declares the quantized tensors' types
        if vi.name in outputs:
            vi.type.tensor_type.elem_type = TensorProto.UINT8
    used = {i for n in g.node for i in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return count


def _runs_in_onnxruntime(proto, input_name: str, image) -> bool:
    """Whether ONNX Runtime runs the quantized graph on one image (it refuses per-channel
    activation scales where it fuses a QLinearConv, for one)."""
    return _onnxruntime_failure(proto, input_name, image) is None


def _onnxruntime_failure(proto, input_name: str, image) -> str | None:
    """None if ONNX Runtime runs the graph on one image at each graph optimization level a consumer
    may set (its fusions differ between them, and one of them may build a kernel that refuses to
    run), else why not."""
    import onnxruntime as ort

    data = proto.SerializeToString()
    levels = ort.GraphOptimizationLevel
    for level in (levels.ORT_ENABLE_ALL, levels.ORT_ENABLE_EXTENDED, levels.ORT_ENABLE_BASIC):
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4  # the reason is returned, not logged
            so.graph_optimization_level = level
            sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            sess.run(None, {input_name: image})
        except Exception as exc:  # noqa: BLE001 - any refusal is a reason
            text = (str(exc).strip().splitlines() or [""])[-1]
            text = text if len(text) <= 240 else f"{text[:80]} ... {text[-160:]}"  # the kernel's own words end it
            return f"{level.name}: {type(exc).__name__}: {text}"
    return None


def _import_nncf():
    try:
        import nncf
    except ImportError as exc:
        from zoo.errors import ZooError

        raise ZooError(f"the int8 recipe 'nncf' needs NNCF, which is not installed ({exc}): pip install nncf, "
                       "or choose another recipe (-O int8_recipe=ort-minmax)") from None
    return nncf


def _quantize_ort(source: str, path: Path, batches, int8_ops: str, tmp: str, method: str = "MinMax") -> str:
    """ONNX Runtime's quantize_static. MinMax keeps the rare large activations that ReLU6-style
    networks clip to anyway; Percentile clips the top 0.001%."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    prepared = os.path.join(tmp, "prepared.onnx")
    try:  # shape inference + ORT's basic fusions first, as onnxruntime recommends for static quantization
        quant_pre_process(str(source), prepared, skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - the plain fp32 graph quantizes too, just less fused
        prepared = str(source)
    graph = onnx.load(prepared, load_external_data=False).graph  # whole: _head_nodes reads initializer names
    input_name = graph.input[0].name
    # The rest of the backbone in int8 (every op type: Add, pooling and Clip too, so activations stay
    # int8 between convolutions instead of round-tripping through float).
    excluded = _kept_in_float(graph) if int8_ops == "all" else [
        n.name for n in graph.node if n.op_type == "Conv"][:KEEP_FIRST_CONVS]
    reader = _Calibration(input_name, batches)
    quantize_static(prepared, str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=None if int8_ops == "all" else INT8_OPS[int8_ops],
                    calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=excluded,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibStridedMinMax": 1})
    what = (f"every backbone op; first {KEEP_FIRST_CONVS} convolutions and head fp32" if int8_ops == "all"
            else f"{'/'.join(INT8_OPS[int8_ops])} only")
    images = sum(len(b) for b in batches)
    return (f"QDQ static int8 by ONNX Runtime (per-channel QInt8 weights, QUInt8 activations, {method} calibration "
            f"on {images} images; {what})")


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


def _value(fp32: str, int8: Path, model, calibration, preprocess: str, recipe: str | None = None) -> dict[str, Any]:
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
        notes.append(f"the int8 file is not faster than fp32 in ONNX Runtime on this CPU ({speed:.2f}x)"
                     + ("; -O int8_recipe=nncf-ort writes one that ONNX Runtime runs in integer kernels"
                        if recipe in ("nncf", "nncf-fast") else ""))
    return {"fp32_bytes": os.path.getsize(fp32), "int8_bytes": int8.stat().st_size, "size_ratio": round(size_ratio, 4),
            "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3), "speedup": None if speed is None else round(speed, 3),
            "batch": len(x), "smaller": size_ratio < 1, "faster": bool(speed and speed > 1), "notes": notes}


def export_onnx_int8(model, path, *, artifacts: dict[str, str] | None = None, int8_ops: str = "all",
                     int8_mode: str = "static", int8_recipe: str = DEFAULT_RECIPE, calibration=None,
                     **options: Any) -> dict[str, Any]:
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
    if int8_recipe not in INT8_RECIPES:
        raise ZooError(f"int8_recipe must be one of {', '.join(INT8_RECIPES)}, got {int8_recipe!r}")
    if int8_mode == "static" and int8_recipe.startswith("nncf"):
        _import_nncf()  # before the fp32 work
    preprocess = options.get("preprocess", "normalize")
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source = (artifacts or {}).get("onnx")
        fp32_report = None
        if source is None:
            source = os.path.join(tmp, "fp32.onnx")
            fp32_report = export_onnx(model, source, **options, openvino_ir=False)  # the int8 file gets no IR
        if int8_mode == "static":
            how = _quantize_static(model, source, path, calibration, preprocess, int8_ops, tmp, int8_recipe)
        else:
            quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS[int8_ops])
            how = f"onnxruntime dynamic int8 (QInt8 weights, activation scales per batch; {'/'.join(INT8_OPS[int8_ops])})"
        meta = dict(read_metadata(source))
        value = _value(str(source), path, model, calibration, preprocess,
                       int8_recipe if int8_mode == "static" else None)
    target = meta.get("target", "onnxruntime")
    runtimes = [r for r in INT8_RUNTIMES[int8_mode] if r in (meta.get("runtimes") or [r])]
    meta.update(format="onnx-int8", int8_ops=int8_ops, int8_mode=int8_mode, runtimes=runtimes, quantization=how,
                **({"int8_recipe": int8_recipe} if int8_mode == "static" else {}),
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


# -- validation -------------------------------------------------------------------------------------
# The gate (README "int8"): on labelled validation images (a run's whole validation split, up to
# 1,000 images), int8 top-1 accuracy may be at most tolerance.int8_accuracy_drop (1 point) below
# eager fp32's; without labels, top-1 agreement with fp32 must reach tolerance.int8_agreement (0.9).
# The report gives the drop with a 95% paired bootstrap interval and the agreement. The same gate
# is applied in every runtime the file may list; it lists only those where it passed.
BOOTSTRAP_RESAMPLES = 2000
OTHER_RUNTIMES = ("openvino", "opencv")


def _top1(run, x, batch: int = 8):
    import numpy as np

    return np.concatenate([np.asarray(run(x[i:i + batch])).argmax(1) for i in range(0, len(x), batch)])


def _consumer_runner(runtime: str, path):
    """fn(batch) -> logits, the way a consumer calls the runtime: ONNX Runtime with its default
    session, OpenVINO's compile_model(file, "CPU") with no configuration (so bf16 where the CPU
    has it, as deployed), OpenCV's dnn.readNetFromONNX."""
    import numpy as np

    if runtime == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda b: sess.run(["logits"], {name: b})[0]
    if runtime == "openvino":
        from .openvino_ir import compile_for_consumer

        compiled = compile_for_consumer(path)
        return lambda b: np.array(compiled(b)[compiled.output("logits")])
    if runtime == "opencv":
        import cv2

        net = cv2.dnn.readNetFromONNX(str(path))

        def run_cv(b):
            net.setInput(np.ascontiguousarray(b))
            return np.array(net.forward(["logits"])[0])

        return run_cv
    raise ValueError(runtime)


def int8_gate(ref_top1, top1, targets, tolerance) -> dict[str, Any]:
    """The int8 verdict on one runtime's top-1 answers against eager fp32's (module comment above):
    accuracy drop with a 95% paired bootstrap interval (resampling images, each keeping its fp32
    and int8 answers together) when labelled, top-1 agreement always."""
    import numpy as np

    ref_top1, top1 = np.asarray(ref_top1), np.asarray(top1)
    agreement = float((ref_top1 == top1).mean()) if len(top1) else 1.0
    out: dict[str, Any] = {"images": len(top1), "top1_agreement": agreement}
    labelled = [i for i, t in enumerate(targets or []) if t is not None]
    if labelled:
        idx = np.array(labelled)
        y = np.array([targets[i] for i in labelled])
        diff = (ref_top1[idx] == y).astype(np.int8) - (top1[idx] == y).astype(np.int8)  # +1: int8 lost it
        picks = np.random.default_rng(0).integers(0, len(diff), (BOOTSTRAP_RESAMPLES, len(diff)))
        lo, hi = np.percentile(diff[picks].mean(1), [2.5, 97.5])
        drop = float(diff.mean())
        out.update(labelled=len(idx), fp32_accuracy=float((ref_top1[idx] == y).mean()),
                   int8_accuracy=float((top1[idx] == y).mean()), drop=drop, drop_interval95=[float(lo), float(hi)],
                   interval="95% paired bootstrap", allowed_drop=tolerance.int8_accuracy_drop,
                   passed=drop <= tolerance.int8_accuracy_drop + 1e-12)
        out["rule"] = f"accuracy drop <= {tolerance.int8_accuracy_drop:g} on {len(idx)} labelled images"
    else:
        out.update(passed=agreement >= tolerance.int8_agreement,
                   rule=f"top-1 agreement >= {tolerance.int8_agreement:g} on {len(top1)} unlabelled images")
    return out


def _say_gate(runtime: str, g: Mapping[str, Any]) -> str:
    if "drop" in g:
        lo, hi = g["drop_interval95"]
        return (f"{runtime}: accuracy {g['int8_accuracy']:.3f} vs fp32 {g['fp32_accuracy']:.3f}, drop "
                f"{100 * g['drop']:+.1f} points (95% interval {100 * lo:+.1f} to {100 * hi:+.1f}), top-1 agreement "
                f"{g['top1_agreement']:.3f} on {g['labelled']} images")
    return f"{runtime}: top-1 agreement {g['top1_agreement']:.3f} with fp32 on {g['images']} images"


def validate_onnx_int8(model, path, images, metadata: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Validate in the target as every ONNX file is (batch sizes, metadata; the int8 criteria), then
    judge the gate in each runtime the file lists, at that runtime's defaults. The file's
    `runtimes` (and `metadata`, the sidecar's dict, when given) keep only those that passed."""
    import numpy as np
    import onnx

    from zoo.validation import Tolerance, eager_outputs, model_inputs

    from . import read_metadata, set_metadata, validate_onnx

    options["kind"] = "int8"
    calibration = options.pop("calibration", None)
    report = validate_onnx(model, path, images, **options)
    tol = options.get("tolerance") or Tolerance()
    reference = options.get("reference") or eager_outputs(model, np.asarray(images))
    ref_top1 = np.asarray(reference["logits"]).argmax(1)
    x = model_inputs(np.asarray(images), model.meta.normalization, options.get("preprocess", "normalize"))
    targets = options.get("targets")
    meta = read_metadata(path)
    target = meta.get("target", "onnxruntime")
    gates: dict[str, Any] = {}
    for runtime in [target] + [r for r in meta.get("runtimes", []) if r != target]:
        try:
            gates[runtime] = int8_gate(ref_top1, _top1(_consumer_runner(runtime, path), x), targets, tol)
        except Exception as exc:  # noqa: BLE001 - a runtime that is absent or cannot run the file is not listed
            gates[runtime] = {"passed": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    report["gate"] = gates[target]
    report["runtime_gates"] = gates
    if not gates[target].get("passed"):
        report["passed"] = False
        if not any("int8 accuracy" in p or "agreement" in p for p in report["problems"]):
            report["problems"] = [*report["problems"], f"int8 gate failed: {_say_gate(target, gates[target])}"]
    listed = [r for r in meta.get("runtimes", [target]) if gates.get(r, {}).get("passed")]
    dropped = [r for r in meta.get("runtimes", []) if r not in listed]
    report["notes"] = list(report.get("notes", [])) + [_say_gate(r, g) if "error" not in g else f"{r}: {g['error']}"
                                                       for r, g in gates.items()]
    if dropped:
        report["notes"].append(f"not listed in the file's runtimes (the int8 gate failed there): {', '.join(dropped)}")
    if report["passed"] and listed != meta.get("runtimes"):
        proto = onnx.load(str(path))
        meta["runtimes"] = listed
        set_metadata(proto, meta)
        onnx.save(proto, str(path))
        if metadata is not None:
            metadata["runtimes"] = listed
    report["runtimes"] = listed
    if not report["passed"]:
        report["problems"] = [*report["problems"], *_measured_alternatives(model, path, x, ref_top1, targets, tol,
                                                                           calibration, options)]
    return report


def _measured_alternatives(model, path, x, ref_top1, targets, tol, calibration, options) -> list[str]:
    """After a failed gate: the other static recipes (and int8_ops=matmul), each quantized from the
    same fp32 file on the same calibration images and judged on the same images in ONNX Runtime;
    a suggestion names only those that did better than the failed file, with their numbers."""
    fp32 = (options.get("artifacts") or {}).get("onnx")
    if options.get("int8_mode", "static") != "static" or fp32 is None or calibration is None or not len(calibration):
        return []
    recipe, ops = options.get("int8_recipe", DEFAULT_RECIPE), options.get("int8_ops", "all")
    tried = [(r, ops) for r in INT8_RECIPES if r != recipe] + ([(recipe, "matmul")] if ops == "all" else [])
    base = int8_gate(ref_top1, _top1(_consumer_runner("onnxruntime", path), x), targets, tol)

    def score(g):
        return (g["passed"], -g.get("drop", 0.0), g["top1_agreement"])

    better = []
    preprocess = options.get("preprocess", "normalize")
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        for r, o in tried:
            alt = Path(tmp) / f"{r}-{o}.onnx"
            try:
                if r.startswith("nncf"):
                    _import_nncf()
                _quantize_static(model, fp32, alt, calibration, preprocess, o, tmp, r)
                g = int8_gate(ref_top1, _top1(_consumer_runner("onnxruntime", alt), x), targets, tol)
            except Exception:  # noqa: BLE001, S112 - an alternative that cannot be built is not suggested
                continue
            if score(g) > score(base):
                flags = (f"-O int8_recipe={r}" if r != recipe else "") + (" --int8-ops matmul" if o != ops else "")
                text = (f"{flags.strip()} measured better here ({_say_gate('onnxruntime', g)}"
                        f"{'; passes the gate' if g['passed'] else ''})")
                better.append((score(g), text))
    better.sort(key=lambda t: t[0], reverse=True)
    return [f"try {text}" for _, text in better]
