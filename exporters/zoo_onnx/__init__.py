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
field of `zoo.exporting.artifact_metadata` under "zoo.<field>" (JSON-encoded values) plus the whole
dict as "zoo.metadata"; `zoo.predict` reads it back with onnxruntime alone.

optimize=True saves ONNX Runtime's *basic* offline graph optimizations (constant folding,
Conv+BatchNorm/Add/Mul fusion, redundant node elimination): standard ONNX ops only, so the file
stays portable and checkable. Extended and layout optimizations are hardware-specific; ONNX
Runtime applies them when a session loads the file (the predictor enables them all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo import Exporter, ExportOption, ExportOptions, ValidationResult, hookimpl
from zoo.exporting import distribution_versions
from .graph import (DEFAULT_OPSET, MAX_BATCH, ONNX_OPSETS, MIN_DYNAMO_OPSET, _export_graph, _export_with_fallback,  # noqa: F401
                    batch_axis_is_dynamic, dynamo_unavailable_reason, export_module, export_onnx, graph_opset)
from .int8 import (  # noqa: F401
    DEFAULT_RECIPE,
    INT8_MODES,
    INT8_OPS,
    INT8_RECIPES,
    INT8_RUNTIMES,
    export_onnx_int8,
    validate_onnx_int8,
)
from .metadata import METADATA_PREFIX, read_header, read_metadata, rewrite_metadata, set_metadata  # noqa: F401


# -- validation -------------------------------------------------------------------------------------
def session(path, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate_onnx(model, path, images, *, target: str | None = None, validate_target: bool = True,
                  metadata: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run the file in its target's runtime (ONNX Runtime with all graph optimizations on, as
    deployed, by default) on the validation images at each batch size and compare with eager
    PyTorch. validate_target=False (--no-validate-target) checks it in ONNX Runtime instead and
    says that the target itself was not tried. An fp32 file is then run in every other runtime
    its metadata lists, at that runtime's defaults (`_validate_listed_runtimes`), and the IR that
    `--target openvino` writes beside it is validated too (openvino_ir.validate_ir)."""
    from . import targets as tg

    target = tg.profile(target).name
    ran_in = target if validate_target else "onnxruntime"
    report = tg.validate_in_target(model, path, images, target=ran_in, **options)
    if ran_in != target:
        report["target_validation"] = f"skipped (--no-validate-target): validated in onnxruntime, not in {target}"
    if options.get("kind", "fp32") == "fp32" and options.get("preprocess", "normalize") != "full":
        _validate_listed_runtimes(model, path, images, report, ran_in, metadata, options)
    from .openvino_ir import ir_path, validate_ir

    xml = ir_path(path)
    if target == "openvino" and validate_target and not xml.exists() and options.get("kind", "fp32") == "fp32":
        report["passed"] = False
        report["problems"] = [*report["problems"], f"the OpenVINO IR {xml.name} was not written"]
    if ran_in != target and not xml.exists():
        report["target_validation"] += f"; no OpenVINO IR ({xml.name}) was written" if target == "openvino" else ""
    if target == "openvino" and xml.exists() and options.get("kind", "fp32") == "fp32":
        ir = validate_ir(model, xml, images, reference=options.get("reference"), tolerance=options.get("tolerance"),
                         batch_sizes=options.get("batch_sizes", (1, 3, 8)),
                         preprocess=options.get("preprocess", "normalize"), targets=options.get("targets"))
        report["openvino_ir"] = ir
        if ir["passed"]:  # said beside the table, whose row names model.onnx only
            report["notes"] = [*report.get("notes", []),
                               f"OpenVINO IR {xml.name} (beside {Path(path).name}) passed ({ir.get('precision')} at "
                               f"{ir.get('precision_source')}, max|dlogit| {ir['max_abs_logit_diff']:.2e})"]
        else:
            report["passed"] = False
            report["problems"] = [*report["problems"], *(f"{xml.name}: {p}" for p in ir["problems"])]
    names = [o.name for o in read_header(path).graph.output]
    meta = read_metadata(path)
    if "embedding" in meta.get("outputs", []) and "embedding" not in names:
        report["problems"] = list(report["problems"]) + ["metadata lists an embedding output the graph does not have"]
        report["passed"] = False
    if "top1_agreement" in report:
        report["agreement_delta"] = 1.0 - report["top1_agreement"]
    return report


def _validate_listed_runtimes(model, path, images, report: dict[str, Any], validated_in: str,
                              metadata: dict[str, Any] | None, options: dict[str, Any]) -> None:
    """Every runtime the file's metadata lists besides the one it was validated in is run at its
    own defaults (one pass over the validation images, at the largest batch size: the batch axis
    itself was checked in the target) and judged on the same criteria. The file's `runtimes` (and
    `metadata`, the sidecar's dict) keep only those that passed; `validated_in` records each one's
    version and precision; OpenCV's claim is the major version validated."""
    from . import targets as tg

    meta = read_metadata(path)
    listed = list(meta.get("runtimes") or [])
    checks: dict[str, Any] = {}
    if report.get("passed"):
        checks[validated_in] = _runtime_claim(validated_in, report)
    batch = (max(options.get("batch_sizes") or (8,)),)
    for runtime in [r for r in listed if r != validated_in]:
        try:
            rep = tg.validate_in_target(model, path, images, target=runtime, **{**options, "batch_sizes": batch})
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the file is not listed
            rep = {"passed": False, "problems": [f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]}
        if rep.get("passed"):
            checks[runtime] = _runtime_claim(runtime, rep)
        else:
            report.setdefault("notes", []).append(f"not listed in the file's runtimes (failed there at its defaults): "
                                                  f"{runtime}: {'; '.join(rep.get('problems') or [])[:300]}")
    kept = [r for r in listed if r in checks or r == validated_in]
    report["runtimes"] = kept
    report["validated_in"] = checks
    if kept == listed and meta.get("validated_in") == checks:
        return
    meta.update(runtimes=kept, validated_in=checks)
    rewrite_metadata(path, meta)
    if metadata is not None:  # the same dict the core writes the sidecar from
        metadata.update(runtimes=kept, validated_in=checks)


def _runtime_claim(runtime: str, report: dict[str, Any]) -> dict[str, Any]:
    """What a listed runtime was validated as: its version, the precision it ran at, and the version
    range the listing claims (OpenCV: the major version validated, its DNN importer differs between
    4.x and 5.x)."""
    from . import targets as tg

    version = tg.runtime_version(runtime).split(" ", 1)[1]
    claim: dict[str, Any] = {"version": version, "precision": report.get("precision", "f32"),
                             "rule": report.get("reduced_precision_rule") or "fp32 tolerance"}
    if runtime == "opencv" and version.split(".")[0].isdigit():
        major = int(version.split(".")[0])
        claim["claims"] = f"opencv>={major},<{major + 1}"
    return claim


# -- the providers -------------------------------------------------------------------------------------
_GRAPH_OPTIONS = (
    ExportOption("opset", DEFAULT_OPSET, f"ONNX opset (< {MIN_DYNAMO_OPSET} uses the TorchScript-based exporter)",
                 type=int,
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

    #: other artifact endings this exporter reads (`zoo predict`): the IR `--target openvino` writes
    reads = (".xml",)

    def __init__(self) -> None:
        # export's metadata dict by staged path: the core writes the sidecar from it after
        # validate(), which drops the runtimes where the file did not pass
        self._metadata: dict[str, dict[str, Any]] = {}

    def export(self, model, path, options: ExportOptions):
        report = export_onnx(model, path, **options.as_kwargs())
        self._metadata[str(path)] = report["metadata"]
        return report

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_onnx(model, path, images, reference=reference, tolerance=tolerance, batch_sizes=batch_sizes,
                               targets=targets, metadata=self._metadata.pop(str(path), None), **options.as_kwargs())
        return ValidationResult.from_report(report)

    def read_metadata(self, artifact):
        if str(artifact).endswith(".xml"):
            from .openvino_ir import read_ir_metadata

            return read_ir_metadata(artifact)
        return read_metadata(artifact)

    def load_runner(self, path):
        """`zoo predict model.xml`: the OpenVINO IR (ONNX files run in the core's onnxruntime path)."""
        from .openvino_ir import load_ir_runner

        return load_ir_runner(path)

    def export_module(self, module, example, path, options: ExportOptions):
        return export_module(module, example, path, **options.options)

    def versions(self):
        return distribution_versions(("onnx", "onnxruntime", "onnxscript"))

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
        ExportOption("int8_recipe", DEFAULT_RECIPE, "static int8 recipe: " + "; ".join(
            f"{k}: {v}" for k, v in INT8_RECIPES.items()), choices=tuple(INT8_RECIPES)),
    )
    in_all = False
    builds_on = "onnx"
    quantization = "int8"
    # quantizing the in-graph resize (and judging int8 on the full criteria) is not built yet
    preprocess_modes = ("normalize", "none")

    def __init__(self) -> None:
        # export's metadata dict by staged path: the core writes the sidecar from it after
        # validate(), which drops the runtimes where the int8 gate failed
        self._metadata: dict[str, dict[str, Any]] = {}

    def export(self, model, path, options: ExportOptions):
        report = export_onnx_int8(model, path, **options.as_kwargs())
        self._metadata[str(path)] = report["metadata"]
        return report

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_onnx_int8(model, path, images, metadata=self._metadata.pop(str(path), None),
                                    reference=reference, tolerance=tolerance,
                                    batch_sizes=batch_sizes, targets=targets, **options.as_kwargs())
        return ValidationResult.from_report(report)

    def export_module(self, module, example, path, options):
        raise NotImplementedError("onnx-int8 exports whole zoo models only")

    def versions(self):  # the quantizer too (NNCF for the default recipe)
        return {**super().versions(), **distribution_versions(("nncf",))}

    def self_check(self, probe: bool = True):
        return None  # the "onnx" format's self-check covers the same runtime


@hookimpl
def zoo_register_exporters(register):
    register(Onnx())
    register(OnnxInt8())


@hookimpl
def zoo_register_engines(register):
    from .engine import OnnxRuntimeEngine

    register(OnnxRuntimeEngine())
