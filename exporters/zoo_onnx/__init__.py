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
import sys
import tempfile
from pathlib import Path
from typing import Any

from zoo import Exporter, ExportOption, ExportOptions, ValidationResult, hookimpl
from zoo.options import ONNX_OPSETS

from .int8 import INT8_MODES, INT8_OPS, INT8_RUNTIMES, export_onnx_int8, validate_onnx_int8  # noqa: F401

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

    def self_check(self, probe: bool = True):
        from .selfcheck import self_check

        return self_check(probe)


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

    def self_check(self, probe: bool = True):
        return None  # the "onnx" format's self-check covers the same runtime


@hookimpl
def zoo_register_exporters(register):
    register(Onnx())
    register(OnnxInt8())
