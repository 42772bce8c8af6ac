"""backbone-zoo: pretrained image backbones as pluggable feature extractors.

Attributes are imported lazily so `zoo --help` and the torch-free predictor stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "hookimpl": "zoo.hookspecs",
    "hookspec": "zoo.hookspecs",
    "BackboneProvider": "zoo.api",
    "BuiltBackbone": "zoo.api",
    "PretrainedHead": "zoo.api",
    "Exporter": "zoo.api",
    "ExportOption": "zoo.api",
    "ExportOptions": "zoo.api",
    "ValidationResult": "zoo.api",
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
    "select": "zoo.selection",
    "train": "zoo.training",
    "export": "zoo.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
