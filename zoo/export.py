"""`zoo.export(...)`: the whole model (frozen backbone + head) to deployable, self-describing,
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

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .plugin.api import ExportOptions
from .errors import ExportValidationError, ZooError
from .io import file_sha256, write_json

PREPROCESS_MODES = ("normalize", "none", "full")
ARTIFACT_STEM = "model"
METADATA_VERSION = 1
INPUT_LAYOUTS = {
    "normalize": "NHWC uint8 RGB 0..255, resized and center-cropped to input_size (scaling and mean/std inside the graph)",
    "none": "NCHW float32 RGB, resized, center-cropped, scaled to 0..1 and normalized with mean/std",
    "full": "NHWC uint8 RGB 0..255 at any size, the decoded image as it is: (1, H, W, 3) for one image, or "
            "(N, H, W, 3) for N images of the same size (resize, center crop, scaling and mean/std inside the graph)",
}
INPUT_NAMES = {"normalize": "image", "none": "input", "full": "image"}


def check_preprocess(model, preprocess: str) -> None:
    """ZooError unless the model can be exported with this preprocessing mode."""
    from .preprocess import in_graph_problem

    if preprocess not in PREPROCESS_MODES:
        raise ZooError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    problem = in_graph_problem(model.meta.normalization) if preprocess == "full" else None
    if problem:
        raise ZooError(f"--preprocess full: {model.meta.backbone}'s eval preprocessing cannot run inside the graph: "
                       f"{problem}; export with --preprocess normalize and resize as the metadata's \"resize\" says")


# -- the deployable module --------------------------------------------------------------------------
def deploy_module(model, preprocess: str = "normalize", embedding: bool = True):
    """The ZooModel as one inference module: [uint8 NHWC -> normalized NCHW] -> backbone -> head,
    returning (logits, probabilities[, embedding]). Shares the model's parameters; eval mode."""
    import torch
    import torch.nn as nn

    check_preprocess(model, preprocess)
    norm = model.meta.normalization

    class DeployModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model.backbone
            self.head = model.head
            self.bake = preprocess == "normalize"
            self.full = None
            if preprocess == "full":  # resize + crop + scale + normalize, scripted: any input size
                from .preprocess_module import scripted

                self.full = scripted(norm)
            self.with_embedding = bool(embedding)
            self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            if self.full is not None:
                x = self.full(x)
            elif self.bake:  # same float ops, same order as zoo.preprocess.normalize_uint8
                x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
                x = (x - self.mean) / self.std
            emb = self.backbone(x)
            logits = self.head(emb)
            probs = torch.softmax(logits, dim=-1)
            if self.with_embedding:
                return logits, probs, emb
            return logits, probs

    return DeployModule().eval()


def example_input(model, preprocess: str, batch: int = 2):
    """A deterministic example batch in the artifact's input format (batch >= 2 for tracing, so
    the batch axis is never specialized to 1; "full": an odd size, larger than the input size)."""
    import torch

    c, h, w = model.meta.normalization.input_size
    g = torch.Generator().manual_seed(0)
    if preprocess == "full":
        return torch.randint(0, 256, (batch, h + 37, w + 61, c), dtype=torch.uint8, generator=g)
    if preprocess == "normalize":
        return torch.randint(0, 256, (batch, h, w, c), dtype=torch.uint8, generator=g)
    return torch.randn(batch, c, h, w, generator=g)


def output_names(embedding: bool = True) -> list[str]:
    return ["logits", "probabilities"] + (["embedding"] if embedding else [])


