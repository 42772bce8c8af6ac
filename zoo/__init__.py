"""backbone-zoo: pretrained image backbones as pluggable feature extractors.

Attributes are imported lazily so `zoo --help` and the torch-free predictor stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "hookimpl": "zoo.plugin.hookspecs",
    "hookspec": "zoo.plugin.hookspecs",
    "BackboneProvider": "zoo.plugin.api",
    "BuiltBackbone": "zoo.plugin.api",
    "PretrainedHead": "zoo.plugin.api",
    "Exporter": "zoo.plugin.api",
    "ExportOption": "zoo.plugin.api",
    "ExportOptions": "zoo.plugin.api",
    "ValidationResult": "zoo.plugin.api",
    "BackboneSpec": "zoo.records",
    "LayerGroup": "zoo.records",
    "Normalization": "zoo.records",
    "WeightsInfo": "zoo.records",
    "BackboneInfo": "zoo.backbones",
    "create_backbone": "zoo.backbones",
    "get_info": "zoo.backbones",
    "get_normalization": "zoo.backbones",
    "list_models": "zoo.backbones",
    "auto_layer_groups": "zoo.layers",
    "ZooModel": "zoo.model",
    "build_model": "zoo.model",
    "pretrained_classifier": "zoo.model",
    "train": "zoo.training",
    "export": "zoo.exporting",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# subpackages reachable as attributes after a bare `import zoo` (e.g. `zoo.exporting.artifact_metadata`)
_SUBMODULES = ("exporting", "validation")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
