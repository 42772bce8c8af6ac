"""Fail-closed validation of exported artifacts against eager PyTorch.

The contract every exporter's `validate(model, path, images, **options)` follows:

* `images` is a uint8 array (N, H, W, 3) of RGB images already resized and cropped to the
  model's input size by the reference preprocessing (`zoo.preprocess.resize_crop`). An artifact
  with baked preprocessing is fed these bytes as they are; one without is fed
  `zoo.preprocess.normalize_uint8(images, norm)` (float32 NCHW). Eager PyTorch always gets the
  latter, so the comparison covers the baked scaling and mean/std too.
* `options["reference"]` holds eager PyTorch's outputs on the same images (`eager_outputs`),
  `options["batch_sizes"]` the batch sizes to run the artifact at (default 1, 3 and 8: the
  images are fed in chunks of each size, so a batch axis frozen to one size is caught), and
  `options["tolerance"]` a `Tolerance`.
* It returns `compare(...)`'s report (a JSON-ready dict whose "passed" is the verdict), with
  anything of its own added. `zoo.export` refuses an artifact whose report did not pass.

Metrics, over every batch size: max (and mean) absolute logit difference, the largest logit
difference between the artifact's own outputs at different batch sizes (`max_batch_size_diff`:
an output must not depend on the rest of its batch), max absolute probability
difference, top-1 agreement with eager PyTorch, minimum embedding cosine similarity, and, when
the validation images come with labels (class-named folders), accuracy and its delta.

Pass criteria:
  fp32 (the default): max |logit diff| <= tolerance.logits (1e-4), embedding cosine >=
    tolerance.cosine (0.9999), and every top-1 disagreement is a near-tie (the reference's top-2
    margin <= 2 x tolerance.logits).
  int8 (lossy by design): with labelled validation images (the run's own validation split),
    accuracy may drop by at most tolerance.int8_accuracy_drop (0.01, one point); without labels,
    top-1 agreement >= tolerance.int8_agreement (0.9). Agreement, logit differences and the
    embedding cosine are always reported; a mean embedding cosine under tolerance.int8_cosine
    (0.9) adds a note that the embedding output is approximate. (With labels, agreement does not
    gate: on a 70%-accurate head, int8 flips near-ties both ways at unchanged accuracy.)

`--preprocess full` artifacts take the decoded images as they are, so they are validated on
`full_validation_images`: the validation photos at their own, different sizes plus synthetic
odd sizes (portrait, landscape, and two of one size run as one batch), each run alone (batch 1)
and every same-size group also as one batch (`run_full`). The reference stays eager PyTorch on
the reference preprocessing (Pillow). The in-graph resize differs from Pillow's by at most one
uint8 level on a few pixels (float vs fixed-point arithmetic), so `compare_full` bounds:
  max |probability diff| <= tolerance.full_probabilities (0.01), embedding cosine >=
  tolerance.full_cosine (0.999), and the top-5 set (top-k for k = min(5, classes)) equal to
  the reference's on every real photo (synthetic images: reported, not required, as their
  predictions are near-uniform); logit differences and top-1 agreement are reported.

This module imports numpy and Pillow at the top; torch only inside `eager_outputs`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ExportValidationError
from .compare import (DEFAULT_BATCH_SIZES, Tolerance, compare, compare_full, eager_outputs, model_inputs,
                      run_full, run_in_batches)
from .images import (FULL_SYNTHETIC_SIZES, MAX_FULL_IMAGES, MAX_IMAGES, NUM_DEFAULT_IMAGES, SKIMAGE_SAMPLES,
                     SizedImages, ValidationImages, full_validation_images, load_validation_images, sample_photos,
                     synthetic_image)

__all__ = ["DEFAULT_BATCH_SIZES", "FULL_SYNTHETIC_SIZES", "MAX_FULL_IMAGES", "MAX_IMAGES", "NUM_DEFAULT_IMAGES",
           "SKIMAGE_SAMPLES", "SizedImages", "Tolerance", "ValidationImages", "compare", "compare_full",
           "eager_outputs", "full_validation_images", "load_validation_images", "metadata_problems", "model_inputs",
           "require_passed", "run_full", "run_in_batches", "sample_photos", "synthetic_image",
           "validate_torch_module"]


def validate_torch_module(module, meta: Mapping[str, Any], model, images, *, preprocess: str = "normalize",
                          reference=None, tolerance=None, batch_sizes=(1, 3, 8), targets=None,
                          runtime: str = "") -> dict[str, Any]:
    """The check every torch-loaded artifact gets (TorchScript, .pt2, a plugin's own): run the
    reloaded `module` at each batch size (or, for preprocess="full", on the images at their own
    sizes), compare with eager PyTorch, and check the metadata it carries."""
    import torch

    names = meta.get("outputs") or ["logits", "probabilities", "embedding"]

    def run(batch):
        with torch.inference_mode():
            out = module(torch.from_numpy(batch))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().numpy() for n, o in zip(names, out)}

    if preprocess == "full":  # images at their own sizes, one at a time and in same-size batches
        report = compare_full(reference, run_full(run, images), tolerance, targets, getattr(images, "names", None))
    else:
        reference = reference if reference is not None else eager_outputs(model, images)
        x = model_inputs(images, model.meta.normalization, preprocess)
        report = compare(reference, run_in_batches(run, x, batch_sizes), tolerance, targets=targets)
    problems = metadata_problems(meta, model, preprocess)
    if problems:
        report["problems"] = list(report["problems"]) + problems
        report["passed"] = False
    report["runtime"] = runtime
    return report


def metadata_problems(meta: dict[str, Any], model, preprocess: str) -> list[str]:
    """What in the artifact's self-description disagrees with the model it claims to be."""
    norm = model.meta.normalization
    want = {"labels": list(model.meta.labels), "mean": list(norm.mean), "std": list(norm.std),
            "input_size": list(norm.input_size), "resize_size": norm.resize_size,
            "interpolation": norm.interpolation, "crop_mode": norm.crop_mode, "preprocess": preprocess,
            "backbone": model.meta.backbone, "weights": model.meta.weights}
    if not meta:
        return ["the artifact carries no zoo metadata"]
    return [f"metadata {k}={meta.get(k)!r} but the model has {v!r}" for k, v in want.items() if meta.get(k) != v]


def require_passed(report: Mapping[str, Any], what: str) -> None:
    """Raise ExportValidationError (exit code 3) unless the report passed."""
    if not report.get("passed"):
        err = ExportValidationError(f"{what} failed validation against eager PyTorch: "
                                    + "; ".join(report.get("problems") or ["no verdict"]))
        err.report = dict(report)
        raise err
