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
      after the resize/crop the metadata describes; the /255 scaling and mean/std run inside.
  "none": the graph takes float32 (N, 3, H, W), already scaled and normalized.
  H and W are fixed at the model's input size; the batch axis is dynamic.
Outputs: logits (N, K), probabilities (N, K, softmax), embedding (N, D, the pooled backbone
features; embedding=False leaves it out).
"""

from __future__ import annotations

import contextlib
import hashlib
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

from .errors import ExportValidationError, ZooError
from .io import write_json

DEFAULT_FORMATS = ("onnx", "torchscript")  # what "all" means
PREPROCESS_MODES = ("normalize", "none")
ARTIFACT_STEM = "model"
METADATA_VERSION = 1
INPUT_LAYOUTS = {
    "normalize": "NHWC uint8 RGB 0..255, resized and center-cropped to input_size (scaling and mean/std inside the graph)",
    "none": "NCHW float32 RGB, resized, center-cropped, scaled to 0..1 and normalized with mean/std",
}


# -- the deployable module --------------------------------------------------------------------------
def deploy_module(model, preprocess: str = "normalize", embedding: bool = True):
    """The ZooModel as one inference module: [uint8 NHWC -> normalized NCHW] -> backbone -> head,
    returning (logits, probabilities[, embedding]). Shares the model's parameters; eval mode."""
    import torch
    import torch.nn as nn

    if preprocess not in PREPROCESS_MODES:
        raise ZooError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    norm = model.meta.normalization

    class DeployModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model.backbone
            self.head = model.head
            self.bake = preprocess == "normalize"
            self.with_embedding = bool(embedding)
            self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            if self.bake:  # same float ops, same order as zoo.preprocess.normalize_uint8
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
    the batch axis is never specialized to 1)."""
    import torch

    c, h, w = model.meta.normalization.input_size
    g = torch.Generator().manual_seed(0)
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
    c, h, w = norm.input_size
    shape = ["batch", h, w, c] if preprocess == "normalize" else ["batch", c, h, w]
    return {
        "zoo_metadata_version": METADATA_VERSION,
        "format": fmt,
        "labels": list(meta.labels),
        "num_classes": len(meta.labels),
        "backbone": meta.backbone,
        "weights": meta.weights,
        "feature_dim": meta.feature_dim,
        "head": meta.head.to_dict(),
        "normalization": norm.to_dict(),
        "mean": list(norm.mean),
        "std": list(norm.std),
        "input_size": list(norm.input_size),
        "resize_size": norm.resize_size,
        "interpolation": norm.interpolation,
        "crop_mode": norm.crop_mode,
        "crop_pct": round(norm.crop_pct, 4),
        "preprocess": preprocess,
        "input_layout": "NHWC" if preprocess == "normalize" else "NCHW",
        "input_dtype": "uint8" if preprocess == "normalize" else "float32",
        "input_shape": shape,
        "input_description": INPUT_LAYOUTS[preprocess],
        "input_name": "image" if preprocess == "normalize" else "input",
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
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_formats(formats: str | Sequence[str], quantize: str | None) -> list[str]:
    names = [formats] if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            expanded = DEFAULT_FORMATS if part == "all" else (part,)
            out.extend(p for p in expanded if p and p not in out)
    if quantize:
        if quantize != "int8":
            raise ZooError(f"quantize must be 'int8' or None, got {quantize!r}")
        if "onnx" not in out:
            raise ZooError("quantize='int8' quantizes the ONNX export: include the 'onnx' format")
        if "onnx-int8" not in out:
            out.insert(out.index("onnx") + 1, "onnx-int8")
    if not out:
        raise ZooError("no export format given")
    return out


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
    opset: int | None = None,
    preprocess: str = "normalize",
    quantize: str | None = None,
    tolerance: float | None = None,
    images: Any = None,
    *,
    optimize: bool = False,
    embedding: bool = True,
    batch_sizes: Iterable[int] = (1, 3, 8),
    int8_agreement: float | None = None,
    int8_ops: str = "all",
    onnx_exporter: str = "auto",
    validate: bool = True,
    target: str | None = None,
    validate_target: bool = True,
    dynamic_size: bool = False,
    progress=None,
) -> dict[str, Any]:
    """Export a trained model (ZooModel, or a run directory written by `zoo train` /
    `zoo.model.save_model`) to each format and validate it fail-closed.

    formats: "all" (= onnx and torchscript), a name, or a list of names of registered exporters
        (`zoo plugins` lists them; third-party formats work the same way).
    out: destination folder (default: RUN/export for a run directory; required for a model).
    opset: ONNX opset (default zoo_onnx.DEFAULT_OPSET = 18).
    preprocess: "normalize" bakes uint8 NHWC -> normalized float into the graph; "none" doesn't.
    quantize: "int8" adds model.int8.onnx (onnxruntime dynamic quantization), validated with the
        int8 tolerance (top-1 agreement >= int8_agreement, default 0.9); int8_ops="all" quantizes
        Conv, MatMul and Gemm, "matmul" only MatMul and Gemm (for CNNs whose convs lose too much).
    tolerance: max |logit diff| vs eager PyTorch for fp32 artifacts (default 1e-4).
    images: validation images (a folder, files, or a uint8 NHWC array); default: scikit-image's
        sample photos topped up with deterministic synthetic images (8 in all).
    optimize: save ONNX Runtime's offline graph optimizations (basic level, standard ops only).
    validate=False skips validation (the report says so; the artifacts are marked unvalidated).
    target: "onnxruntime" (default), "openvino" or "opencv": the runtime the ONNX file is for; its
        graph is fitted to that runtime's profile and validated in it (zoo_onnx.targets).
        validate_target=False validates in ONNX Runtime instead and says so.
    dynamic_size: dynamic input height and width (ONNX), verified at a second size.

    Returns the report (also written to OUT/export-report.json). Raises ExportValidationError
    after all formats were tried if any failed; its `.report` holds the numbers.
    """
    model, run_dir = _load(run_or_model)
    was_training = model.training
    try:
        return _export(model, run_dir, formats, out, opset, preprocess, quantize, tolerance, images, optimize,
                       embedding, batch_sizes, int8_agreement, int8_ops, onnx_exporter, validate, progress,
                       dict(target=target, validate_target=validate_target, dynamic_size=dynamic_size))
    finally:
        model.train(was_training)  # exporting never leaves a model in training switched to eval


def _export(model, run_dir, formats, out, opset, preprocess, quantize, tolerance, images, optimize, embedding,
            batch_sizes, int8_agreement, int8_ops, onnx_exporter, validate, progress,
            deploy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from . import registry
    from .validation import Tolerance, eager_outputs, load_validation_images

    say = progress or (lambda msg: None)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if out is None:
        if run_dir is None:
            raise ZooError("export(model, ...) needs out=: where to write the artifacts")
        out = run_dir / "export"
    if preprocess not in PREPROCESS_MODES:
        raise ZooError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    names = resolve_formats(formats, quantize)
    reg = registry.exporters()
    specs = {name: reg.get(name) for name in names}  # unknown names fail before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tol = Tolerance(**{k: v for k, v in (("logits", tolerance), ("int8_agreement", int8_agreement)) if v is not None})
    model.eval()
    vimages = load_validation_images(images, model.meta.normalization, model.meta.labels)
    reference = eager_outputs(model, vimages.pixels) if validate else None
    report: dict[str, Any] = {
        "status": "running",
        "model": {"backbone": model.meta.backbone, "weights": model.meta.weights,
                  "labels": list(model.meta.labels), "run": str(run_dir) if run_dir else None},
        "out": str(out),
        "options": {"formats": names, "opset": opset, "preprocess": preprocess, "quantize": quantize,
                    "optimize": optimize, "embedding": embedding, "batch_sizes": list(batch_sizes), "int8_ops": int8_ops,
                    "onnx_exporter": onnx_exporter, "validate": validate, **(deploy or {})},
        "tolerance": tol.to_dict(),
        "images": vimages.to_dict(),
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
        if name == "onnx-int8" and "onnx" not in validated:
            entry.update(status="skipped", reason="the fp32 ONNX export it quantizes did not pass")
            failed.append(name)
            _remove_artifact(out, final)
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{ARTIFACT_STEM}.{name}.", suffix=".staging", dir=out))
        staged = staging / final.name
        options = dict(opset=opset, preprocess=preprocess, embedding=embedding, optimize=optimize,
                       onnx_exporter=onnx_exporter, artifacts=dict(validated))
        if name.startswith("onnx"):  # deployment targets are an ONNX notion
            options.update(deploy or {})
        if name == "onnx-int8":
            options["int8_ops"] = int8_ops
        t0 = time.perf_counter()
        try:
            say(f"{name}: exporting")
            with quiet():
                export_report = spec.export(model, staged, **options) or {}
            entry["export"] = _jsonable(export_report)
            entry["export_seconds"] = round(time.perf_counter() - t0, 2)
            if not staged.exists():
                raise ZooError(f"exporter {name!r} did not write {staged.name}")
            if validate and spec.validate is not None:
                say(f"{name}: validating against eager PyTorch at batch sizes {list(batch_sizes)}")
                t1 = time.perf_counter()
                try:
                    with quiet():
                        vrep = spec.validate(model, staged, vimages.pixels, reference=reference, tolerance=tol,
                                             batch_sizes=tuple(batch_sizes), targets=vimages.targets, **options)
                except ExportValidationError:
                    raise
                except Exception as exc:  # an artifact that cannot even be run fails, it is not an error
                    vrep = {"passed": False, "problems": [f"running the artifact failed: {type(exc).__name__}: {exc}"]}
                vrep = _jsonable(vrep or {"passed": False, "problems": ["validate() returned no report"]})
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
        sidecar.update(artifact=final.name, sha256=_sha256(staged), status=entry["status"],
                       validation=_summary(entry.get("validation")))
        write_json(staging / sidecar_name, _jsonable(sidecar))
        moved = []
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
            moved.append(item.name)
        shutil.rmtree(staging, ignore_errors=True)
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


def _summary(v: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not v:
        return None
    keys = ("passed", "kind", "max_abs_logit_diff", "max_abs_prob_diff", "top1_agreement", "min_embedding_cosine",
            "batch_sizes", "tolerance", "images", "accuracy", "dynamic_batch")
    return {k: v[k] for k in keys if k in v}


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
