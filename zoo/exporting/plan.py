"""What an export will do, decided before anything is written: the formats in the order they
run (`resolve_formats`), each exporter's own options (`exporter_options`), its requirements
(`check_requirements`), and the output folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ZooError

def resolve_formats(formats: str | Sequence[str], quantize: str | None, reg=None) -> list[str]:
    """Format names in the order they run: "all" expanded to every exporter that declares
    `in_all`, `quantize` adding each chosen format's quantized variant, and a derived format
    after the one it builds on."""
    from ..plugin import registry

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
    from ..model import ZooModel, load_model

    if isinstance(run_or_model, ZooModel):
        return run_or_model, None
    if isinstance(run_or_model, (str, os.PathLike)):
        return load_model(run_or_model), Path(run_or_model)
    raise ZooError(f"export takes a ZooModel or a run directory, got {type(run_or_model).__name__}")


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
    from ..plugin.api import Exporter

    return getattr(type(exporter), method) is not getattr(Exporter, method)
