"""The ONNX exporters: `onnx` (fp32), `onnx-int8` (static int8, QDQ, calibrated on the user's
images: `--quantize int8`) and `onnx-int8-dynamic` (onnxruntime dynamic int8, opt-in:
`--quantize int8-dynamic`).

Three `zoo.Exporter`s registered from `zoo_register_exporters`, found through the `zoo`
entry-point group like any third-party format. Their options (opset, onnx_exporter, optimize,
int8_ops, calibration_method) are theirs: the zoo core knows none of them. This module is also the one place that
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
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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
    module = deploy_module(model, preprocess, embedding)
    example = example_input(model, preprocess, batch=2)
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
    tg.check_profile(proto, target, f"the {chosen} exporter's graph")
    meta = artifact_metadata(model, "onnx", preprocess, embedding, opset=opset, onnx_exporter=chosen,
                             ort_offline_optimization="basic" if optimize else "none", target=target,
                             runtimes=[t for t in tg.TARGETS if not tg.profile_problems(proto, t)],
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


# -- int8 --------------------------------------------------------------------------------------------
# int8_ops: which layers are quantized. Static: "all" is every op type onnxruntime's static
# quantizer handles (Conv, MatMul, Gemm, Add, Mul, pooling, ...), "matmul" only MatMul/Gemm.
# Dynamic: "all" is Conv+MatMul+Gemm (the ops it quantizes), "matmul" MatMul/Gemm.
INT8_OPS = {"all": ["Conv", "MatMul", "Gemm"], "matmul": ["MatMul", "Gemm"]}
STATIC_INT8_OPS = {"all": None, "matmul": ["MatMul", "Gemm"]}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
CALIBRATION_BATCH = 4  # images per calibration run; ranges are reduced every few runs to bound memory
INT8_RUNTIMES = ("onnxruntime", "openvino")  # runtimes verified to load QDQ int8 and agree with it


def _fp32_source(model, artifacts, tmp: str, options: dict[str, Any]) -> tuple[str, bool]:
    """(path of the fp32 ONNX file to quantize, whether it was exported just now): the validated
    `onnx` artifact of this export when there is one, else a fresh export into `tmp`."""
    source = (artifacts or {}).get("onnx")
    if source is not None:
        return str(source), False
    source = os.path.join(tmp, "fp32.onnx")
    export_onnx(model, source, **{k: v for k, v in options.items() if k != "artifacts"})
    return source, True


def head_node_names(proto) -> list[str]:
    """Names of the nodes that form the classification head: those reading the head's weights
    ("head.*" initializers) or the embedding output, and everything downstream (activations,
    softmax). Static int8 keeps them in float: the head is tiny (no size or speed to gain), and
    quantizing it would put the logits and probabilities on a 256-level grid fitted to the
    calibration images (probabilities below 1/255 would read 0)."""
    heads = {i.name for i in proto.graph.initializer if i.name.startswith("head.")}
    seeds = {"embedding"} | heads
    excluded: list[str] = []
    produced: set[str] = set()
    for node in proto.graph.node:  # topological order: downstream nodes come later
        if any(n in seeds or n in produced for n in node.input):
            excluded.append(node.name)
            produced.update(node.output)
    return excluded


def _named(proto) -> None:
    """Give every node a name (nodes_to_exclude works by name)."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


class _Calibration:
    """onnxruntime's CalibrationDataReader over a uint8 NHWC image array, CALIBRATION_BATCH images
    a batch. It has a length and a range (onnxruntime's "CalibStridedMinMax" protocol), so the
    calibrator reduces each batch to ranges before the next one runs: memory stays at one batch
    of activations however many images calibrate."""

    def __init__(self, inputs, input_name: str):
        self.batches = [{input_name: inputs[i:i + CALIBRATION_BATCH]} for i in range(0, len(inputs), CALIBRATION_BATCH)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self):
        return next(self.pending, None)


