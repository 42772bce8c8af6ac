"""The backbone and exporter registries, filled from the plugins' registration hooks.

Each plugin registers into a staging list first; only if all of its providers are valid, every
spec lies under a provider name the plugin declared, and no name clashes with one an earlier
plugin owns are they committed. Built-in plugins register first (see zoo.plugin.host), so a third
party can never displace one: the clash marks the newcomer broken, naming both. A broken plugin
never leaves half its backbones behind, and never takes another plugin's down.

`Catalog` is the lookup part (names, globs, suggestions) shared with the on-disk listing index
(zoo.index), which answers `zoo list` without importing any plugin.
"""

from __future__ import annotations

import difflib
import fnmatch
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from ..errors import (
    AmbiguousBackboneError,
    DuplicateBackboneError,
    InvalidRecordError,
    PluginError,
    UnknownBackboneError,
    UnknownEngineError,
    UnknownExporterError,
    UnknownWeightsError,
    ZooError,
)
from ..records import BackboneSpec, Normalization
from .api import BackboneProvider, Exporter, ExtractionEngine, check_provider
from .host import (
    ENV_DISABLE,
    ENV_PROVIDERS,
    PluginHost,
    PluginStatus,
    call_hook,
    get_host,
    provider_choices,
    strict_plugins,
)


@dataclass(frozen=True)
class BackboneRecord:
    """A registered backbone: the plugin's spec plus the plugin that owns it."""

    spec: BackboneSpec
    plugin: str

    @property
    def name(self) -> str:
        return self.spec.name


class Catalog:
    """Registered backbones by name: lookup, globs, suggestions. Knows nothing of plugins' code."""

    def __init__(self) -> None:
        self._records: dict[str, BackboneRecord] = {}
        self._by_model: dict[str, list[str]] = {}
        self._norm_cache: dict[tuple[str, str | None], Normalization] = {}
        self._static_dims: dict[str, int | None] = {}
        self.default_backbone: str | None = None  # "provider/model.tag", declared by its provider
        self.conflicts: dict[str, str] = {}  # provider name -> why no plugin has it (see settle)

    def _add(self, rec: BackboneRecord) -> None:
        self._records[rec.name] = rec
        self._by_model.setdefault(rec.spec.model, []).append(rec.name)

    # -- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[BackboneRecord]:
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
        provider = name.partition("/")[0] if "/" in name else ""
        if provider in self.conflicts:
            raise PluginError(f"{name}: {self.conflicts[provider]}")
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

    # -- facts the plugins gave (cached) -----------------------------------------------------
    def normalization(self, rec: BackboneRecord, tag: str | None) -> Normalization:
        return self._norm_cache[(rec.name, tag)]

    def static_feature_dim(self, rec: BackboneRecord) -> int | None:
        return self._static_dims.get(rec.name)


@dataclass
class _StagedBackbones:
    """What one plugin's zoo_register_backbones handed over, checked but not yet committed."""

    providers: dict[str, BackboneProvider]
    records: list[BackboneRecord]
    norms: dict[tuple[str, str | None], Normalization]


