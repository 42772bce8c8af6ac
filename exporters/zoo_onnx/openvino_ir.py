"""OpenVINO IR for `--target openvino`: the fitted ONNX graph converted with `ov.convert_model` and
saved with `ov.save_model(..., compress_to_fp16=False)` as model.xml/model.bin beside model.onnx,
the zoo metadata in the IR's runtime info, validated in OpenVINO the way a consumer calls it.

Precision. OpenVINO's CPU plugin picks its inference precision itself: bf16 on CPUs with
AVX512-BF16/AMX, f32 elsewhere; `compile_model(file, "CPU")` with no configuration is what a
consumer runs, so that is what is validated, and the precision it used is read back
(`compiled.get_property("INFERENCE_PRECISION_HINT")`) and recorded. At f32 the file is judged on
the fp32 tolerance. At a reduced precision (bf16, f16) it is judged by the reduced-precision rule
(`REDUCED_PRECISION_RULE`: the int8 gate -- top-1 agreement with eager fp32, and on labelled
images an accuracy drop within the int8 allowance) *and* also run with INFERENCE_PRECISION_HINT=f32
on the fp32 tolerance, so the numbers that `zoo predict` (which compiles at the recorded
precision, f32) gives are validated too.

The IR also carries `runtime_options/INFERENCE_PRECISION_HINT = f32` (OpenVINO's place for a
model's own runtime settings). Measured with openvino 2026.4: its CPU plugin applies some
runtime_options from the IR at `compile_model(path)` (KV_CACHE_PRECISION,
DYNAMIC_QUANTIZATION_GROUP_SIZE read back changed) but not INFERENCE_PRECISION_HINT (an invalid
value there is accepted silently, while the same value as a compile config is an error). So the
pin documents what was validated and is honoured where OpenVINO honours it; the validation never
relies on it -- it reads back what the runtime did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zoo.errors import ZooError

from . import signal_stack

IR_SUFFIX = ".xml"
RT_METADATA = ["zoo", "metadata"]
RT_PRECISION_PIN = ["runtime_options", "INFERENCE_PRECISION_HINT"]
VALIDATED_PRECISION = "f32"
REDUCED_PRECISION_RULE = ("OpenVINO at a reduced default precision (bf16/f16): judged by the int8 gate (top-1 "
                          "agreement with eager fp32 >= tolerance.int8_agreement; on labelled images an accuracy drop "
                          "<= tolerance.int8_accuracy_drop), and also run at f32 on the fp32 tolerance")
INSTALL_HINT = "pip install 'backbone-zoo[openvino]'"


def _openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise ZooError(f"OpenVINO IR needs openvino, which is not installed ({exc}): {INSTALL_HINT}") from exc
    return ov


def openvino_missing() -> str | None:
    """Why OpenVINO IR cannot be written here (None: openvino is installed)."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not installed ({exc}), so no OpenVINO IR was written: {INSTALL_HINT}"
    return None


def ir_path(onnx_path) -> Path:
    """Where `--target openvino` writes the IR for an ONNX file: model.onnx -> model.xml."""
    return Path(onnx_path).with_suffix(IR_SUFFIX)


def write_ir(onnx_path, xml_path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Convert the ONNX file to IR (weights kept fp32), with `metadata` and the precision pin in its
    runtime info. Returns the IR's metadata (format "openvino-ir", runtimes ["openvino"])."""
    ov = _openvino()
    meta = {**metadata, "format": "openvino-ir", "artifact": Path(xml_path).name, "converted_from": Path(onnx_path).name,
            "runtimes": ["openvino"], "openvino_precision": VALIDATED_PRECISION,
            "versions": {**dict(metadata.get("versions") or {}), "openvino": ov.__version__}}
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(meta), RT_METADATA)
    model.set_rt_info(VALIDATED_PRECISION, RT_PRECISION_PIN)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return meta


def read_ir_metadata(xml_path) -> dict[str, Any]:
    """The zoo metadata in an IR's runtime info ({} when absent)."""
    model = _openvino().Core().read_model(str(xml_path))
    if not model.has_rt_info(RT_METADATA):
        return {}
    value = model.get_rt_info(RT_METADATA)
    return json.loads(value.astype(str) if hasattr(value, "astype") else str(value))


