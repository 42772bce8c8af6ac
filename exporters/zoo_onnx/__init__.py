"""The ONNX exporters: `onnx` (fp32) and `onnx-int8` (static QDQ int8 calibrated on the user's
images by default; onnxruntime dynamic quantization on request).

Two `zoo.Exporter`s registered from `zoo_register_exporters`, found through the `zoo`
entry-point group like any third-party format. Their options (opset, onnx_exporter, optimize,
int8_ops) are theirs: the zoo core knows none of them. This module is also the one place that
knows where ONNX artifacts keep their metadata (`read_metadata`), for `zoo.predict`.

Export path. DEFAULT_OPSET is 18. For opset >= 18 the model goes through torch's default,
torch.export-based ("dynamo") exporter; it cannot target opsets below 18 reliably (it keeps 18
when its version conversion fails), so opset < 18 uses the TorchScript-based exporter, and
`onnx_exporter="auto"` also falls back to it when the dynamo exporter is missing (onnxscript not
installed) or fails: loudly, one stderr line with the reason, and the report's "fallback" records
it; `onnx_exporter="dynamo"` makes that an error instead. Either way the opset written is checked against the one asked for, the batch axis is traced
at batch 2 and marked dynamic (validation then runs batch 1, 3 and 8), `onnx.checker` runs with
full_check (shape inference included), and the file is self-contained (no external data).

Graph: input "image" (uint8 NHWC, baked preprocessing) or "input" (float32 NCHW); outputs
"logits", "probabilities" and, unless embedding=False, "embedding". metadata_props carries every
field of `zoo.export.artifact_metadata` under "zoo.<field>" (JSON-encoded values) plus the whole
dict as "zoo.metadata"; `zoo.predict` reads it back with onnxruntime alone.

optimize=True saves ONNX Runtime's *basic* offline graph optimizations (constant folding,
Conv+BatchNorm/Add/Mul fusion, redundant node elimination): standard ONNX ops only, so the file
stays portable and checkable. Extended and layout optimizations are hardware-specific; ONNX
Runtime applies them when a session loads the file (the predictor enables them all).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from zoo import Exporter, ExportOption, ExportOptions, ValidationResult, hookimpl
from zoo.options import ONNX_OPSETS

DEFAULT_OPSET = 18
MIN_DYNAMO_OPSET = 18
MAX_BATCH = 1 << 16
METADATA_PREFIX = "zoo."


# -- export -------------------------------------------------------------------------------------------
def _export_graph(module, example, opset: int, input_name: str, outputs: list[str], exporter: str,
                  dynamic_size: bool = False):
    """-> onnx.ModelProto, in memory (written once, after the metadata is in). The batch axis is
    dynamic; with dynamic_size, height and width too."""
    import io

    import onnx
    import torch

    hw = (1, 2) if example.dtype == torch.uint8 else (2, 3)  # NHWC uint8 image, or NCHW float
    if exporter == "dynamo":
        axes = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
        if dynamic_size:
            axes.update({hw[0]: torch.export.Dim("height", min=32, max=4096), hw[1]: torch.export.Dim("width", min=32, max=4096)})
        program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset,
                                     input_names=[input_name], output_names=outputs, dynamic_shapes=(axes,),
                                     verbose=False)
        return program.model_proto
    buf = io.BytesIO()
    in_axes = {0: "batch", **({hw[0]: "height", hw[1]: "width"} if dynamic_size else {})}
    torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset,
                      input_names=[input_name], output_names=outputs, do_constant_folding=True,
                      dynamic_axes={input_name: in_axes, **{n: {0: "batch"} for n in outputs}})
    return onnx.load_from_string(buf.getvalue())


def dynamo_unavailable_reason() -> str | None:
    """Why torch's dynamo ONNX exporter cannot run here, or None. Checked up front so the
    reason given is the real one (a missing package), not whatever error its absence causes."""
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        return "onnxscript is not installed (pip install onnxscript; backbone-zoo declares it)"
    return None


def _fallback_notice(reason: str) -> str:
    return (f"zoo export: the dynamo ONNX exporter could not be used: {reason}; exported with the "
            "TorchScript-based exporter instead (recorded in export-report.json; --onnx-exporter dynamo "
            "makes this an error)")


def _export_with_fallback(module, example, opset: int, input_name: str, outputs: list[str], onnx_exporter: str,
                          dynamic_size: bool = False):
    """-> (onnx.ModelProto, exporter used, fallback record or None).

    "auto": dynamo for opset >= 18; when it is missing (no onnxscript) or fails, the
    TorchScript-based exporter, loudly: one stderr line with the reason, and the record
    {"from", "to", "reason"} for the report. "dynamo": the same situation is an error naming the
    reason and the fix. Nothing falls back silently."""
    import sys

    import torch

    from zoo.errors import ZooError

    chosen = "dynamo" if onnx_exporter == "dynamo" or (onnx_exporter == "auto" and opset >= MIN_DYNAMO_OPSET) else "legacy"
    reason = dynamo_unavailable_reason() if chosen == "dynamo" else None
    if reason is None:
        try:
            with torch.no_grad():
                return _export_graph(module, example, opset, input_name, outputs, chosen, dynamic_size), chosen, None
        except Exception as exc:
            if chosen != "dynamo":
                raise
            reason = f"it failed ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]})"
    if onnx_exporter == "dynamo":
        raise ZooError(f"--onnx-exporter dynamo: the dynamo ONNX exporter could not be used: {reason}; install "
                       "what is missing, or use --onnx-exporter auto (falls back to the TorchScript-based "
                       "exporter) or legacy")
    print(_fallback_notice(reason), file=sys.stderr, flush=True)
    with torch.no_grad():
        proto = _export_graph(module, example, opset, input_name, outputs, "legacy", dynamic_size)
    return proto, "legacy", {"from": "dynamo", "to": "legacy", "reason": reason}


def graph_opset(model_proto) -> int:
    return next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def batch_axis_is_dynamic(model_proto) -> bool:
    dims = [model_proto.graph.input[0].type.tensor_type.shape.dim[0]]
    dims += [o.type.tensor_type.shape.dim[0] for o in model_proto.graph.output]
    return all(d.dim_param and not d.HasField("dim_value") for d in dims)


def set_metadata(model_proto, metadata: dict[str, Any]) -> None:
    """Replace the zoo.* metadata_props with `metadata` (one JSON value per field + the whole)."""
    keep = [(p.key, p.value) for p in model_proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model_proto.metadata_props[:]
    for key, value in keep:
        model_proto.metadata_props.add(key=key, value=value)
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=METADATA_PREFIX + key, value=value if isinstance(value, str) else json.dumps(value))
    model_proto.metadata_props.add(key=METADATA_PREFIX + "metadata", value=json.dumps(metadata))
    model_proto.doc_string = (f"backbone-zoo export of {metadata.get('backbone')} with a {metadata.get('num_classes')}-class "
                              f"head; input {metadata.get('input_description')}; outputs {', '.join(metadata.get('outputs', []))}")


def read_metadata(path_or_session) -> dict[str, Any]:
    """The zoo metadata of an ONNX file or an onnxruntime session ({} when absent)."""
    if hasattr(path_or_session, "get_modelmeta"):
        props = path_or_session.get_modelmeta().custom_metadata_map
    else:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path_or_session), load_external_data=False).metadata_props}
    raw = props.get(METADATA_PREFIX + "metadata")
    return json.loads(raw) if raw else {}


def _ort_optimize(path: Path) -> None:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        before = onnx.load(str(path), load_external_data=False)
        after = onnx.load(str(optimized))
        used = {n.domain for n in after.graph.node} | {""}  # ORT declares all its domains; keep the used ones
        kept = [o for o in after.opset_import if o.domain in used]
        del after.opset_import[:]
        after.opset_import.extend(kept)
        del after.metadata_props[:]
        after.metadata_props.extend(before.metadata_props)
        after.doc_string = before.doc_string
        onnx.save(after, str(path))


def export_onnx(model, path, *, opset: int | None = None, preprocess: str = "normalize", embedding: bool = True,
                optimize: bool = False, onnx_exporter: str = "auto", target: str | None = None,
                dynamic_size: bool = False, **_: Any) -> dict[str, Any]:
    """Write the whole model (preprocessing if baked, backbone, head, softmax) to `path`, fitted
    to the deployment target's profile (see targets.py): at a fixed input size every
    shape-dependent subgraph is folded to constants; the result must pass the target's checks."""
    import onnx
    import torch

    from zoo.errors import ZooError
    from zoo.export import artifact_metadata, deploy_module, example_input, output_names

    from . import targets as tg

    path = Path(path)
    target = tg.profile(target).name
    opset = int(opset or DEFAULT_OPSET)
    if onnx_exporter not in ("auto", "dynamo", "legacy"):
        raise ZooError(f"onnx_exporter must be 'auto', 'dynamo' or 'legacy', got {onnx_exporter!r}")
    if onnx_exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
        raise ZooError(f"the dynamo ONNX exporter writes opset >= {MIN_DYNAMO_OPSET}; for opset {opset} use "
                       "onnx_exporter='legacy' or 'auto'")
    full = preprocess == "full"
    if full:  # the model graph takes float NCHW; the preprocessing graph goes in front of it below
        from .preprocess_graph import MIN_OPSET

        tg.check_full_preprocess(target)
        if dynamic_size:
            raise ZooError("--dynamic-size does not apply with --preprocess full: that graph already takes images of "
                           "any size (and resizes them to the model's input size)")
        if opset < MIN_OPSET:
            raise ZooError(f"--preprocess full needs ONNX opset >= {MIN_OPSET} (Resize with antialias), got {opset}")
    graph_preprocess = "none" if full else preprocess
    module = deploy_module(model, graph_preprocess, embedding)
    example = example_input(model, graph_preprocess, batch=2)
    input_name = "image" if preprocess == "normalize" else "input"
    outputs = output_names(embedding)
    try:
        proto, chosen, fallback = _export_with_fallback(module, example, opset, input_name, outputs, onnx_exporter,
                                                        dynamic_size)
    finally:
        model.eval()  # the exporters toggle train/eval on the way

    written = graph_opset(proto)
    if written != opset:
        raise ZooError(f"asked for ONNX opset {opset} but the {chosen} exporter wrote opset {written}")
    if not dynamic_size:
        proto = tg.fold_static_shapes(proto, opset)
    problems = tg.profile_problems(proto, target)
    if problems and onnx_exporter == "auto" and chosen == "dynamo":
        # the dynamo graph keeps some batch-size arithmetic (Shape/Range) static-shape runtimes reject
        reason = f"its graph does not fit the {target} target ({problems[0]})"
        fallback = {"from": "dynamo", "to": "legacy", "reason": reason}
        print(_fallback_notice(reason), file=sys.stderr, flush=True)
        chosen = "legacy"
        with torch.no_grad():
            proto = _export_graph(module, example, opset, input_name, outputs, chosen, dynamic_size)
        model.eval()
        if not dynamic_size:
            proto = tg.fold_static_shapes(proto, opset)
    if full:
        from .preprocess_graph import prepend

        proto = prepend(proto, model.meta.normalization, input_name="image")
        input_name = "image"
    tg.check_profile(proto, target, f"the {chosen} exporter's graph")
    meta = artifact_metadata(model, "onnx", preprocess, embedding, opset=opset, onnx_exporter=chosen,
                             ort_offline_optimization="basic" if optimize else "none", target=target,
                             runtimes=[t for t in tg.TARGETS if not tg.profile_problems(proto, t)
                                       and not (full and tg.profile(t).full_preprocess)],
                             dynamic_size=bool(dynamic_size))
    set_metadata(proto, meta)
    onnx.save(proto, str(path))
    if optimize:
        _ort_optimize(path)
        proto = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    report = {
        "metadata": meta,
        "opset": written,
        "exporter": chosen,
        "dynamic_batch": batch_axis_is_dynamic(proto),
        "checker": "onnx.checker full_check passed",
        "nodes": len(proto.graph.node),
        "initializers": len(proto.graph.initializer),
        "input": input_name,
        "outputs": outputs,
        "target": target,
        "runtimes": meta["runtimes"],
        "static_shapes_folded": not dynamic_size,
    }
    if fallback:
        report["fallback"] = fallback
        report["fallback_reason"] = fallback["reason"]
    if not report["dynamic_batch"]:
        raise ZooError(f"the exported graph has a fixed batch axis ({path.name}); it must be dynamic")
    return report


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

    if calibration is not None and len(calibration):
        x = model_inputs(np.asarray(calibration[:8]), model.meta.normalization, preprocess)
    else:
        from zoo.export import example_input

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


