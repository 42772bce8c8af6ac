"""The ONNX graph: torch's exporters with the loud dynamo -> TorchScript-based fallback
(`_export_with_fallback`), the whole-model fp32 export fitted to a target (`export_onnx`), the
bare-module export `zoo bench` and the onnxruntime engine use (`export_module`), and the graph
checks (`graph_opset`, `batch_axis_is_dynamic`)."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from .metadata import read_header, set_metadata

ONNX_OPSETS = (7, 23)  # what torch.onnx can write (torch.onnx._constants: ONNX_MIN/MAX_OPSET)
DEFAULT_OPSET = 18
MIN_DYNAMO_OPSET = 18
MAX_BATCH = 1 << 16


@contextlib.contextmanager
def out_of_place(module):
    """Trace with in-place activations switched to their out-of-place form, then put them back.

    Why: torch's dynamo exporter decomposes every in-place op (ReLU6(inplace=True) -> hardtanh_)
    through functionalization, re-deriving the symbolic batch size each time; on lite0 (33 such
    modules) `zoo export`'s ONNX step went from 15.4 to 8.5 s without it, and the graph comes out
    the same op for op, with bit-identical outputs (the ONNX graph has no in-place ops either way).
    The module is the caller's own (DeployModule shares the model's layers), hence the restore;
    the onnxruntime engine's background export works on a copy. Only a module's own `inplace` flag (the
    torch.nn / timm convention) is switched; the validation against eager still judges the result."""
    switched = [m for m in module.modules() if getattr(m, "inplace", None) is True]
    for m in switched:
        m.inplace = False
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.inplace = True


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
        with out_of_place(module):
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


def _ort_optimize(path: Path) -> None:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        before = read_header(path)  # its metadata and doc string
        after = onnx.load(str(optimized))
        used = {n.domain for n in after.graph.node} | {""}  # ORT declares all its domains; keep the used ones
        kept = [o for o in after.opset_import if o.domain in used]
        del after.opset_import[:]
        after.opset_import.extend(kept)
        del after.metadata_props[:]
        after.metadata_props.extend(before.metadata_props)
        after.doc_string = before.doc_string
        onnx.save(after, str(path))


def size_dependent_padding(model) -> list[str]:
    """Layers whose padding is computed from the input size at run time (TensorFlow-style "SAME"
    padding: timm's Conv2dSame / MaxPool2dSame / AvgPool2dSame, as in tf_efficientnet_lite*)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Same")})


def _dynamic_size_exporter(model, onnx_exporter: str) -> tuple[str, dict[str, str] | None]:
    """The exporter for --dynamic-size: torch's dynamo exporter does not finish on size-dependent
    padding traced with symbolic height and width (lite0: still tracing after 886 s, no message),
    so for such a backbone "auto" takes the TorchScript-based exporter (loudly: stderr and the
    report's fallback) and "dynamo" is refused before any tracing, with the reason."""
    from zoo.errors import ZooError

    layers = size_dependent_padding(model)
    if not layers or onnx_exporter == "legacy":
        return onnx_exporter, None
    reason = (f"{model.meta.backbone} pads by the input size at run time ({', '.join(layers)}: TensorFlow-style "
              "SAME padding), which the dynamo exporter cannot trace with symbolic height and width")
    if onnx_exporter == "dynamo":
        raise ZooError(f"--dynamic-size with --onnx-exporter dynamo: {reason}; use --onnx-exporter auto or legacy "
                       "(the TorchScript-based exporter handles it), or drop --dynamic-size")
    print(_fallback_notice(reason), file=sys.stderr, flush=True)
    return "legacy", {"from": "dynamo", "to": "legacy", "reason": reason}


def export_onnx(model, path, *, opset: int | None = None, preprocess: str = "normalize", embedding: bool = True,
                optimize: bool = False, onnx_exporter: str = "auto", target: str | None = None,
                dynamic_size: bool = False, openvino_ir: bool = True, **_: Any) -> dict[str, Any]:
    """Write the whole model (preprocessing if baked, backbone, head, softmax) to `path`, fitted
    to the deployment target's profile (see targets.py): at a fixed input size every
    shape-dependent subgraph is folded to constants; the result must pass the target's checks.
    For the openvino target (unless openvino_ir=False) OpenVINO IR is written beside it too
    (model.xml/.bin, openvino_ir.py)."""
    import onnx
    import torch

    from zoo.errors import ZooError
    from zoo.exporting import artifact_metadata, deploy_module, example_input, output_names

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
    padding_fallback = None
    if dynamic_size:
        onnx_exporter, padding_fallback = _dynamic_size_exporter(model, onnx_exporter)
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
        fallback = fallback or padding_fallback
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
    if target == "openvino" and openvino_ir:
        from .openvino_ir import ir_path, openvino_missing, write_ir

        missing = openvino_missing()
        xml = ir_path(path)
        # without openvino the IR cannot be converted; the target validation then fails (or, with
        # --no-validate-target, the report says no IR was written)
        report["openvino_ir"] = ({"written": False, "reason": missing} if missing else
                                 {"written": True, "path": str(xml), "weights": str(xml.with_suffix(".bin")),
                                  "metadata": write_ir(path, xml, meta)})
    if not report["dynamic_batch"]:
        raise ZooError(f"the exported graph has a fixed batch axis ({path.name}); it must be dynamic")
    return report


def export_module(module, example, path, *, opset: int | None = None, onnx_exporter: str = "auto",
                  **_: Any) -> dict[str, Any]:
    """A bare module (float NCHW "input" -> "output", dynamic batch) for `zoo bench`."""
    import onnx

    opset = int(opset or DEFAULT_OPSET)
    proto, chosen, fallback = _export_with_fallback(module.eval(), example, opset, "input", ["output"], onnx_exporter)
    onnx.save(proto, str(path))
    return {"opset": graph_opset(proto), "exporter": chosen, **({"fallback": fallback} if fallback else {})}