def precision_of(compiled) -> str:
    """The inference precision a compiled model runs at ("f32", "bf16", "f16")."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.to_string() if hasattr(value, "to_string") else str(value)


def compile_for_consumer(path, config: dict[str, Any] | None = None):
    """compile_model(file, "CPU") as a consumer calls it (config None: no configuration at all). The
    thread's signal stack is put back afterwards (`signal_stack`: OpenVINO 2026.4 can leave it
    dangling, and the next Ctrl-C then crashes the process); compile OpenVINO models only here."""
    core = _openvino().Core()
    with signal_stack.kept():
        return core.compile_model(str(path), "CPU", config) if config else core.compile_model(str(path), "CPU")


def ir_runner(path, config: dict[str, Any] | None = None) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], str]:
    """(fn(batch) -> {output name: array}, precision used) for an IR or ONNX file in OpenVINO."""
    compiled = compile_for_consumer(path, config)
    names = [o.get_any_name() for o in compiled.outputs]
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        res = request.infer({0: np.ascontiguousarray(batch)})
        return {name: np.array(res[compiled.output(name)]) for name in names}

    return run, precision_of(compiled)


def judge_openvino(run_at: Callable[[dict[str, Any] | None], tuple[Any, str]], judge: Callable[..., dict[str, Any]]
                   ) -> dict[str, Any]:
    """The OpenVINO verdict at its defaults: `run_at(config) -> (runner, precision)`, `judge(run,
    kind) -> compare report`. f32 defaults: the fp32 tolerance. Reduced defaults: the reduced-
    precision rule at the defaults and the fp32 tolerance at f32, both must pass."""
    run, precision = run_at(None)
    if precision == "f32":
        return {**judge(run, "fp32"), "precision": precision, "precision_source": "compile_model defaults"}
    report = judge(run, "int8")
    pinned, pinned_precision = run_at({"INFERENCE_PRECISION_HINT": VALIDATED_PRECISION})
    at_f32 = judge(pinned, "fp32")
    problems = [f"OpenVINO at its default {precision}: {p}" for p in report["problems"]]
    problems += [f"OpenVINO at {pinned_precision}: {p}" for p in at_f32["problems"]]
    keys = ("passed", "max_abs_logit_diff", "max_abs_prob_diff", "top1_agreement", "min_embedding_cosine")
    return {**report, "passed": not problems, "problems": problems, "precision": precision,
            "precision_source": "compile_model defaults", "reduced_precision_rule": REDUCED_PRECISION_RULE,
            "at_f32": {k: at_f32[k] for k in keys if k in at_f32}}


def validate_ir(model, xml_path, images, *, reference, tolerance, batch_sizes, preprocess: str = "normalize",
                targets=None) -> dict[str, Any]:
    """The IR run in OpenVINO at its defaults on the validation images at each batch size and
    compared with eager PyTorch (`judge_openvino`); its metadata checked like an ONNX file's."""
    from zoo.validation import compare, eager_outputs, metadata_problems, model_inputs, run_in_batches

    reference = reference if reference is not None else eager_outputs(model, images)
    x = model_inputs(images, model.meta.normalization, preprocess)

    def judge(run, kind):
        return compare(reference, run_in_batches(run, x, batch_sizes), tolerance, kind=kind, targets=targets)

    try:
        report = judge_openvino(lambda config: ir_runner(xml_path, config), judge)
        meta = read_ir_metadata(xml_path)
        compiled = compile_for_consumer(xml_path)
    except ZooError as exc:
        return {"passed": False, "problems": [str(exc)], "artifact": Path(xml_path).name}
    except Exception as exc:  # noqa: BLE001 - an IR OpenVINO cannot load or run fails the validation
        return {"passed": False, "artifact": Path(xml_path).name,
                "problems": [f"OpenVINO cannot run {Path(xml_path).name}: {type(exc).__name__}: {str(exc)[:300]}"]}
    problems = list(report["problems"]) + metadata_problems(meta, model, preprocess)
    if meta.get("openvino_precision") != VALIDATED_PRECISION:
        problems.append(f"IR metadata openvino_precision is {meta.get('openvino_precision')!r}, not "
                        f"{VALIDATED_PRECISION!r}")
    dynamic_batch = compiled.inputs[0].get_partial_shape()[0].is_dynamic
    if not dynamic_batch:
        problems.append("the IR's input batch axis is fixed")
    import openvino as ov

    return {**report, "passed": not problems, "problems": problems, "artifact": Path(xml_path).name,
            "dynamic_batch": bool(dynamic_batch), "runtime": f"openvino {ov.__version__}"}


def load_ir_runner(path) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], dict[str, Any]]:
    """(run, metadata) for `zoo predict model.xml`: compiled at the precision the IR was validated
    at (its metadata's openvino_precision, f32), so the answers are the validated ones."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ZooError(f"{str(path)!r} is an OpenVINO IR and openvino is not installed: {INSTALL_HINT}") from exc
    meta = read_ir_metadata(path)
    if not meta:
        raise ZooError(f"{str(path)!r} carries no zoo metadata (not an IR written by `zoo export --target openvino`); "
                       "export the model again with `zoo export`")
    precision = meta.get("openvino_precision", VALIDATED_PRECISION)
    run, _ = ir_runner(path, {"INFERENCE_PRECISION_HINT": precision})
    return run, meta
