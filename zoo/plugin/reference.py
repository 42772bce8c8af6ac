"""The plugin reference, generated from the live definitions (`zoo plugins --reference`).

docs/plugins.md carries the same text; a test keeps the two equal. Besides the hooks, providers and
records it documents every helper the guide points an author to (HELPERS), with its signature.
Those live above this floor (validation, export, testing), so they are named here as strings and
imported only when the reference is generated: the plugin boundary keeps no import edge upward.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import MISSING, fields, is_dataclass
from typing import Any


from .. import records
from . import hookspecs
from .api import (BackboneProvider, BuiltBackbone, Exporter, ExportOption, ExportOptions, ExtractionEngine,
                  PreparedEngine, PretrainedHead, SelfCheck, ValidationResult)


# Every helper docs/plugins.md names, by where it lives (module: names), in the order of the guide.
HELPERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zoo.backbones", ("offline_weights_error",)),
    ("zoo.layers", ("auto_layer_groups", "groups_from_modules", "check_layer_groups")),
    ("zoo.exporting", ("artifact_metadata", "deploy_module", "distribution_versions")),
    ("zoo.validation", ("Tolerance", "model_inputs", "run_in_batches", "compare", "run_full", "compare_full")),
    ("zoo.testing", ("check_backbones", "check_backbone", "check_pretrained_head", "check_exporter", "tiny_model",
                     "ConformanceError")),
)


def _signature(fn: Any) -> str:
    """`(name: type = default, ...) -> type`: annotations without their quotes, defaults as repr."""
    sig = inspect.signature(fn)
    parts = []
    for p in sig.parameters.values():
        text = p.name if p.kind is not p.VAR_POSITIONAL and p.kind is not p.VAR_KEYWORD else \
            ("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    out = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty:
        out += f" -> {_annotation(sig.return_annotation)}"
    return out


def _annotation(annotation: Any) -> str:
    return (annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)).replace("'", "")


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _class_section(cls: type) -> list[str]:
    out = [f"### `zoo.{cls.__name__}`", "", _doc(cls), ""]
    abstract: frozenset[str] = getattr(cls, "__abstractmethods__", frozenset())
    attrs = [(n, v) for n, v in vars(cls).items() if not n.startswith("_") and not callable(v)
             and not isinstance(v, (classmethod, staticmethod, property))]
    if attrs:
        out += ["| attribute | default |", "| --- | --- |"]
        out += [f"| `{n}` | `{v!r}` |" for n, v in attrs]
        out.append("")
    for n, v in vars(cls).items():
        if n.startswith("_") or not inspect.isfunction(v):
            continue
        tag = "**required**" if n in abstract else "optional"
        sig = _signature(v)
        out += [f"- `{n}{sig}` ({tag})", ""]
        out += ["  " + line if line else "" for line in _doc(v).splitlines()] + [""]
    return out


def _dataclass_section(cls: type, title: str = "") -> list[str]:
    out = [f"### `{title or 'zoo.' + cls.__name__}`", "", _doc(cls), "", "| field | type | default |",
           "| --- | --- | --- |"]
    for f in fields(cls):
        if f.default is not MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = "**required**"
        out.append(f"| `{f.name}` | `{str(f.type).replace('|', 'or')}` | {default} |")
    return out + [""]


def reference_markdown() -> str:
    """The plugin reference (hooks, providers, records) as Markdown, from the live definitions."""
    lines = ["## Reference (generated from the code: `zoo plugins --reference`)", "", "### Hooks", ""]
    for name in hookspecs.HOOKS:
        fn = getattr(hookspecs, name)
        lines += [f"- `{name}{_signature(fn)}`", ""]
        lines += ["  " + line if line else "" for line in _doc(fn).splitlines()] + [""]
    for cls in (BackboneProvider, Exporter, ExtractionEngine):
        lines += _class_section(cls)
    for record in (BuiltBackbone, PretrainedHead, ExportOptions, ExportOption, ValidationResult, SelfCheck,
                   PreparedEngine,
                   records.BackboneSpec, records.WeightsInfo, records.Normalization, records.LayerGroup):
        lines += _dataclass_section(record)
    lines += ["## Helpers (generated from the code)", ""]
    for module_name, names in HELPERS:
        module = importlib.import_module(module_name)
        for name in names:
            lines += _helper_section(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def _helper_section(module_name: str, name: str, obj: Any) -> list[str]:
    if is_dataclass(obj) and isinstance(obj, type):
        return _dataclass_section(obj, f"{module_name}.{name}")
    if isinstance(obj, type):  # an exception class
        return [f"### `{module_name}.{name}`", "", _doc(obj), ""]
    return [f"### `{module_name}.{name}{_signature(obj)}`", "", _doc(obj), ""]
