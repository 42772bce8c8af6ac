"""The plugin reference, generated from the live definitions (`zoo plugins --reference`).

docs/plugins.md carries the same text; a test keeps the two equal.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from typing import Any

from .. import records
from . import hookspecs
from .api import (BackboneProvider, BuiltBackbone, Exporter, ExportOption, ExportOptions, PretrainedHead, SelfCheck,
                  ValidationResult)


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _class_section(cls: type) -> list[str]:
    out = [f"### `zoo.{cls.__name__}`", "", _doc(cls), ""]
    abstract = getattr(cls, "__abstractmethods__", frozenset())
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
        sig = str(inspect.signature(v)).replace("'", "")
        out += [f"- `{n}{sig}` ({tag})", ""]
        out += ["  " + line if line else "" for line in _doc(v).splitlines()] + [""]
    return out


def _dataclass_section(cls: type) -> list[str]:
    out = [f"### `zoo.{cls.__name__}`", "", _doc(cls), "", "| field | type | default |", "| --- | --- | --- |"]
    for f in fields(cls):
        if f.default is not MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f"`{f.default_factory()!r}`"  # type: ignore[misc]
        else:
            default = "**required**"
        out.append(f"| `{f.name}` | `{str(f.type).replace('|', 'or')}` | {default} |")
    return out + [""]


def reference_markdown() -> str:
    """The plugin reference (hooks, providers, records) as Markdown, from the live definitions."""
    lines = ["## Reference (generated from the code: `zoo plugins --reference`)", "", "### Hooks", ""]
    for name in hookspecs.HOOKS:
        fn = getattr(hookspecs, name)
        lines += [f"- `{name}{inspect.signature(fn)}`".replace("'", ""), ""]
        lines += ["  " + line if line else "" for line in _doc(fn).splitlines()] + [""]
    for cls in (BackboneProvider, Exporter):
        lines += _class_section(cls)
    for cls in (BuiltBackbone, PretrainedHead, ExportOptions, ExportOption, ValidationResult, SelfCheck, records.BackboneSpec,
                records.WeightsInfo, records.Normalization, records.LayerGroup):
        lines += _dataclass_section(cls)
    return "\n".join(lines).rstrip() + "\n"