def versions() -> dict[str, str]:
    """zoo and framework versions, for the artifacts' metadata."""
    from importlib import metadata as md

    from . import __version__

    out = {"zoo": __version__}
    for dist in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def artifact_metadata(model, fmt: str, preprocess: str = "normalize", embedding: bool = True,
                      **extra: Any) -> dict[str, Any]:
    """What makes an artifact self-describing: labels, the full preprocessing recipe, the input
    contract, where the backbone came from, and the versions that produced it."""
    meta = model.meta
    norm = meta.normalization
    from .preprocess import resize_recipe

    c, h, w = norm.input_size
    shape = {"normalize": ["batch", h, w, c], "none": ["batch", c, h, w],
             "full": ["batch", "height", "width", c]}[preprocess]
    return {
        "zoo_metadata_version": METADATA_VERSION,
        "format": fmt,
        "labels": list(meta.labels),
        "num_classes": len(meta.labels),
        "backbone": meta.backbone,
        "weights": meta.weights,
        "feature_dim": meta.feature_dim,
        "head": {**meta.head.to_dict(), "in_features": meta.feature_dim, "out_features": len(meta.labels),
                 **({"source": meta.extra["head_source"]} if meta.extra.get("head_source") else {})},
        "normalization": norm.to_dict(),
        "mean": list(norm.mean),
        "std": list(norm.std),
        "input_size": list(norm.input_size),
        "resize_size": norm.resize_size,
        "interpolation": norm.interpolation,
        "crop_mode": norm.crop_mode,
        "crop_pct": round(norm.crop_pct, 4),
        "resize": resize_recipe(norm, in_graph=preprocess == "full"),
        "preprocess": preprocess,
        "input_layout": "NCHW" if preprocess == "none" else "NHWC",
        "input_dtype": "float32" if preprocess == "none" else "uint8",
        "input_shape": shape,
        "input_description": INPUT_LAYOUTS[preprocess],
        "input_name": INPUT_NAMES[preprocess],
        "outputs": output_names(embedding),
        "versions": versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


@contextlib.contextmanager
def quiet():
    """Silence the exporters' warnings and console chatter (tracer warnings, onnxscript progress)."""
    import io
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # onnxruntime.quantization logs advice and whole graph inputs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                yield buf
    finally:
        logging.disable(previous)


# -- orchestration -----------------------------------------------------------------------------------
def bare_module_to_onnx(module, example, path) -> dict[str, Any]:
    """Export a bare module (float NCHW "input" -> "output", dynamic batch) through the "onnx"
    exporter plugin with its default options, so every ONNX file the zoo writes (`zoo bench`, the
    onnxruntime extraction engine) takes one graph path: same opset, same loud dynamo fallback.
    Returns the exporter's report ("exporter", "opset", "fallback"). Raises UnknownExporterError
    where no "onnx" exporter is loaded; export failures propagate."""
    from .plugin import registry

    exporter = registry.exporters().get("onnx")
    defaults = {o.name: o.default for o in exporter.options}
    return exporter.export_module(module, example, path, ExportOptions(options=defaults))


def resolve_formats(formats: str | Sequence[str], quantize: str | None, reg=None) -> list[str]:
    """Format names in the order they run: "all" expanded to every exporter that declares
    `in_all`, `quantize` adding each chosen format's quantized variant, and a derived format
    after the one it builds on."""
    from .plugin import registry

    reg = reg or registry.exporters()
    names = [formats] if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            expanded = [n for n in reg.names() if reg.get(n).in_all] if part == "all" else [part]
            out.extend(p for p in expanded if p and p not in out)
    if quantize:
        variants = [(n, reg.variant(n, quantize)) for n in out if n in reg.names()]
        found = [(base, v) for base, v in variants if v is not None]
        if not found:
            raise ZooError(f"quantize={quantize!r}: none of the formats {', '.join(out) or '-'} has a {quantize} "
                           "variant (`zoo plugins` lists the exporters)")
        for base, variant in found:
            if variant not in out:
                out.insert(out.index(base) + 1, variant)
    if not out:
        raise ZooError("no export format given")
    return out


def exporter_options(exporters: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each exporter's own options: the ones it declares, parsed, defaults filled in. An option
    no chosen exporter declares is an error naming it, never silently dropped."""
    known = {o.name for e in exporters.values() for o in e.options}
    unknown = sorted(set(given) - known)
    if unknown:
        offered = "; ".join(f"{n}: {', '.join(o.name for o in e.options) or 'none'}" for n, e in exporters.items())
        raise ZooError(f"export option(s) {', '.join(map(repr, unknown))} are not accepted by the chosen formats "
                       f"({offered})")
    out: dict[str, dict[str, Any]] = {}
    for name, exporter in exporters.items():
        opts: dict[str, Any] = {}
        for o in exporter.options:
            try:
                opts[o.name] = o.parse(given[o.name]) if o.name in given else o.default
            except (TypeError, ValueError) as exc:
                raise ZooError(f"export format {name!r}: {exc}") from exc
        out[name] = opts
    return out


def check_requirements(name: str, exporter) -> None:
    """ZooError naming the distribution and the pip command when an exporter's `requires` is missing."""
    from importlib import metadata as md

    for dist in exporter.requires:
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            raise ZooError(f"export format {name!r} requires {dist!r}, which is not installed: pip install {dist}") from None


def _load(run_or_model):
    from .model import ZooModel, load_model

    if isinstance(run_or_model, ZooModel):
        return run_or_model, None
    if isinstance(run_or_model, (str, os.PathLike)):
        return load_model(run_or_model), Path(run_or_model)
    raise ZooError(f"export takes a ZooModel or a run directory, got {type(run_or_model).__name__}")


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
    progress=None,
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
    tolerance: max |logit diff| vs eager PyTorch for fp32 artifacts (default 1e-4).
    images: validation images (a folder, files, or a uint8 NHWC array); default: scikit-image's
        sample photos topped up with deterministic synthetic images (8 in all).
    validate=False skips validation (the report says so; the artifacts are marked unvalidated).
    options / **exporter_options: the exporters' own options by name, e.g. opset=17,
        onnx_exporter="legacy", optimize=True, int8_ops="matmul" for the ONNX exporters
        (`zoo plugins --json` lists each exporter's options). An option no chosen format
        accepts is an error.

    Returns the report (also written to OUT/export-report.json). Raises ExportValidationError
    after all formats were tried if any failed; its `.report` holds the numbers.
    """
    from .options import ExportConfig

    ExportConfig(formats=formats, out=None if out is None else os.fspath(out), preprocess=preprocess,
                 quantize=quantize, tolerance=tolerance, int8_agreement=int8_agreement, images=images,
                 embedding=embedding)  # checks the common options; each exporter parses its own
    model, run_dir = _load(run_or_model)
    given = {**(options or {}), **exporter_options}
    was_training = model.training
    try:
        return _export(model, run_dir, formats, out, preprocess, quantize, tolerance, images, embedding,
                       batch_sizes, int8_agreement, validate, progress, given)
    finally:
        model.train(was_training)  # exporting never leaves a model in training switched to eval


def _export(model, run_dir, formats, out, preprocess, quantize, tolerance, images, embedding,
            batch_sizes, int8_agreement, validate, progress, given) -> dict[str, Any]:
    from .plugin import registry
    from .validation import Tolerance, eager_outputs, full_validation_images

    # -- everything checked before anything is written -------------------------------------------------
    say = progress or (lambda msg: None)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if out is None:
        if run_dir is None:
            raise ZooError("export(model, ...) needs out=: where to write the artifacts")
        out = run_dir / "export"
    check_preprocess(model, preprocess)
    reg = registry.exporters()
    names = resolve_formats(formats, quantize, reg)
    specs = {name: reg.get(name) for name in names}  # unknown names fail before any work
    for name, spec in specs.items():
        check_requirements(name, spec)
        if preprocess not in spec.preprocess_modes:
            raise ZooError(f"export format {name!r} does not write --preprocess {preprocess} artifacts (it writes "
                           f"{', '.join(spec.preprocess_modes)}); choose another format or preprocessing mode")
    own_options = exporter_options(specs, given)
    out = _output_folder(Path(out))

    # -- the reference every artifact is compared with ---------------------------------------------------
    tol = Tolerance(**{k: v for k, v in (("logits", tolerance), ("int8_agreement", int8_agreement)) if v is not None})
    model.eval()
    full = preprocess == "full"
    vimages = _validation_images(images, model, run_dir, say, raw=full)
    if full:  # the artifact gets the images at their own sizes; the reference, Pillow's resize of them
        vimages = full_validation_images(vimages, model.meta.normalization)
    reference = eager_outputs(model, vimages.pixels) if validate else None
    calibration = (_calibration_images(model, run_dir, vimages, say)
                   if any(getattr(spec, "quantization", None) for spec in specs.values()) else None)
    report: dict[str, Any] = {
        "status": "running",
        "model": {"backbone": model.meta.backbone, "weights": model.meta.weights,
                  "labels": list(model.meta.labels), "run": str(run_dir) if run_dir else None},
        "out": str(out),
        "options": {"formats": names, "preprocess": preprocess, "quantize": quantize, "embedding": embedding,
                    "batch_sizes": list(batch_sizes), "validate": validate, "exporters": own_options},
        "tolerance": tol.to_dict(),
        "images": vimages.to_dict(),
        **({"calibration": {"source": calibration[1], "count": int(len(calibration[0]))}} if calibration else {}),
        "versions": versions(),
        "artifacts": {},
    }
    validated: dict[str, str] = {}  # format -> final path, for exporters that build on another (int8)
    failed: list[str] = []
    for name in names:
        spec = specs[name]
        entry: dict[str, Any] = {"format": name, "plugin": reg.owner(name)}
        report["artifacts"][name] = entry
        final = out / f"{ARTIFACT_STEM}{spec.suffix}"
        if spec.builds_on in names and spec.builds_on not in validated:
            entry.update(status="skipped", reason=f"the {spec.builds_on!r} export it builds on did not pass")
            failed.append(name)
            _remove_artifact(out, final)
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{ARTIFACT_STEM}.{name}.", suffix=".staging", dir=out))
        staged = staging / final.name
        options = ExportOptions(preprocess=preprocess, embedding=embedding, artifacts=dict(validated),
                                options=own_options[name],
                                calibration=calibration[0] if calibration and spec.quantization else None)
        t0 = time.perf_counter()
        try:
            say(f"{name}: exporting")
            with quiet():
                export_report = spec.export(model, str(staged), options) or {}
            entry["export"] = _jsonable(export_report)
            if export_report.get("fallback"):  # e.g. ONNX: dynamo exporter missing -> TorchScript-based
                report.setdefault("fallbacks", {})[name] = _jsonable(export_report["fallback"])
            entry["export_seconds"] = round(time.perf_counter() - t0, 2)
            if not staged.exists():
                raise ZooError(f"exporter {name!r} did not write {staged.name}")
            if validate and _implements(spec, "validate"):
                say(f"{name}: validating against eager PyTorch at batch sizes {list(batch_sizes)}")
                t1 = time.perf_counter()
                try:
                    with quiet():
                        result = spec.validate(model, str(staged), vimages.raw if full else vimages.pixels, options,
                                               reference, tol, tuple(batch_sizes), vimages.targets)
                    vrep = verdict(name, result).to_dict()
                except ExportValidationError:
                    raise
                except Exception as exc:  # an artifact that cannot even be run fails, it is not an error
                    vrep = {"passed": False, "problems": [f"running the artifact failed: {type(exc).__name__}: {exc}"]}
                vrep = _jsonable(vrep)
                vrep["seconds"] = round(time.perf_counter() - t1, 2)
                entry["validation"] = vrep
                entry["status"] = "passed" if vrep.get("passed") else "failed"
            else:
                entry["validation"] = None
                entry["status"] = "unvalidated"
                entry["reason"] = ("validate=False" if not validate
                                   else f"exporter {name!r} provides no validate(); the artifact is not checked")
        except ExportValidationError as exc:
            entry["status"] = "failed"
            entry["validation"] = _jsonable(getattr(exc, "report", None) or {"passed": False, "problems": [str(exc)]})
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
            report["status"] = "error"
            _write_report(out, report)
            raise
        if entry["status"] == "failed":
            failed.append(name)
            shutil.rmtree(staging, ignore_errors=True)  # the bad artifact goes, never into place
            _remove_artifact(out, final)  # nor does an older one stay looking current
            entry["path"] = None
            say(f"{name}: FAILED validation: {'; '.join(entry['validation'].get('problems', []))}")
            continue
        sidecar_name = final.name + ".json"
        sidecar = dict(export_report.get("metadata") or {})
        sidecar.update(artifact=final.name, sha256=file_sha256(staged), status=entry["status"],
                       validation=_summary(entry.get("validation")))
        write_json(staging / sidecar_name, _jsonable(sidecar))
        moved = []
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
            moved.append(item.name)
        shutil.rmtree(staging, ignore_errors=True)
        entry["export"] = _rebased(entry["export"], str(staging), str(out))  # no staging path leaks out
        entry.update(path=str(final), files=moved, size_bytes=final.stat().st_size, sha256=sidecar["sha256"])
        validated[name] = str(final)
        say(f"{name}: {entry['status']} -> {final}")
    report["status"] = "failed" if failed else "passed"
    _write_report(out, report)
    if failed:
        err = ExportValidationError(
            "export failed validation for " + ", ".join(failed) + "; nothing was left in place for "
            + ("it" if len(failed) == 1 else "them") + f"; numbers in {out / 'export-report.json'}: "
            + " | ".join(f"{n}: " + "; ".join((report['artifacts'][n].get('validation') or {}).get('problems')
                                                 or [report['artifacts'][n].get('reason', '')]) for n in failed))
        err.report = report
        raise err
    return report


RUN_VALIDATION_IMAGES = 64  # enough to see accuracy move, few enough to export in seconds
CALIBRATION_IMAGES = 128


def _spread(n: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(n) (every class of a sorted split gets some)."""
    return list(range(n)) if n <= limit else [int(i * n / limit) for i in range(limit)]


def _pixels(samples, indices, norm, raw: list | None = None):
    """Reference-preprocessed uint8 NHWC pixels of `samples` at `indices`; with a `raw` list, the
    decoded images at their own sizes are appended to it too (decoded once)."""
    import numpy as np

    from .preprocess import resize_crop, to_uint8_hwc

    out = []
    for i in indices:
        img = samples.load(i)
        if raw is not None:
            raw.append(to_uint8_hwc(img))
        out.append(to_uint8_hwc(resize_crop(img, norm)))
    return np.stack(out)


def _validation_images(images, model, run_dir, say, raw: bool = False):
    """The images every artifact is checked on: those given; else the run's own validation split
    (labelled, so the report has accuracy); else scikit-image's photos. A run whose split cannot
    be read is said, never passed over quietly. raw=True keeps them at their own sizes too
    (`ValidationImages.raw`, for --preprocess full)."""
    from .errors import DataError
    from .runs import RunDirError, recorded_validation
    from .validation import ValidationImages, load_validation_images

    norm, labels = model.meta.normalization, model.meta.labels
    if images is not None or run_dir is None:
        return load_validation_images(images, norm, labels, raw=raw)
    decoded: list | None = [] if raw else None
    try:
        samples, described = recorded_validation(run_dir, labels)
        picked = _spread(len(samples), RUN_VALIDATION_IMAGES)
        if not picked:
            raise RunDirError("its validation split is empty")
        pixels = _pixels(samples, picked, norm, decoded)
    except (RunDirError, DataError, OSError) as exc:
        fallback = load_validation_images(None, norm, labels, raw=raw)
        reason = str(exc).split(";")[0]
        say(f"validation images: the run's own split is not usable ({reason}); using {fallback.source}")
        return dataclasses.replace(fallback, source=f"{fallback.source} (the run's validation split is not usable: {reason})")
    return ValidationImages(pixels, [samples.describe(i) for i in picked],
                            f"{len(picked)} of {len(samples)} images of {described}",
                            [int(samples.labels[i]) for i in picked], decoded)


def _calibration_images(model, run_dir, vimages, say):
    """(uint8 NHWC pixels, source) for static quantization: a spread of the run's training images
    (the training sample it recorded in validation.json; for older runs its data folder, less the
    validation files; the embedded sample's training half), else the validation images. Only
    pixels are used, never labels."""
    from .data import embedded_samples
    from .errors import DataError
    from .preprocess import ImageDecodeError
    from .runs import RunDirError, read_config, recorded_calibration, recorded_validation

    norm = model.meta.normalization
    if run_dir is not None:
        try:  # the training sample the run recorded (works for --csv runs and moved data folders too)
            samples, described = recorded_calibration(run_dir, model.meta.labels)
            picked = _spread(len(samples), CALIBRATION_IMAGES)
            return _pixels(samples, picked, norm), f"{len(picked)} of {described} ({len(samples)} recorded)"
        except RunDirError:
            pass  # recorded by an older zoo, or not at all: the data folder below
        except (DataError, ImageDecodeError, OSError) as exc:  # files moved or damaged since training
            say(f"calibration images: the run's recorded training sample is not usable ({str(exc).split(';')[0]})")
        try:
            cfg = read_config(run_dir)
        except Exception:  # noqa: BLE001 - an older run without config.json: calibrate on validation images
            cfg = {}
        data = cfg.get("data")
        if data and os.path.isdir(data):
            from .data import Samples
            from .preprocess import list_images

            try:  # every validation file the run recorded, not just the ones sampled for validation here
                held_out = {os.path.abspath(p) for p in recorded_validation(run_dir, model.meta.labels)[0].items
                            if isinstance(p, (str, os.PathLike))}
            except RunDirError:
                held_out = set()
            held_out |= {os.path.abspath(p) for p in vimages.names if os.path.exists(p)}
            files = [p for p in list_images(data) if os.path.abspath(p) not in held_out]
            if files:
                samples = Samples(files, [0] * len(files), ("?",))
                picked = _spread(len(files), CALIBRATION_IMAGES)
                return _pixels(samples, picked, norm), f"{len(picked)} training images from {data}"
        elif not data and not cfg.get("csv") and cfg:
            train = embedded_samples()[0]
            picked = _spread(len(train), CALIBRATION_IMAGES)
            return _pixels(train, picked, norm), f"{len(picked)} images of the embedded sample's training half"
    return vimages.pixels, f"the {len(vimages.pixels)} validation images ({vimages.source})"


def _output_folder(out: Path) -> Path:
    """`out`, created if needed and checked writable, before any export work."""
    if out.exists() and not out.is_dir():
        raise ZooError(f"--out {str(out)!r} is a file; pass a folder for the artifacts")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"--out {str(out)!r} cannot be created ({exc.strerror or exc}); choose a writable folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ZooError(f"--out {str(out)!r} is not writable; choose a writable folder")
    return out


def _implements(exporter, method: str) -> bool:
    from .plugin.api import Exporter

    return getattr(type(exporter), method) is not getattr(Exporter, method)


def verdict(name: str, result: Any):
    """An exporter's validate() answer as a ValidationResult; anything without a boolean `passed`
    fails, saying so (a missing verdict never counts as a pass)."""
    from .plugin.api import ValidationResult

    if isinstance(result, ValidationResult) and isinstance(result.passed, bool):
        return result
    if isinstance(result, Mapping) and isinstance(result.get("passed"), bool):
        return ValidationResult.from_report(result)
    got = (f"{type(result).__name__} with passed={result.passed!r}" if isinstance(result, ValidationResult)
           else f"{type(result).__name__} without a boolean 'passed'")
    return ValidationResult(passed=False, problems=[
        f"exporter {name!r}: validate() returned {got}; it must return zoo.ValidationResult(passed=True/False, "
        "problems=[...]) so the artifact can be judged"])


def _summary(v: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not v:
        return None
    keys = ("passed", "kind", "max_abs_logit_diff", "mean_abs_logit_diff", "max_abs_prob_diff", "top1_agreement",
            "min_embedding_cosine", "max_batch_size_diff", "batch_sizes", "tolerance", "images", "accuracy",
            "dynamic_batch")
    return {k: v[k] for k in keys if k in v}


def _rebased(obj: Any, old: str, new: str) -> Any:
    """An exporter's report with the paths it gave into its staging folder pointed at the final place."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj.startswith(old) else obj
    if isinstance(obj, dict):
        return {k: _rebased(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebased(v, old, new) for v in obj]
    return obj


def _remove_artifact(out: Path, final: Path) -> None:
    for p in (final, final.with_name(final.name + ".json")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _write_report(out: Path, report: Mapping[str, Any]) -> None:
    write_json(out / "export-report.json", _jsonable(report))


def _jsonable(obj: Any) -> Any:
    """Numbers and containers only (numpy scalars -> Python), so reports always serialize."""
    import math

    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# `zoo.export` is both this module (once imported, Python binds the submodule on the package)
# and the function: make the module callable so `zoo.export(...)` works either way.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
