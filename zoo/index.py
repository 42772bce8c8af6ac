"""The listing index: every registration, cached on disk, so `zoo list` and `zoo info --no-build`
answer without importing a plugin (or torch, torchvision, timm).

The index is keyed by a fingerprint of what decides the registrations: each `zoo` entry point
(name, module, distribution, version, where it lives and when its files changed), the installed
versions of what those distributions require (a new torchvision lists new models), the
ZOO_LOAD_PLUGINS / ZOO_DISABLE_PLUGINS / ZOO_PROVIDERS / ZOO_PLUGIN_TIMEOUT settings, and the zoo's
own version. Any change gives a
new key, so a stale index is never read; computing the key reads package metadata only.

It holds each backbone's spec, owning plugin, listed feature dimension and the normalization of
every weights tag, the names held out by a conflict between plugins, every exporter's options (for
`zoo plugins --json`), plus every plugin's status (so broken plugins are still reported; under
ZOO_STRICT_PLUGINS=1 a broken one raises as it would live). Location: $ZOO_CACHE_DIR, else
$XDG_CACHE_HOME/backbone-zoo, else ~/.cache/backbone-zoo. `zoo list --refresh` rebuilds it.
A damaged or unreadable index is rebuilt; one that cannot be written is simply not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import PluginError
from .plugin.host import (
    ENV_DISABLE,
    ENV_LOAD,
    ENV_PROVIDERS,
    ENV_TIMEOUT,
    PluginStatus,
    plugin_entry_points,
    strict_plugins,
)
from .records import BackboneSpec, Normalization
from .plugin.registry import BackboneRecord, Catalog

INDEX_VERSION = 3  # 3: exporter options carry type, flag and metavar (the `zoo export` flags)
KEEP = 8  # index files kept (one per set of installed plugins, e.g. several virtualenvs)


def cache_dir() -> Path:
    if os.environ.get("ZOO_CACHE_DIR"):
        return Path(os.environ["ZOO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "backbone-zoo"


# -- the key ------------------------------------------------------------------------------------------
def _files_stamp(module: str) -> list[Any]:
    """(name, mtime_ns, size) of the module's file, or of every file directly in its package."""
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec(module.partition(":")[0].split(".")[0])
        if spec is None or not spec.origin:
            return []
        origin = Path(spec.origin)
        files = sorted(origin.parent.iterdir()) if spec.submodule_search_locations else [origin]
        return [(f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()]
    return []


def _requirement_versions(dist: md.Distribution | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for req in (dist.requires or []) if dist is not None else []:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0]
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def fingerprint() -> dict[str, Any]:
    from . import __version__

    plugins = []
    for ep in plugin_entry_points():
        dist = getattr(ep, "dist", None)
        plugins.append({
            "name": ep.name, "value": ep.value,
            "distribution": (dist.metadata["Name"] if dist is not None else "") or "",
            "version": getattr(dist, "version", "") or "",
            "location": str(getattr(dist, "_path", "")),
            "files": _files_stamp(ep.value),
            "requires": _requirement_versions(dist),
        })
    core = Path(__file__).parent
    return {
        "index": INDEX_VERSION, "zoo": __version__, "python": list(sys.version_info[:2]),
        "core": [(n, (core / n).stat().st_mtime_ns) for n in ("plugin/api.py", "plugin/registry.py", "records.py",
                                                            "plugin/host.py")],
        "env": {var: os.environ.get(var) for var in (ENV_LOAD, ENV_DISABLE, ENV_PROVIDERS, ENV_TIMEOUT)},
        "plugins": plugins,
    }


def index_path(fp: dict[str, Any] | None = None) -> Path:
    key = hashlib.sha256(json.dumps(fp or fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / f"index-{key}.json"


# -- reading and writing ------------------------------------------------------------------------------
class IndexCatalog(Catalog):
    """The catalogue as the index recorded it. A fact it lacks is asked of the live registry."""

    def __init__(self, data: dict[str, Any]):
        super().__init__()
        norms = [Normalization.from_dict(n) for n in data["normalizations"]]
        for b in data["backbones"]:
            rec = BackboneRecord(BackboneSpec.from_dict(b["spec"]), b["plugin"])
            self._add(rec)
            self._static_dims[rec.name] = b["feature_dim"]
            for tag, i in b["normalization"].items():
                self._norm_cache[(rec.name, tag or None)] = norms[i]
        self.default_backbone = data.get("default_backbone")
        self.conflicts = dict(data.get("conflicts") or {})
        self.plugins = [PluginStatus(**p) for p in data["plugins"]]
        self.exporter_options: dict[str, list[dict[str, Any]]] = data.get("exporter_options") or {}

    def normalization(self, rec: BackboneRecord, tag: str | None) -> Normalization:
        if (rec.name, tag) in self._norm_cache:
            return self._norm_cache[(rec.name, tag)]
        from .plugin import registry

        live = registry.backbones()
        return live.normalization(live.resolve(rec.name)[0], tag)


def exporter_options(exporters: Any) -> dict[str, list[dict[str, Any]]]:
    """Each export format's own options, JSON-ready (what `zoo plugins --json` shows)."""
    return {name: [{"name": o.name, "default": o.default, "choices": list(o.choices), "help": o.help,
                    "type": getattr(o.type, "__name__", "str"), "flag": o.cli_flag(), "metavar": o.metavar}
                   for o in exporters.get(name).options] for name in exporters.names()}


def export_flag_options() -> dict[str, list[dict[str, Any]]]:
    """`exporter_options` for building `zoo export`'s flags: from the index when it is current
    (no plugin imported), else from the live registry (which writes the index)."""
    cat = catalog()
    options = getattr(cat, "exporter_options", None)
    if options is None:  # the index was built just now, from the live registry
        from .plugin import registry

        options = exporter_options(registry.exporters())
    return options


def _dump(reg: Any, host: Any, exporters: Any) -> dict[str, Any]:
    from dataclasses import asdict

    norms: dict[Normalization, int] = {}
    backbones = []
    for rec in reg:
        by_tag: dict[str, int] = {}
        for tag in (rec.spec.default_weights, *rec.spec.weight_tags, None):
            with contextlib.suppress(Exception):  # a tag the plugin cannot describe is asked live, and fails there
                by_tag[tag or ""] = norms.setdefault(reg.normalization(rec, tag), len(norms))
        dim = None
        with contextlib.suppress(Exception):
            dim = reg.static_feature_dim(rec)
        backbones.append({"spec": rec.spec.to_dict(), "plugin": rec.plugin, "feature_dim": dim,
                          "normalization": by_tag})
    return {
        "index": INDEX_VERSION,
        "backbones": backbones,
        "normalizations": [n.to_dict() for n in norms],
        "default_backbone": reg.default_backbone,
        "conflicts": dict(reg.conflicts),
        "exporter_options": exporter_options(exporters),
        "plugins": [asdict(s) for s in host.status.values()],
    }


def _raise_if_strict(plugins: list[PluginStatus]) -> None:
    broken = [p for p in plugins if p.status in ("broken", "conflict")]
    if broken and strict_plugins():
        raise PluginError(f"plugin {broken[0].name!r}: {broken[0].error}")


def catalog(refresh: bool = False) -> Catalog:
    """The backbone catalogue for listing: from the index when it is current, else from the live
    registry (which then writes the index)."""
    path = index_path()
    if not refresh and path.is_file():
        try:
            cat = IndexCatalog(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            cat = None  # damaged: rebuilt below
        if cat is not None:
            _raise_if_strict(cat.plugins)
            return cat
    return build(path)


def build(path: Path | None = None) -> Catalog:
    from .plugin import registry
    from .io import write_json
    from .plugin.host import get_host

    reg = registry.backbones()
    exporters = registry.exporters()  # so the recorded plugin statuses cover every kind
    registry.engines()
    data = _dump(reg, get_host(), exporters)
    path = path or index_path()
    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        write_json(path, data)
        old = sorted(path.parent.glob("index-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]
        for stale in old:
            stale.unlink()
    return reg


def plugin_statuses(cat: Catalog) -> list[PluginStatus]:
    """The plugins' statuses behind a catalogue (from the index, or the live host)."""
    if isinstance(cat, IndexCatalog):
        return cat.plugins
    from .plugin.host import get_host

    return list(get_host().status.values())