# -- validation -------------------------------------------------------------------------------------
def session(path, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate_onnx(model, path, images, *, target: str | None = None, validate_target: bool = True,
                  **options: Any) -> dict[str, Any]:
    """Run the file in its target's runtime (ONNX Runtime with all graph optimizations on, as
    deployed, by default) on the validation images at each batch size and compare with eager
    PyTorch. validate_target=False (--no-validate-target) checks it in ONNX Runtime instead and
    says that the target itself was not tried."""
    from . import targets as tg

    target = tg.profile(target).name
    ran_in = target if validate_target else "onnxruntime"
    report = tg.validate_in_target(model, path, images, target=ran_in, **options)
    if ran_in != target:
        report["target_validation"] = f"skipped (--no-validate-target): validated in onnxruntime, not in {target}"
    names = [o.name for o in __import__("onnx").load(str(path), load_external_data=False).graph.output]
    meta = read_metadata(path)
    if "embedding" in meta.get("outputs", []) and "embedding" not in names:
        report["problems"] = list(report["problems"]) + ["metadata lists an embedding output the graph does not have"]
        report["passed"] = False
    if "top1_agreement" in report:
        report["agreement_delta"] = 1.0 - report["top1_agreement"]
    return report


def validate_onnx_int8(model, path, images, **options: Any) -> dict[str, Any]:
    options["kind"] = "int8"
    options.pop("calibration", None)
    report = validate_onnx(model, path, images, **options)
    if not report["passed"] and options.get("int8_ops", "all") == "all":
        report["problems"] = list(report["problems"]) + [
            f"{options.get('int8_mode', 'static')} int8 on convolutions is too lossy for this model: try "
            "int8_ops='matmul' (CLI --int8-ops matmul), which quantizes only MatMul/Gemm layers"]
    return report


def export_module(module, example, path, *, opset: int | None = None, onnx_exporter: str = "auto",
                  **_: Any) -> dict[str, Any]:
    """A bare module (float NCHW "input" -> "output", dynamic batch) for `zoo bench`."""
    import onnx

    opset = int(opset or DEFAULT_OPSET)
    proto, chosen, fallback = _export_with_fallback(module.eval(), example, opset, "input", ["output"], onnx_exporter)
    onnx.save(proto, str(path))
    return {"opset": graph_opset(proto), "exporter": chosen, **({"fallback": fallback} if fallback else {})}


# -- the providers -------------------------------------------------------------------------------------
_GRAPH_OPTIONS = (
    ExportOption("opset", DEFAULT_OPSET, f"ONNX opset (default {DEFAULT_OPSET}; < {MIN_DYNAMO_OPSET} uses the "
                 "TorchScript-based exporter)", type=int,
                 choices=tuple(range(ONNX_OPSETS[0], ONNX_OPSETS[1] + 1))),  # what torch.onnx can write
    ExportOption("onnx_exporter", "auto", "torch exporter: auto (dynamo; TorchScript-based, with a warning, when "
                 "dynamo is missing or fails), dynamo (that fallback is an error), legacy",
                 choices=("auto", "dynamo", "legacy")),
    ExportOption("optimize", False, "save ONNX Runtime's basic offline graph optimizations into the file", type=bool),
    ExportOption("target", "onnxruntime", "runtime the file is for: its graph is fitted to that runtime's profile and "
                 "validated in it (zoo_onnx.targets)", choices=("onnxruntime", "openvino", "opencv")),
    ExportOption("validate_target", True, "validate in the target runtime (false: in ONNX Runtime, and the report "
                 "says the target was not tried)", type=bool),
    ExportOption("dynamic_size", False, "dynamic input height and width where the backbone allows (verified at a "
                 "second size)", type=bool),
)


class Onnx(Exporter):
    name = "onnx"
    suffix = ".onnx"
    description = f"ONNX (default opset {DEFAULT_OPSET}, dynamic batch, metadata_props; ONNX Runtime validated)"
    requires = ("onnx", "onnxruntime")
    options = _GRAPH_OPTIONS
    in_all = True
    preprocess_modes = ("normalize", "none", "full")

    def export(self, model, path, options: ExportOptions):
        return export_onnx(model, path, **options.as_kwargs())

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_onnx(model, path, images, reference=reference, tolerance=tolerance, batch_sizes=batch_sizes,
                               targets=targets, **options.as_kwargs())
        return ValidationResult.from_report(report)

    def read_metadata(self, artifact):
        return read_metadata(artifact)

    def export_module(self, module, example, path, options: ExportOptions):
        return export_module(module, example, path, **options.options)


class OnnxInt8(Onnx):
    name = "onnx-int8"
    suffix = ".int8.onnx"
    description = ("ONNX int8: static QDQ, per-channel, calibrated on your images (dynamic on request); "
                   "validated on top-1 agreement, size and speed reported")
    options = _GRAPH_OPTIONS + (
        ExportOption("int8_ops", "all", "quantize Conv+MatMul+Gemm (all) or only MatMul+Gemm (matmul)",
                     choices=tuple(INT8_OPS)),
        ExportOption("int8_mode", "static", "static (QDQ, calibrated on your images, batch-independent; ONNX Runtime "
                     "and OpenVINO) or dynamic (activation scales per batch; ONNX Runtime only)", choices=INT8_MODES),
    )
    in_all = False
    builds_on = "onnx"
    quantization = "int8"
    # quantizing the in-graph resize (and judging int8 on the full criteria) is not built yet
    preprocess_modes = ("normalize", "none")

    def export(self, model, path, options: ExportOptions):
        return export_onnx_int8(model, path, **options.as_kwargs())

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_onnx_int8(model, path, images, reference=reference, tolerance=tolerance,
                                    batch_sizes=batch_sizes, targets=targets, **options.as_kwargs())
        return ValidationResult.from_report(report)

    def export_module(self, module, example, path, options):
        raise NotImplementedError("onnx-int8 exports whole zoo models only")


@hookimpl
def zoo_register_exporters(register):
    register(Onnx())
    register(OnnxInt8())
