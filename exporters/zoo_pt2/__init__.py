"""The torch.export exporter (`.pt2`): the whole model as an ExportedProgram, the artifact current
PyTorch recommends now that `torch.jit` is deprecated. Batch is dynamic (`torch.export.Dim`).

Load it anywhere torch >= 2.6 is installed, without the zoo:

    extra = {"zoo_metadata.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    meta = json.loads(extra["zoo_metadata.json"])
    logits, probabilities, embedding = program.module()(batch)  # batch as meta["input_layout"]

`load()` below does the same with every tensor read by torch's weights-only unpickler: stock
`torch.export.load` retries a failed weights-only read with full unpickling, which would run
code from a tampered file. A sidecar model.pt2.json carries the same metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

from zoo import Exporter, ExportOptions, ValidationResult, hookimpl

METADATA_FILE = "zoo_metadata.json"
LABELS_FILE = "labels.txt"
MAX_BATCH = 4096
_env_lock = threading.Lock()


def export_pt2(model, path, *, preprocess: str = "normalize", embedding: bool = True, **_: Any) -> dict[str, Any]:
    import torch

    from zoo.exporting import artifact_metadata, deploy_module, example_input

    module = deploy_module(model, preprocess, embedding)
    example = example_input(model, preprocess, batch=2)  # batch 2: the batch axis is never specialized to 1
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    finally:
        model.eval()
    meta = artifact_metadata(model, "pt2", preprocess, embedding, method="torch.export.export (non-strict)",
                             extra_files=[METADATA_FILE, LABELS_FILE], max_batch=MAX_BATCH)
    extra = {METADATA_FILE: json.dumps(meta, indent=2), LABELS_FILE: "\n".join(model.meta.labels) + "\n"}
    torch.export.save(program, str(path), extra_files=extra)
    return {"metadata": meta, "method": meta["method"], "extra_files": sorted(extra)}


@contextlib.contextmanager
def _weights_only():
    """Force torch.load's weights-only unpickler for everything read inside (torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD on each call), so no fallback can unpickle code."""
    with _env_lock:
        before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load(path):
    """(callable module, metadata) from a .pt2 file, never unpickling code."""
    import torch

    from zoo.errors import ZooError

    extra = {METADATA_FILE: "", LABELS_FILE: ""}
    try:
        with _weights_only():
            program = torch.export.load(str(path), extra_files=extra)
    except pickle.UnpicklingError as exc:
        raise ZooError(f"{str(path)!r} holds pickled objects other than tensors, which are never unpickled (they can "
                       f"run code); re-export it with `zoo export -f pt2` ({str(exc).splitlines()[0][:120]})") from None
    raw = extra[METADATA_FILE]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return program.module(), (json.loads(raw) if raw else {})


def validate_pt2(model, path, images, *, reference=None, tolerance=None, batch_sizes=(1, 3, 8),
                 preprocess: str = "normalize", targets=None, **_: Any) -> dict[str, Any]:
    """Reload the file (weights-only) and compare it with eager PyTorch at each batch size."""
    import torch

    from zoo.validation import validate_torch_module

    module, meta = load(path)
    return validate_torch_module(module, meta, model, images, preprocess=preprocess, reference=reference,
                                 tolerance=tolerance, batch_sizes=batch_sizes, targets=targets,
                                 runtime=f"torch.export.load (torch {torch.__version__})")


class Pt2(Exporter):
    name = "pt2"
    suffix = ".pt2"
    description = "torch.export ExportedProgram (.pt2; dynamic batch; metadata as extra files)"
    requires = ("torch",)
    in_all = True

    def export(self, model, path, options: ExportOptions):
        return export_pt2(model, path, **options.as_kwargs())

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        report = validate_pt2(model, path, images, reference=reference, tolerance=tolerance,
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
    register(Pt2())
