"""backbone-zoo: pretrained image backbones as pluggable feature extractors.

Attributes are imported lazily so `zoo --help` and the torch-free predictor stay light; type
checkers see them through the TYPE_CHECKING imports below (and py.typed), so `zoo.BackboneProvider`
is the real class to a plugin author's mypy or pyright, not Any.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    "ExtractionEngine": "zoo.plugin.api",
    "PreparedEngine": "zoo.plugin.api",
    "EngineRejected": "zoo.plugin.api",
    "SelfCheck": "zoo.plugin.api",
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
    "export": "zoo.exporting",
}

if TYPE_CHECKING:  # what type checkers see: the real names (re-exported: `X as X`), not __getattr__'s Any
    from .backbones import BackboneInfo as BackboneInfo
    from .backbones import create_backbone as create_backbone
    from .backbones import get_info as get_info
    from .backbones import get_normalization as get_normalization
    from .backbones import list_models as list_models
    from .exporting import export as export
    from .layers import auto_layer_groups as auto_layer_groups
    from .model import build_model as build_model
    from .model import pretrained_classifier as pretrained_classifier
    from .model import ZooModel as ZooModel
    from .plugin.api import BackboneProvider as BackboneProvider
    from .plugin.api import BuiltBackbone as BuiltBackbone
    from .plugin.api import EngineRejected as EngineRejected
    from .plugin.api import Exporter as Exporter
    from .plugin.api import ExportOption as ExportOption
    from .plugin.api import ExportOptions as ExportOptions
    from .plugin.api import ExtractionEngine as ExtractionEngine
    from .plugin.api import PreparedEngine as PreparedEngine
    from .plugin.api import PretrainedHead as PretrainedHead
    from .plugin.api import SelfCheck as SelfCheck
    from .plugin.api import ValidationResult as ValidationResult
    from .plugin.hookspecs import hookimpl as hookimpl
    from .plugin.hookspecs import hookspec as hookspec
    from .records import BackboneSpec as BackboneSpec
    from .records import LayerGroup as LayerGroup
    from .records import Normalization as Normalization
    from .records import WeightsInfo as WeightsInfo
    from .selection import select as select
    from .training import train as train

__all__ = sorted(_EXPORTS) + ["__version__"]


# subpackages reachable as attributes after a bare `import zoo` (e.g. `zoo.exporting.artifact_metadata`)
_SUBMODULES = ("exporting", "validation")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
