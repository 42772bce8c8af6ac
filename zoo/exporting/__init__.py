"""`zoo.export(...)` (this package's `export`): the whole model (frozen backbone + head) to deployable, self-describing,
validated artifacts, through the exporter plugins.

    zoo.export("runs/flowers", formats="all")                     # ONNX + TorchScript, validated
    zoo.export(model, formats="onnx", out="dist", quantize="int8")  # + dynamic-int8 ONNX

Every artifact is written into a staging folder inside `out`, validated fail-closed against eager
PyTorch (`zoo.validation`), and only then moved into place. An artifact that fails is deleted,
together with any earlier file of that name in `out` (so nothing stale looks good);
`export-report.json` in `out` records the numbers either way, and ExportValidationError
(CLI exit code 3) is raised once every format has been tried.

Artifact layout in `out` (stem "model"):
  model.onnx + model.onnx.json              ONNX, fp32
  model.int8.onnx + model.int8.onnx.json    ONNX, dynamic int8 (quantize="int8")
  model.torchscript.pt + .json              TorchScript, frozen (metadata also inside, extra files)
  export-report.json                        what was exported, and every validation number

Inputs (`preprocess`):
  "normalize" (default): the graph takes RGB uint8 (N, H, W, 3), i.e. `np.asarray(pil_image)`
      after the resize/crop the metadata's "resize" recipe states exactly (Pillow, antialiased);
      the /255 scaling and mean/std run inside.
  "none": the graph takes float32 (N, 3, H, W), already scaled and normalized.
  For these two, H and W are fixed at the model's input size; the batch axis is dynamic.
  "full": the graph takes the decoded RGB image as it is, uint8 (N, H, W, 3) with H and W any
      size (at least 1): one image at a time (N = 1), or N images that all have the same size.
      The resize, center crop, scaling and mean/std run inside (`zoo.preprocess_module`), matching
      the reference preprocessing to within 1 uint8 level on a few pixels; validated on photos of
      different sizes against eager PyTorch on the reference preprocessing.
Outputs: logits (N, K), probabilities (N, K, softmax), embedding (N, D, the pooled backbone
features; embedding=False leaves it out).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from .artifact import (ARTIFACT_STEM, INPUT_LAYOUTS, INPUT_NAMES, METADATA_VERSION, PREPROCESS_MODES,
                       artifact_metadata, bare_module_to_onnx, check_preprocess, deploy_module, distribution_versions,
                       example_input,
                       output_names, quiet, versions)
from .plan import check_requirements, exporter_options, resolve_formats
from .run import verdict

__all__ = ["ARTIFACT_STEM", "INPUT_LAYOUTS", "INPUT_NAMES", "METADATA_VERSION", "PREPROCESS_MODES",
           "artifact_metadata", "bare_module_to_onnx", "check_preprocess", "check_requirements", "deploy_module",
           "distribution_versions",
           "example_input", "export", "exporter_options", "output_names", "quiet", "resolve_formats", "verdict",
           "versions"]


def export(
    run_or_model: Any,
    formats: str | Sequence[str] = "all",
    out: str | os.PathLike | None = None,
    preprocess: str = "normalize",
    quantize: str | None = None,
    tolerance: float | None = None,
    images: Any = None,
    *,
    embedding: bool = True,
    batch_sizes: Iterable[int] = (1, 3, 8),
    int8_agreement: float | None = None,
    validate: bool = True,
    strict: bool = False,
    progress=None,
    step_budget: float | None = None,
    options: Mapping[str, Any] | None = None,
    **exporter_options: Any,
) -> dict[str, Any]:
    """Export a trained model (ZooModel, or a run directory written by `zoo train` /
    `zoo.model.save_model`) to each format and validate it fail-closed.

    formats: "all" (every registered format that declares `in_all`: ONNX and TorchScript with
        the built-ins), a name, or a list of names of registered exporters (`zoo plugins` lists
        them; third-party formats work the same way).
    out: destination folder (default: RUN/export for a run directory; required for a model).
    preprocess: "normalize" bakes uint8 NHWC -> normalized float into the graph; "none" doesn't;
        "full" also bakes the resize and center crop (uint8 NHWC at any size; formats that
        declare it in `preprocess_modes`: ONNX for onnxruntime, TorchScript), validated on images
        of different sizes (`zoo.validation.compare_full`).
    quantize: e.g. "int8": adds each chosen format's quantized variant (`onnx` -> `onnx-int8`,
        onnxruntime dynamic quantization), validated with the int8 tolerance (top-1 agreement
        >= int8_agreement, default 0.9).
    tolerance: the fp32 bound |logit diff| <= tolerance x (1 + max|eager logit| of the batch)
        (default 1e-4; zoo.validation.Tolerance).
    images: validation images (a folder, files, or a uint8 NHWC array); default: scikit-image's
        sample photos topped up with deterministic synthetic images (8 in all).
    validate=False skips validation (the report says so; the artifacts are marked unvalidated).
    strict=True refuses unreadable `images` files up front (default: they are listed in the
        report's images.skipped and left out).
    step_budget: seconds each step (the reference outputs, each format's export, each format's
        validation) may run before it is stopped with StepTimeout naming the step (exit 2; nothing
        of that format put in place). Default: $ZOO_EXPORT_STEP_BUDGET, else 900 s + 60 s per
        million parameters (`zoo.exporting.budget`).
    options / **exporter_options: the exporters' own options by name, e.g. opset=17,
        onnx_exporter="legacy", optimize=True, int8_ops="matmul" for the ONNX exporters
        (`zoo plugins --json` lists each exporter's options). An option no chosen format
        accepts is an error.

    Returns the report (also written to OUT/export-report.json). Raises ExportValidationError
    after all formats were tried if any failed; its `.report` holds the numbers.
    """
    from ..options import ExportConfig
    from .plan import _load
    from .run import run_export

    ExportConfig(formats=formats, out=None if out is None else os.fspath(out), preprocess=preprocess,
                 quantize=quantize, tolerance=tolerance, int8_agreement=int8_agreement, images=images,
                 embedding=embedding, strict=strict, step_budget=step_budget)  # checks the common options; each exporter parses its own
    model, run_dir = _load(run_or_model)
    given = {**(options or {}), **exporter_options}
    was_training = model.training
    try:
        return run_export(model, run_dir, formats, out, preprocess, quantize, tolerance, images, embedding,
                          batch_sizes, int8_agreement, validate, progress, given, strict, step_budget)
    finally:
        model.train(was_training)  # exporting never leaves a model in training switched to eval
