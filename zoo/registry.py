"""The backbone and exporter registries, filled from the plugins' register_* hooks.

Each plugin registers into a staging list first; only if all of its records are valid and none
clashes with an earlier plugin's are they committed. So a broken plugin never leaves half its
backbones behind, and never takes another plugin's down.
"""

from __future__ import annotations

import difflib
import fnmatch
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import (
    AmbiguousBackboneError,
    DuplicateBackboneError,
    InvalidRecordError,
    PluginError,
    UnknownBackboneError,
    UnknownExporterError,
    UnknownWeightsError,
)
from .plugins import PluginHost, get_host
from .records import BackboneSpec, ExporterSpec, Normalization


@dataclass(frozen=True)
class BackboneRecord:
    """A registered backbone: the plugin's spec plus the plugin that owns it."""

    spec: BackboneSpec
    plugin: str

    @property
    def name(self) -> str:
        return self.spec.name


class BackboneRegistry:
    def __init__(self, host: PluginHost):
        self.host = host
        self._records: dict[str, BackboneRecord] = {}
        self._by_model: dict[str, list[str]] = {}
        self._norm_cache: dict[tuple[str, str | None], Normalization] = {}
        for plugin_name, register_fn in host.impls("register_backbones"):
            self._load_plugin(plugin_name, register_fn)

    # -- loading ------------------------------------------------------------------------------
    def _load_plugin(self, plugin_name: str, register_fn) -> None:
        staged: list[BackboneSpec] = []
        try:
            register_fn(register=staged.append)
            names: dict[str, BackboneSpec] = {}
            for spec in staged:
                if not isinstance(spec, BackboneSpec):
                    raise InvalidRecordError(f"register() expects a zoo.BackboneSpec, got {type(spec).__name__}")
                spec.validate()
                if spec.name in self._records or spec.name in names:
                    other = self._records[spec.name].plugin if spec.name in self._records else plugin_name
                    raise DuplicateBackboneError(
                        f"backbone {spec.name!r} is registered by both plugin {other!r} and plugin {plugin_name!r}; "
                        "a name can belong to one plugin only (rename it, or disable one plugin "
                        "with ZOO_DISABLE_PLUGINS)"
                    )
                names[spec.name] = spec
            # The stats a plugin hands out are checked before anything of it is used.
            for spec in staged:
                self._normalization(BackboneRecord(spec, plugin_name), spec.default_weights)
        except Exception as exc:  # noqa: BLE001 - isolate the plugin, whatever it raised
            self._norm_cache = {k: v for k, v in self._norm_cache.items() if k[0] not in {s.name for s in staged}}
            self.host.fail(plugin_name, exc, "register_backbones")
            return
        for spec in staged:
            self._records[spec.name] = BackboneRecord(spec, plugin_name)
            self._by_model.setdefault(spec.model, []).append(spec.name)
        self.host.status[plugin_name].backbones = len(staged)

    # -- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return iter(self._records.values())

    def names(self) -> list[str]:
        return sorted(self._records)

    def list_models(
        self,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        provider: str | None = None,
        pretrained_only: bool = False,
    ) -> list[str]:
        """Qualified names matching any `include` glob (against the qualified or the bare model
        name) and no `exclude` glob; sorted by model then provider so equal models sit together."""
        inc = [include] if isinstance(include, str) else list(include or [])
        exc = [exclude] if isinstance(exclude, str) else list(exclude or [])

        def hit(rec: BackboneRecord, patterns: list[str]) -> bool:
            return any(fnmatch.fnmatchcase(rec.name, p) or fnmatch.fnmatchcase(rec.spec.model, p) for p in patterns)

        out = []
        for rec in self._records.values():
            if provider and rec.spec.provider != provider:
                continue
            if pretrained_only and not rec.spec.weights:
                continue
            if inc and not hit(rec, inc):
                continue
            if exc and hit(rec, exc):
                continue
            out.append(rec)
        return [r.name for r in sorted(out, key=lambda r: (r.spec.model, r.spec.provider))]

    def resolve(self, name: str) -> tuple[BackboneRecord, str | None]:
        """Map `provider/model[.tag]` (or an unambiguous bare `model[.tag]`) to (record, tag)."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownBackboneError(repr(name))
        name = name.strip()
        for candidate, tag in self._splits(name):
            rec = self._lookup(candidate, name)
            if rec is None:
                continue
            if tag is not None and tag not in rec.spec.weight_tags:
                raise UnknownWeightsError(
                    f"{rec.name} has no weights tagged {tag!r}; available: "
                    f"{', '.join(rec.spec.weight_tags) or 'none (random init only)'}"
                )
            return rec, tag
        raise UnknownBackboneError(name, self.suggest(name))

    def _splits(self, name: str) -> Iterable[tuple[str, str | None]]:
        yield name, None
        provider, _, rest = name.rpartition("/")
        if "." in rest:  # a weights tag; model names may themselves not contain dots
            model, _, tag = rest.partition(".")
            yield (f"{provider}/{model}" if provider else model), tag

    def _lookup(self, candidate: str, original: str) -> BackboneRecord | None:
        if "/" in candidate:
            return self._records.get(candidate)
        qualified = self._by_model.get(candidate, [])
        if len(qualified) > 1:
            raise AmbiguousBackboneError(original, sorted(qualified))
        return self._records[qualified[0]] if qualified else None

    def suggest(self, name: str, n: int = 5) -> list[str]:
        bare = name.rpartition("/")[2].partition(".")[0]
        pool = list(self._records) + list(self._by_model)
        close = difflib.get_close_matches(name, pool, n=n, cutoff=0.6)
        close += difflib.get_close_matches(bare, list(self._by_model), n=n, cutoff=0.6)
        out: list[str] = []
        for c in close:
            for q in ([c] if "/" in c else self._by_model.get(c, [])):
                if q not in out:
                    out.append(q)
        return out[:n]

    # -- plugin-owned facts -----------------------------------------------------------------
    def _normalization(self, rec: BackboneRecord, tag: str | None) -> Normalization:
        key = (rec.name, tag)
        if key not in self._norm_cache:
            norm = self.host.call_owner(rec.plugin, "backbone_normalization", spec=rec.spec, weights=tag)
            if norm is None:
                raise InvalidRecordError(
                    f"plugin {rec.plugin!r} registered {rec.name} but returned no normalization for weights {tag!r}; "
                    "every backbone needs its stats from its plugin"
                )
            if not isinstance(norm, Normalization):
                raise InvalidRecordError(
                    f"plugin {rec.plugin!r}: backbone_normalization must return zoo.Normalization, got {type(norm).__name__}"
                )
            self._norm_cache[key] = norm.validate(f"{rec.name} (weights {tag!r}, plugin {rec.plugin!r})")
        return self._norm_cache[key]

    def normalization(self, rec: BackboneRecord, tag: str | None) -> Normalization:
        try:
            return self._normalization(rec, tag)
        except InvalidRecordError as exc:
            raise PluginError(str(exc)) from exc

    def static_feature_dim(self, rec: BackboneRecord) -> int | None:
        return self.host.call_owner(rec.plugin, "backbone_feature_dim", spec=rec.spec, model=None)


class ExporterRegistry:
    def __init__(self, host: PluginHost):
        self.host = host
        self._exporters: dict[str, tuple[ExporterSpec, str]] = {}
        for plugin_name, register_fn in host.impls("register_exporters"):
            staged: list[ExporterSpec] = []
            try:
                register_fn(register=staged.append)
                for spec in staged:
                    if not isinstance(spec, ExporterSpec):
                        raise InvalidRecordError(f"register() expects a zoo.ExporterSpec, got {type(spec).__name__}")
                    if spec.name in self._exporters:
                        raise DuplicateBackboneError(
                            f"exporter {spec.name!r} is registered by both plugin {self._exporters[spec.name][1]!r} "
                            f"and plugin {plugin_name!r}"
                        )
            except Exception as exc:  # noqa: BLE001
                host.fail(plugin_name, exc, "register_exporters")
                continue
            for spec in staged:
                self._exporters[spec.name] = (spec, plugin_name)
            host.status[plugin_name].exporters = len(staged)

    def names(self) -> list[str]:
        return sorted(self._exporters)

    def get(self, name: str) -> ExporterSpec:
        if name not in self._exporters:
            close = difflib.get_close_matches(name, list(self._exporters), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownExporterError(
                f"unknown export format {name!r}{hint} (available: {', '.join(self.names()) or 'none'}; "
                "`zoo plugins` shows exporter plugins that failed to load)"
            )
        return self._exporters[name][0]

    def owner(self, name: str) -> str:
        return self._exporters[name][1]


_backbones: BackboneRegistry | None = None
_exporters: ExporterRegistry | None = None
_lock = threading.Lock()


def backbones() -> BackboneRegistry:
    global _backbones
    with _lock:
        if _backbones is None:
            _backbones = BackboneRegistry(get_host())
        return _backbones


def exporters() -> ExporterRegistry:
    global _exporters
    with _lock:
        if _exporters is None:
            _exporters = ExporterRegistry(get_host())
        return _exporters


def reset() -> None:
    global _backbones, _exporters
    with _lock:
        _backbones = None
        _exporters = None