class BackboneRegistry(Catalog):
    """The live registry: every plugin's backbone providers, asked through the hooks."""

    def __init__(self, host: PluginHost):
        super().__init__()
        self.host = host
        self._providers: dict[str, tuple[BackboneProvider, str]] = {}  # provider name -> (provider, plugin)
        staged = call_hook(host, "zoo_register_backbones", self._stage)
        accepted, self.conflicts = settle(host, {p: list(s.providers) for p, s in staged.items()},
                                          "backbone provider", "zoo_register_backbones")
        for plugin_name in accepted:
            self._commit(plugin_name, staged[plugin_name])

    # -- loading ------------------------------------------------------------------------------
    def _stage(self, plugin_name: str, registered: list[Any]) -> _StagedBackbones:
        """Check everything a plugin registered (runs under the plugin time limit; changes nothing)."""
        staged: dict[str, BackboneProvider] = {}
        records: list[BackboneRecord] = []
        for obj in registered:
            provider = check_provider(obj, "backbones")
            if provider.name in staged:
                raise DuplicateBackboneError(f"plugin {plugin_name!r} registers backbone provider {provider.name!r} "
                                             "twice; register each provider once")
            staged[provider.name] = provider
        for provider in staged.values():
            records += self._records_of(provider, plugin_name)
        # The stats a plugin hands out are checked before anything of it is used.
        norms = {(rec.name, rec.spec.default_weights):
                 _checked_normalization(rec, staged[rec.spec.provider], rec.spec.default_weights) for rec in records}
        return _StagedBackbones(staged, records, norms)

    def _commit(self, plugin_name: str, staged: _StagedBackbones) -> None:
        for name, provider in staged.providers.items():
            self._providers[name] = (provider, plugin_name)
            if provider.default_backbone and self.default_backbone is None:
                self.default_backbone = f"{name}/{provider.default_backbone}"
        for rec in staged.records:
            self._add(rec)
        self._norm_cache.update(staged.norms)
        st = self.host.status[plugin_name]
        st.providers, st.backbones = sorted(staged.providers), len(staged.records)

    @staticmethod
    def _records_of(provider: BackboneProvider, plugin_name: str) -> list[BackboneRecord]:
        out: dict[str, BackboneRecord] = {}
        for spec in provider.specs():
            if not isinstance(spec, BackboneSpec):
                raise InvalidRecordError(f"{type(provider).__name__}.specs() must yield zoo.BackboneSpec, "
                                         f"got {type(spec).__name__}")
            spec.validate()
            if spec.provider != provider.name:
                raise InvalidRecordError(
                    f"{type(provider).__name__} (provider {provider.name!r}) yielded {spec.name!r}: a provider "
                    f"registers only under its own name; use BackboneSpec(provider={provider.name!r}, ...)")
            if spec.name in out:
                raise DuplicateBackboneError(f"{type(provider).__name__}.specs() yields {spec.name!r} twice")
            out[spec.name] = BackboneRecord(spec, plugin_name)
        return list(out.values())

    # -- asking the owner ---------------------------------------------------------------------
    def provider(self, rec: BackboneRecord) -> BackboneProvider:
        return self._providers[rec.spec.provider][0]

    def ask(self, rec: BackboneRecord, what: str, call: Callable[[BackboneProvider], Any]) -> Any:
        """Run `call(provider)`; errors become PluginError naming the plugin (ZooErrors pass)."""
        try:
            return call(self.provider(rec))
        except Exception as exc:
            if strict_plugins() or _is_zoo_error(exc):
                raise
            raise PluginError(f"plugin {rec.plugin!r} failed in {what} for {rec.name}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _fetch_normalization(self, rec: BackboneRecord, provider: BackboneProvider, tag: str | None) -> Normalization:
        key = (rec.name, tag)
        if key not in self._norm_cache:
            self._norm_cache[key] = _checked_normalization(rec, provider, tag)
        return self._norm_cache[key]

    def normalization(self, rec: BackboneRecord, tag: str | None) -> Normalization:
        try:
            norm: Normalization = self.ask(rec, "normalization", lambda p: self._fetch_normalization(rec, p, tag))
            return norm
        except InvalidRecordError as exc:
            raise PluginError(str(exc)) from exc

    def offline_backbones(self) -> list[str]:
        """"provider/model.tag" of every backbone whose pretrained weights load offline here, as
        each provider reports them (`BackboneProvider.offline_weights`), in registration order.
        A name the provider does not list, or a tag its spec lacks, is the plugin's error."""
        out: list[str] = []
        for provider_name, (provider, plugin_name) in self._providers.items():
            try:
                names = list(provider.offline_weights())
            except Exception as exc:
                if strict_plugins() or _is_zoo_error(exc):
                    raise
                raise PluginError(f"plugin {plugin_name!r} failed in offline_weights: "
                                  f"{type(exc).__name__}: {exc}") from exc
            for entry in names:
                try:
                    rec, tag = self.resolve(f"{provider_name}/{entry}")
                except ZooError:
                    rec, tag = None, None
                if rec is None or rec.spec.provider != provider_name or tag not in rec.spec.weight_tags:
                    raise PluginError(
                        f"plugin {plugin_name!r}: {type(provider).__name__}.offline_weights() lists {entry!r}, "
                        f"which is not one of its backbones with that weights tag; return 'model.tag' names "
                        f"of backbones its specs() yields")
                name = f"{rec.name}.{tag}"
                if name not in out:
                    out.append(name)
        return out

    def static_feature_dim(self, rec: BackboneRecord) -> int | None:
        if rec.name not in self._static_dims:
            dim = self.ask(rec, "feature_dim", lambda p: p.feature_dim(rec.spec))
            self._static_dims[rec.name] = int(dim) if dim is not None else None
        return self._static_dims[rec.name]


def _checked_normalization(rec: BackboneRecord, provider: BackboneProvider, tag: str | None) -> Normalization:
    norm = provider.normalization(rec.spec, tag)
    if not isinstance(norm, Normalization):
        raise InvalidRecordError(
            f"plugin {rec.plugin!r}: {type(provider).__name__}.normalization() must return zoo.Normalization "
            f"for {rec.name} (weights {tag!r}), got {type(norm).__name__}; every backbone needs its stats "
            "from its plugin")
    return norm.validate(f"{rec.name} (weights {tag!r}, plugin {rec.plugin!r})")


def settle(host: PluginHost, claims: dict[str, list[str]], what: str,
           hook_name: str) -> tuple[list[str], dict[str, str]]:
    """Decide which plugins get the names they claim (`claims`: plugin -> names, built-ins first).

    A built-in's names are its own: a third party claiming one is marked broken. Between third
    parties nobody wins silently: a name two of them claim goes to neither (both are marked
    "conflict", naming each other and the fix) unless ZOO_PROVIDERS gives it to one; a plugin
    claiming a name ZOO_PROVIDERS gives to another is held out too. All or nothing: a plugin is
    committed only if it gets every name it claims. Returns (the plugins to commit, in order;
    {name: why nobody has it} for names held out by a conflict)."""
    choices = provider_choices()
    owner: dict[str, str] = {}
    accepted: list[str] = []
    builtin = [p for p in claims if host.status.get(p, PluginStatus(p)).builtin]
    for plugin_name in builtin:  # built-ins register first and own their names
        taken = [n for n in claims[plugin_name] if n in owner]
        if taken:
            host.fail(plugin_name, DuplicateBackboneError(
                f"{what} {taken[0]!r} belongs to plugin {owner[taken[0]]!r}; plugin {plugin_name!r} registers it "
                "too and was not loaded"), hook_name)
            continue
        owner.update(dict.fromkeys(claims[plugin_name], plugin_name))
        accepted.append(plugin_name)
    third = [p for p in claims if p not in builtin]
    claimants: dict[str, list[str]] = {}
    for plugin_name in third:
        for n in claims[plugin_name]:
            claimants.setdefault(n, []).append(plugin_name)
    conflicts: dict[str, str] = {}
    for plugin_name in third:
        problem: tuple[str, str, list[str]] | None = None  # (message, status, the other plugins)
        for n in claims[plugin_name]:
            others = [p for p in claimants[n] if p != plugin_name]
            if n in owner:
                problem = (f"{what} {n!r} belongs to plugin {owner[n]!r}; plugin {plugin_name!r} registers it "
                           f"too and was not loaded ({_fix(what)}, or disable it with {ENV_DISABLE})", "broken", [])
            elif n in choices:
                if not host.matches(plugin_name, choices[n]):
                    problem = (f"{what} {n!r} is given to {choices[n]!r} by {ENV_PROVIDERS}; plugin {plugin_name!r} "
                               f"claims it too and was not loaded (change {ENV_PROVIDERS}, or disable it with "
                               f"{ENV_DISABLE})", "conflict", others)
                    if not any(host.matches(p, choices[n]) for p in claimants[n]):
                        conflicts[n] = (f"{what} {n!r} is given to {choices[n]!r} by {ENV_PROVIDERS}, which does "
                                        f"not provide it; claimed by {', '.join(map(repr, claimants[n]))}")
            elif others:
                picks = " or ".join(f"{ENV_PROVIDERS}={n}={p}" for p in claimants[n])
                problem = (f"{what} {n!r} is claimed by plugin {plugin_name!r} and by {', '.join(map(repr, others))}; "
                           f"neither is loaded: pick one with {picks} (or uninstall one, or disable it with "
                           f"{ENV_DISABLE})", "conflict", others)
                conflicts[n] = (f"{what} {n!r} is claimed by plugins {', '.join(map(repr, claimants[n]))} and "
                                f"none of them is loaded: pick one with {picks}")
            if problem:
                break
        if problem is None:
            owner.update(dict.fromkeys(claims[plugin_name], plugin_name))
            accepted.append(plugin_name)
        else:
            host.fail(plugin_name, DuplicateBackboneError(problem[0]), hook_name, status=problem[1],
                      conflicts=problem[2])
    return accepted, conflicts


def _fix(what: str) -> str:
    return "rename its format" if "format" in what else "rename its provider"


def _is_zoo_error(exc: BaseException) -> bool:
    from ..errors import ZooError

    return isinstance(exc, ZooError)


class ExporterRegistry:
    """Export formats by name; a name belongs to the first plugin registering it (built-ins first)."""

    def __init__(self, host: PluginHost):
        self.host = host
        self._exporters: dict[str, tuple[Exporter, str]] = {}
        staged = call_hook(host, "zoo_register_exporters", self._stage)
        accepted, self.conflicts = settle(host, {p: list(s) for p, s in staged.items()}, "export format",
                                          "zoo_register_exporters")
        for plugin_name in accepted:
            self._commit(plugin_name, staged[plugin_name])

    def _stage(self, plugin_name: str, registered: list[Any]) -> dict[str, Exporter]:
        staged: dict[str, Exporter] = {}
        for obj in registered:
            exporter = check_provider(obj, "exporters")
            if exporter.name in staged:
                raise DuplicateBackboneError(f"plugin {plugin_name!r} registers export format {exporter.name!r} "
                                             "twice; register each format once")
            staged[exporter.name] = exporter
        return staged

    def _commit(self, plugin_name: str, staged: dict[str, Exporter]) -> None:
        for name, exporter in staged.items():
            self._exporters[name] = (exporter, plugin_name)
        self.host.status[plugin_name].exporters = sorted(staged)

    def names(self) -> list[str]:
        return sorted(self._exporters)

    def get(self, name: str) -> Exporter:
        if name in self.conflicts:
            raise PluginError(self.conflicts[name])
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

    def variant(self, base: str, quantization: str) -> str | None:
        """The format that quantizes `base` with `quantization` (e.g. "onnx", "int8"), if any."""
        return next((n for n, (e, _) in sorted(self._exporters.items())
                     if e.builds_on == base and e.quantization == quantization), None)

    def for_artifact(self, path: str) -> Exporter | None:
        """The exporter whose suffix the file name ends with (the longest such suffix)."""
        hits = [e for e, _ in self._exporters.values() if str(path).endswith(e.suffix)]
        if not hits:  # an ending an exporter writes beside its own artifact (e.g. OpenVINO IR)
            hits = [e for e, _ in self._exporters.values() if any(str(path).endswith(s) for s in getattr(e, "reads", ()))]
            return min(hits, key=lambda e: e.name) if hits else None
        return max(hits, key=lambda e: len(e.suffix)) if hits else None


class EngineRegistry:
    """Extraction engines by name; a name belongs to the first plugin registering it (built-ins
    first), and "auto" is the zoo's own (the choice among them). The one list of engine names:
    `zoo train --engine` choices, TrainConfig's check and the choice all read it."""

    RESERVED = ("auto",)

    def __init__(self, host: PluginHost):
        self.host = host
        self._engines: dict[str, tuple[ExtractionEngine, str]] = {}
        call_hook(host, "zoo_register_engines", self._load_plugin)

    def _load_plugin(self, plugin_name: str, registered: list[Any]) -> None:
        staged: dict[str, ExtractionEngine] = {}
        try:
            for obj in registered:
                engine = check_provider(obj, "engines")
                if engine.name in self.RESERVED:
                    raise DuplicateBackboneError(f"engine name {engine.name!r} is the zoo's own choice among engines; "
                                                 f"plugin {plugin_name!r} cannot register it (rename its engine)")
                if engine.name in self._engines or engine.name in staged:
                    owner = self._engines[engine.name][1] if engine.name in self._engines else plugin_name
                    raise DuplicateBackboneError(
                        f"extraction engine {engine.name!r} belongs to plugin {owner!r}; plugin {plugin_name!r} "
                        "registers it too and was not loaded (rename its engine, or disable it with "
                        "ZOO_DISABLE_PLUGINS)")
                staged[engine.name] = engine
        except Exception as exc:  # noqa: BLE001
            self.host.fail(plugin_name, exc, "zoo_register_engines")
            return
        for name, engine in staged.items():
            self._engines[name] = (engine, plugin_name)
        st = self.host.status[plugin_name]
        st.engines = sorted(staged)

    def names(self) -> list[str]:
        """Registered engine names, in registration order (built-ins first)."""
        return list(self._engines)

    def choices(self) -> list[str]:
        """What --engine accepts: "auto" and every registered engine."""
        return list(self.RESERVED) + self.names()

    def get(self, name: str) -> ExtractionEngine:
        if name not in self._engines:
            close = difflib.get_close_matches(name, self.choices(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownEngineError(
                f"unknown extraction engine {name!r}{hint} (available: {', '.join(self.choices())}; `zoo plugins` "
                "shows engine plugins that failed to load)")
        return self._engines[name][0]

    def owner(self, name: str) -> str:
        return self._engines[name][1]


_Registry = TypeVar("_Registry", BackboneRegistry, ExporterRegistry, EngineRegistry)
_current: dict[type, Any] = {}  # registry class -> its process-wide instance
_lock = threading.Lock()


def _singleton(cls: type[_Registry]) -> _Registry:
    """The process-wide registry of one kind, rebuilt when the plugin host it was built from is gone."""
    host = get_host()
    with _lock:
        reg = _current.get(cls)
        if reg is None or reg.host is not host:
            reg = _current[cls] = cls(host)
        return reg


def backbones() -> BackboneRegistry:
    """The process-wide backbone registry (rebuilt after `reset()` or `zoo.plugin.host.reset()`)."""
    return _singleton(BackboneRegistry)


def exporters() -> ExporterRegistry:
    """The process-wide exporter registry (rebuilt after `reset()` or `zoo.plugin.host.reset()`)."""
    return _singleton(ExporterRegistry)


def engines() -> EngineRegistry:
    """The process-wide extraction-engine registry (rebuilt after `reset()` or `zoo.plugin.host.reset()`)."""
    return _singleton(EngineRegistry)


def default_backbone(with_tag: bool = True) -> str:
    """The zoo's default backbone, "provider/model.tag" (or without its tag, for callers that
    choose the weights themselves): the one its provider declares (`default_backbone`)."""
    name = backbones().default_backbone
    if name is None:
        raise PluginError("no installed plugin declares a default backbone (BackboneProvider.default_backbone); "
                          "name one with --backbone provider/model")
    provider, _, rest = name.partition("/")
    return name if with_tag else f"{provider}/{rest.partition('.')[0]}"


def reset() -> None:
    """Forget the registries, keeping the loaded plugins: the next lookup asks every plugin's
    registration hooks again (e.g. after `get_host().register(module, name)` by hand).
    `zoo.plugin.host.reset()` forgets the plugins too."""
    with _lock:
        _current.clear()
