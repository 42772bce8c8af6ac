"""The exporter toolkit: what every exporter (built-in or third-party) builds its artifact from.

`deploy_module` (the ZooModel as one inference module, preprocessing baked as asked),
`example_input` (a tracing batch in the artifact's input format), `output_names`,
`artifact_metadata` (labels, preprocessing, input contract, provenance, versions) and `versions`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Iterable

from ..plugin.api import ExportOptions
from ..errors import ZooError

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
    from ..preprocess import in_graph_problem

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
                from ..preprocess_module import scripted

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


def distribution_versions(dists: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution in `dists` that is installed (package metadata only)."""
    from importlib import metadata as md

    out = {}
    for dist in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def versions(*formats: str) -> dict[str, str]:
    """The zoo's and the model's frameworks' versions, plus what each export format in `formats`
    says its artifacts are made and checked with (`Exporter.versions`), for the metadata."""
    from .. import __version__

    out = {"zoo": __version__, **distribution_versions(("torch", "torchvision", "timm"))}
    if formats:
        from ..plugin import registry

        reg = registry.exporters()
        for name in formats:
            if name in reg.names():
                out.update(reg.get(name).versions())
    return out


def artifact_metadata(model, fmt: str, preprocess: str = "normalize", embedding: bool = True,
                      **extra: Any) -> dict[str, Any]:
    """What makes an artifact self-describing: labels, the full preprocessing recipe, the input
    contract, where the backbone came from, and the versions that produced it."""
    meta = model.meta
    norm = meta.normalization
    from ..preprocess import resize_recipe

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
        "versions": versions(fmt),
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


def bare_module_to_onnx(module, example, path) -> dict[str, Any]:
    """Export a bare module (float NCHW "input" -> "output", dynamic batch) through the "onnx"
    exporter plugin with its default options, so every ONNX file the zoo writes (`zoo bench`, the
    onnxruntime extraction engine) takes one graph path: same opset, same loud dynamo fallback.
    Returns the exporter's report ("exporter", "opset", "fallback"). Raises UnknownExporterError
    where no "onnx" exporter is loaded; export failures propagate."""
    from ..plugin import registry

    exporter = registry.exporters().get("onnx")
    defaults = {o.name: o.default for o in exporter.options}
    return exporter.export_module(module, example, path, ExportOptions(options=defaults))
