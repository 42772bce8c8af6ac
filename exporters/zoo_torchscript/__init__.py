"""The TorchScript exporter: the whole model traced (batch 2, so the batch axis stays symbolic),
frozen with `torch.jit.freeze` for inference, and saved with its metadata as extra files.

Load it anywhere torch is installed, without the zoo:

    extra = {"zoo_metadata.json": ""}
    m = torch.jit.load("model.torchscript.pt", _extra_files=extra)
    meta = json.loads(extra["zoo_metadata.json"])   # bytes or str, json takes both
    logits, probabilities, embedding = m(batch)   # batch as meta["input_layout"] / ["input_dtype"]

Extra files: "zoo_metadata.json" (everything `zoo.exporting.artifact_metadata` gives: labels,
mean/std, input size, resize/crop, interpolation, backbone and weights, versions, preprocessing
mode, input layout) and "labels.txt" (one class per line).

torch 2.14 deprecates TorchScript (`torch.jit.trace/freeze/save/load` warn FutureWarning "Please switch
to `torch.export`"): for current PyTorch prefer the `.pt2` format (`zoo export -f pt2`). This
exporter keeps working for consumers that need TorchScript (C++ libtorch, older torch), and
silences exactly that deprecation notice around its own calls (`_jit_deprecation_muted`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

from zoo import Exporter, ExportOptions, ValidationResult, hookimpl

METADATA_FILE = "zoo_metadata.json"
LABELS_FILE = "labels.txt"


@contextlib.contextmanager
def _jit_deprecation_muted():
    """Mute torch's "`torch.jit.X` is deprecated / not supported in Python 3.14+" FutureWarning, and
    only it: the user asked for TorchScript by name, the docs already point to `.pt2`, and a warning
    per trace/save/load on every export, validation and `zoo predict` tells them nothing new. Any
    other warning (tracer warnings included) still reaches the caller's filters."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is (deprecated|not supported)",
                                category=FutureWarning)
        yield


def export_torchscript(model, path, *, preprocess: str = "normalize", embedding: bool = True,
                       **_: Any) -> dict[str, Any]:
    import torch

    from zoo.exporting import artifact_metadata, deploy_module, example_input

    path = Path(path)
    module = deploy_module(model, preprocess, embedding)
    example = example_input(model, preprocess, batch=2)
    try:
        with _jit_deprecation_muted():
            with torch.no_grad():
                traced = torch.jit.trace(module, (example,), check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
    finally:
        model.eval()
    meta = artifact_metadata(model, "torchscript", preprocess, embedding, method="torch.jit.trace + torch.jit.freeze",
                             extra_files=[METADATA_FILE, LABELS_FILE])
    extra = {METADATA_FILE: json.dumps(meta, indent=2), LABELS_FILE: "\n".join(model.meta.labels) + "\n"}
    with _jit_deprecation_muted():
        torch.jit.save(frozen, str(path), _extra_files=extra)
    return {"metadata": meta, "method": meta["method"], "extra_files": sorted(extra)}


def load(path):
    """(module, metadata) with plain torch.jit.load."""
    import torch

    extra = {METADATA_FILE: "", LABELS_FILE: ""}
    with _jit_deprecation_muted():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[METADATA_FILE]
    raw = raw.decode() if isinstance(raw, bytes) else raw  # torch hands extra files back as bytes
    return module, (json.loads(raw) if raw else {})


def validate_torchscript(model, path, images, *, reference=None, tolerance=None, batch_sizes=(1, 3, 8),
                         preprocess: str = "normalize", targets=None, **_: Any) -> dict[str, Any]:
    """Reload the file with torch.jit.load and compare it with eager PyTorch at each batch size."""
    import torch

    from zoo.validation import validate_torch_module

    module, meta = load(path)
    return validate_torch_module(module, meta, model, images, preprocess=preprocess, reference=reference,
                                 tolerance=tolerance, batch_sizes=batch_sizes, targets=targets,
                                 runtime=f"torch.jit.load (torch {torch.__version__})")


class TorchScript(Exporter):
    name = "torchscript"
    suffix = ".torchscript.pt"
    description = "TorchScript (traced, torch.jit.freeze'd; metadata as extra files)"
    requires = ("torch",)
    in_all = True
    preprocess_modes = ("normalize", "none", "full")

    def export(self, model, path, options: ExportOptions):
        return export_torchscript(model, path, **options.as_kwargs())

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_torchscript(model, path, images, reference=reference, tolerance=tolerance,
                                      batch_sizes=batch_sizes, targets=targets, **options.as_kwargs())
        return ValidationResult.from_report(report)

    def read_metadata(self, artifact):
        return load(artifact)[1]

    def load_runner(self, path):
        """(run, metadata) for `zoo predict`: run maps a prepared numpy batch to {output: array}."""
        from zoo.predict import torch_runner

        module, meta = load(path)
        return torch_runner(module, meta.get("outputs") or ["logits", "probabilities", "embedding"]), meta


@hookimpl
def zoo_register_exporters(register):
    register(TorchScript())