def _pre_process(source: str, out: str) -> str:
    """onnxruntime's recommended preparation for quantization (symbolic shape inference, basic
    graph optimization such as Conv+BatchNorm fusion, ONNX shape inference); where it cannot run
    on this graph, the plain graph is quantized and the report says so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(source, out, skip_symbolic_shape=skip_symbolic)
            return "onnxruntime quant_pre_process" + (" (without symbolic shape inference)" if skip_symbolic else "")
        except Exception as exc:  # noqa: BLE001 - reported, the unprepared graph still quantizes
            reason = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    shutil.copyfile(source, out)
    return f"skipped ({reason})"


def export_onnx_int8(model, path, *, artifacts: dict[str, str] | None = None, calibration=None,
                     int8_ops: str = "all", calibration_method: str = "minmax", target: str | None = None,
                     preprocess: str = "normalize", **options: Any) -> dict[str, Any]:
    """Static int8 (QDQ format) of the validated fp32 export (exported first when there is none):
    weights int8 per output channel, activations uint8 with ranges calibrated on the user's
    images (`calibration`, uint8 NHWC at the input size; default: the default validation
    images). The classification head stays float (`head_node_names`). Every image's output is
    fixed by the calibrated ranges alone, so it never depends on the rest of its batch (dynamic
    int8 computes activation ranges per batch: `export_onnx_int8_dynamic`).

    calibration_method: minmax (default: the observed activation range; deterministic and exact
    for bounded activations like ReLU6, robust with the 64-256 images a run provides),
    percentile (clips the top 0.001% of values: for long-tailed activations) or entropy.
    The QDQ file runs in onnxruntime and OpenVINO (both verified; the metadata's "runtimes");
    OpenCV's profile does not take QuantizeLinear/DequantizeLinear, so target="opencv" is refused."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from zoo.errors import ZooError
    from zoo.validation import load_validation_images, model_inputs

    from . import targets as tg

    path = Path(path)
    target = tg.profile(target).name
    if not tg.profile(target).int8:
        raise ZooError(f"the {target} target does not run int8 ONNX (QuantizeLinear/DequantizeLinear): export int8 "
                       f"for --target {' or '.join(INT8_RUNTIMES)}, or fp32 only (no --quantize) for {target}")
    if int8_ops not in STATIC_INT8_OPS:
        raise ZooError(f"int8_ops must be one of {sorted(STATIC_INT8_OPS)}, got {int8_ops!r}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ZooError(f"calibration_method must be one of {list(CALIBRATION_METHODS)}, got {calibration_method!r}")
    norm = model.meta.normalization
    if calibration is None:
        calibration = load_validation_images(None, norm).pixels
    inputs = model_inputs(calibration, norm, preprocess)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration_method]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source, fresh = _fp32_source(model, artifacts, tmp, {"target": target, "preprocess": preprocess, **options})
        fp32_bytes = os.path.getsize(source)
        prepared = os.path.join(tmp, "prepared.onnx")
        pre = _pre_process(source, prepared)
        proto = onnx.load(prepared)
        _named(proto)
        onnx.save(proto, prepared)
        excluded = head_node_names(proto)
        quantize_static(prepared, str(path), _Calibration(inputs, proto.graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=STATIC_INT8_OPS[int8_ops], nodes_to_exclude=excluded,
                        extra_options={"CalibStridedMinMax": 1})
        meta = dict(read_metadata(source))
    proto = onnx.load(str(path))
    runtimes = [t for t in INT8_RUNTIMES if not tg.profile_problems(proto, t)]
    meta.update(format="onnx-int8", int8_ops=int8_ops, runtimes=runtimes, target=target,
                quantization=(f"static int8, QDQ: per-channel int8 weights, uint8 activations calibrated ({calibration_method}) "
                              f"on {len(inputs)} images; head in float"),
                int8_mode="static", calibration_method=calibration_method, calibration_images=int(len(inputs)),
                quantized_from="fresh fp32 export" if fresh else os.path.basename(source))
    tg.check_profile(proto, target, "the static int8 graph")
    set_metadata(proto, meta)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return {"metadata": meta, "quantized_ops": _quantized_ops(proto), "source": str(source),
            "dynamic_batch": batch_axis_is_dynamic(proto), "mode": "static", "pre_process": pre,
            "calibration": {"images": int(len(inputs)), "method": calibration_method},
            "float_head_nodes": len(excluded), "fp32_size_bytes": fp32_bytes, "runtimes": runtimes}


def export_onnx_int8_dynamic(model, path, *, artifacts: dict[str, str] | None = None, int8_ops: str = "all",
                             target: str | None = None, **options: Any) -> dict[str, Any]:
    """Dynamic int8 quantization (weights int8, activation ranges computed per batch at run time)
    of the validated fp32 export; exported first when there is none. Opt-in only
    (`--quantize int8-dynamic`): an image's output depends on what else is in its batch, and
    the ops (ConvInteger, MatMulInteger, DynamicQuantizeLinear) run in onnxruntime only.

    int8_ops="all" quantizes Conv, MatMul and Gemm; "matmul" only MatMul and Gemm (heads, fully
    connected and attention layers). Dynamic quantization of convolutions can cost CNNs real
    accuracy (MobileNetV2's depthwise convs do); validation then fails closed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from zoo.errors import ZooError

    from . import targets as tg

    target = tg.profile(target).name
    if target != "onnxruntime":
        raise ZooError(f"dynamic int8 runs in onnxruntime only, not in the {target} target: use static int8 "
                       "(--quantize int8) for openvino, or --target onnxruntime")
    if int8_ops not in INT8_OPS:
        raise ZooError(f"int8_ops must be one of {sorted(INT8_OPS)}, got {int8_ops!r}")
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source, fresh = _fp32_source(model, artifacts, tmp, {"target": target, **options})
        fp32_bytes = os.path.getsize(source)
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS[int8_ops])
        meta = dict(read_metadata(source))
    meta.update(format="onnx-int8-dynamic", int8_ops=int8_ops, runtimes=["onnxruntime"], int8_mode="dynamic",
                quantization=(f"onnxruntime dynamic int8 (QInt8 weights; {'/'.join(INT8_OPS[int8_ops])}); activation "
                              "ranges per batch: outputs depend on the batch's other images"),
                quantized_from="fresh fp32 export" if fresh else os.path.basename(source))
    proto = onnx.load(str(path))
    set_metadata(proto, meta)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return {"metadata": meta, "quantized_ops": _quantized_ops(proto), "source": str(source), "mode": "dynamic",
            "dynamic_batch": batch_axis_is_dynamic(proto), "fp32_size_bytes": fp32_bytes, "runtimes": ["onnxruntime"]}


def _quantized_ops(proto) -> list[str]:
    return sorted({n.op_type for n in proto.graph.node if "Integer" in n.op_type or "quantize" in n.op_type.lower()})


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


def validate_onnx_int8(model, path, images, *, mode: str = "static", **options: Any) -> dict[str, Any]:
    """validate_onnx with the int8 criteria (zoo.validation), then what the int8 file is worth
    against fp32 (`int8_value`): accuracy on the labelled images, agreement, logit differences,
    size and speed ratios. Not smaller or not faster is reported (report["int8"]["notes"]), not
    failed: the verdict stays on agreement and accuracy."""
    options["kind"] = "int8"
    report = validate_onnx(model, path, images, **options)
    try:
        report["int8"] = int8_value(model, path, images, report, mode=mode, **options)
    except Exception as exc:  # noqa: BLE001 - the measurement is information; the verdict does not rest on it
        report["int8"] = {"mode": mode, "notes": [f"size/speed against fp32 not measured: {type(exc).__name__}: {exc}"]}
    if not report["passed"]:
        hint = ("static int8 loses too much on this model: try -O calibration_method=percentile, or --int8-ops "
                "matmul (quantizes only MatMul/Gemm layers)") if mode == "static" else (
                "dynamic int8 is too lossy for this model: use static int8 (--quantize int8)"
                + (", or --int8-ops matmul (only MatMul/Gemm layers)" if options.get("int8_ops", "all") == "all" else ""))
        report["problems"] = list(report["problems"]) + [hint]
    return report


SPEED_THREADS = 4  # at most; both files run with the same number


def int8_value(model, path, images, report: dict[str, Any], *, mode: str = "static",
               artifacts: dict[str, str] | None = None, preprocess: str = "normalize", batch: int = 8,
               **options: Any) -> dict[str, Any]:
    """The int8 file against its fp32 source, for the report: top-1 accuracy of both on the
    labelled validation images, agreement and logit differences (from `report`), file size
    ratio (int8 / fp32) and speed-up (fp32 time / int8 time: ONNX Runtime CPU, all graph
    optimizations, the same threads and the same batch, interleaved runs, the median of each; a
    reported measurement, not a pass criterion). "notes" says in words when the int8 file is
    not smaller or not faster than fp32."""
    from zoo.validation import model_inputs

    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        fp32, _ = _fp32_source(model, artifacts, tmp, {"preprocess": preprocess, **options})
        fp32_bytes, int8_bytes = os.path.getsize(fp32), os.path.getsize(path)
        x = model_inputs(images, model.meta.normalization, preprocess)
        x = np.concatenate([x] * -(-batch // len(x)))[:batch] if len(x) else x
        threads = max(1, min(SPEED_THREADS, os.cpu_count() or 1))
        timing = time_sessions({"fp32": fp32, "int8": str(path)}, x, threads)
    acc = report.get("accuracy")
    out = {
        "mode": mode,
        "accuracy_fp32": acc["eager"] if acc else None,
        "accuracy_int8": acc["artifact"] if acc else None,
        "accuracy_drop": -acc["delta"] if acc else None,
        "accuracy_images": acc["images"] if acc else 0,
        "top1_agreement": report.get("top1_agreement"),
        "max_abs_logit_diff": report.get("max_abs_logit_diff"),
        "mean_abs_logit_diff": report.get("mean_abs_logit_diff"),
        "max_batch_size_diff": report.get("max_batch_size_diff"),
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
        "fp32_ms": timing["fp32"] * 1e3,
        "int8_ms": timing["int8"] * 1e3,
        "speedup": timing["fp32"] / timing["int8"],
        "speed_batch": int(len(x)),
        "speed_threads": threads,
        "speed_runs": timing["runs"],
    }
    out["smaller"] = out["size_ratio"] < 1.0
    out["faster"] = out["speedup"] > 1.0
    notes = []
    if not out["smaller"]:
        notes.append(f"the int8 file is NOT smaller than fp32 ({int8_bytes:,} vs {fp32_bytes:,} bytes, "
                     f"{out['size_ratio']:.2f}x)")
    if not out["faster"]:
        notes.append(f"the int8 file is NOT faster than fp32 in ONNX Runtime here ({out['int8_ms']:.1f} vs "
                     f"{out['fp32_ms']:.1f} ms per batch of {len(x)}, {threads} threads)")
    out["notes"] = notes
    return out


def time_sessions(paths: dict[str, str], x, threads: int, budget_s: float = 2.0, min_runs: int = 3,
                  max_runs: int = 25) -> dict[str, Any]:
    """Median seconds per run of each file on the same input, in ONNX Runtime sessions with the
    same settings; the runs interleave (a noisy neighbour slows both alike)."""
    import time

    import onnxruntime as ort

    sessions = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        sess.run(None, feed)  # warm-up: first-run allocations are not the steady state
        sessions[name] = (sess, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    start = time.perf_counter()
    runs = 0
    while runs < max_runs and (runs < min_runs or time.perf_counter() - start < budget_s):
        order = list(sessions) if runs % 2 == 0 else list(reversed(sessions))
        for name in order:
            sess, feed = sessions[name]
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - t0)
        runs += 1
    return {**{name: float(np.median(t)) for name, t in times.items()}, "runs": runs}


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
    description = ("ONNX static int8 (QDQ, per-channel weights, activations calibrated on your images; onnxruntime "
                   "and OpenVINO), validated on agreement and accuracy, with its size and speed against fp32")
    options = _GRAPH_OPTIONS + (
        ExportOption("int8_ops", "all", "quantize every op the static quantizer handles (all) or only MatMul+Gemm "
                     "(matmul)", choices=tuple(STATIC_INT8_OPS)),
        ExportOption("calibration_method", "minmax", "activation ranges from the calibration images: minmax, "
                     "percentile (clips outliers) or entropy", choices=CALIBRATION_METHODS),
    )
    in_all = False
    builds_on = "onnx"
    quantization = "int8"
    calibrates = True

    def export(self, model, path, options: ExportOptions):
        return export_onnx_int8(model, path, calibration=options.calibration, **options.as_kwargs())

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_onnx_int8(model, path, images, mode="static", reference=reference, tolerance=tolerance,
                                    batch_sizes=batch_sizes, targets=targets, **options.as_kwargs())
        return ValidationResult.from_report(report)

    def export_module(self, module, example, path, options):
        raise NotImplementedError("onnx-int8 exports whole zoo models only")


class OnnxInt8Dynamic(OnnxInt8):
    name = "onnx-int8-dynamic"
    suffix = ".int8-dynamic.onnx"
    description = ("ONNX with onnxruntime dynamic int8 (opt-in: outputs depend on the batch's other images; "
                   "onnxruntime only), validated on agreement and accuracy")
    options = _GRAPH_OPTIONS + (
        ExportOption("int8_ops", "all", "quantize Conv+MatMul+Gemm (all) or only MatMul+Gemm (matmul)",
                     choices=tuple(INT8_OPS)),
    )
    quantization = "int8-dynamic"
    calibrates = False

    def export(self, model, path, options: ExportOptions):
        return export_onnx_int8_dynamic(model, path, **options.as_kwargs())

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_onnx_int8(model, path, images, mode="dynamic", reference=reference, tolerance=tolerance,
                                    batch_sizes=batch_sizes, targets=targets, **options.as_kwargs())
        return ValidationResult.from_report(report)


@hookimpl
def zoo_register_exporters(register):
    register(Onnx())
    register(OnnxInt8())
    register(OnnxInt8Dynamic())
