"""The plugin manager: discovers plugins through the `zoo` entry-point group, isolates broken ones.

Environment:
  ZOO_LOAD_PLUGINS=a,b     load only these entry points (empty string: load none)
  ZOO_DISABLE_PLUGINS=a,b  never load these
  ZOO_STRICT_PLUGINS=1     re-raise the first plugin failure instead of isolating it
An entry of the first two that names no installed plugin is warned about, naming the variable.

pluggy does the work: discovery (entry points), validation (`check_pending` rejects an
implementation whose name is no hook), and dispatch (each plugin's hook is called on its own
through `subset_hook_caller`, so the zoo knows which plugin registered what, and one plugin's
failure is its own). Plugins shipped in backbone-zoo's own distribution are "built-in": they are
registered first, so no other plugin can take their names, whatever the entry-point order.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pluggy

from ..errors import PluginError
from . import hookspecs

ENTRY_POINT_GROUP = "zoo"
DISTRIBUTION = "backbone-zoo"  # plugins shipped in this distribution are the built-ins
ENV_LOAD, ENV_DISABLE = "ZOO_LOAD_PLUGINS", "ZOO_DISABLE_PLUGINS"


class PluginEnvWarning(UserWarning):
    """ZOO_LOAD_PLUGINS / ZOO_DISABLE_PLUGINS names a plugin that is not installed."""


def strict_plugins() -> bool:
    return os.environ.get("ZOO_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


def _env_list(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def plugin_entry_points() -> list[md.EntryPoint]:
    """The `zoo` entry points, sorted by name, each name once (the same distribution can be
    visible twice on sys.path)."""
    out: dict[tuple[str, str], md.EntryPoint] = {}
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        out.setdefault((ep.name, _dist_name(ep)), ep)
    return list(out.values())


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"] if dist is not None else "") or ""


@dataclass
class PluginStatus:
    """What `zoo plugins` shows for one plugin."""

    name: str
    version: str = ""
    distribution: str = ""
    module: str = ""
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | broken | disabled
    error: str = ""
    providers: list[str] = field(default_factory=list)  # backbone provider names it owns
    backbones: int = 0
    exporters: list[str] = field(default_factory=list)  # format names it owns

    def mark_broken(self, exc: BaseException, during: str) -> None:
        self.status = "broken"
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.error = f"{during}: {detail}"


class PluginHost:
    """One pluggy PluginManager plus the per-plugin status the zoo keeps about it."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("zoo")
        self.pm.add_hookspecs(hookspecs)
        self.status: dict[str, PluginStatus] = {}
        if load_entry_points:
            self._load_entry_points()

    # -- discovery ---------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        allow = _env_list(ENV_LOAD)
        deny = _env_list(ENV_DISABLE) or set()
        eps = plugin_entry_points()
        _warn_unknown_env_entries(allow, deny, {ep.name for ep in eps})
        # built-ins first: they own their names whatever a third party's entry point sorts as
        for ep in sorted(eps, key=lambda e: (_dist_name(e) != DISTRIBUTION, e.name)):
            dist = getattr(ep, "dist", None)
            st = PluginStatus(name=ep.name, version=getattr(dist, "version", "") or "", distribution=_dist_name(ep),
                              module=ep.value, builtin=_dist_name(ep) == DISTRIBUTION)
            if ep.name in self.status:  # two distributions declare the same plugin name
                owner = self.status[ep.name]
                st.name = f"{ep.name} ({st.distribution})"
                self.status[st.name] = st
                self.fail(st.name, PluginError(
                    f"the plugin name {ep.name!r} is already taken by {owner.distribution or 'another'} "
                    f"{owner.version}; rename this entry point in {st.distribution}'s [project.entry-points.zoo]"),
                    "entry point")
                continue
            self.status[ep.name] = st
            if ep.name in deny or (allow is not None and ep.name not in allow):
                st.status = "disabled"
                st.error = f"disabled by {ENV_LOAD} / {ENV_DISABLE}"
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure isolates the plugin
                self.fail(ep.name, exc, "import failed")
                continue
            self.register(plugin, ep.name, status=st)

    def register(self, plugin: Any, name: str, status: PluginStatus | None = None, builtin: bool = False) -> bool:
        """Register a plugin object by hand (tests, notebooks); entry points are the normal path.
        Returns whether it was accepted."""
        st = status or PluginStatus(name=name, module=getattr(plugin, "__name__", ""), builtin=builtin)
        self.status[name] = st
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()  # only this plugin's implementations are unchecked here
        except pluggy.PluginValidationError as exc:
            self.fail(name, PluginError(_explain_validation(exc)), "registration failed")
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. registering the same object twice
            self.fail(name, exc, "registration failed")
            return False
        st.hooks = sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or []))
        return True

    def fail(self, name: str, exc: BaseException, during: str) -> None:
        """Record that plugin `name` is broken; in strict mode raise instead."""
        st = self.status.setdefault(name, PluginStatus(name=name))
        st.mark_broken(exc, during)
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        if strict_plugins():
            if isinstance(exc, PluginError):
                raise exc
            raise PluginError(f"plugin {name!r}: {during}: {exc}") from exc

    def is_ok(self, name: str) -> bool:
        st = self.status.get(name)
        return st is not None and st.status == "ok" and self.pm.has_plugin(name)

    # -- calling ------------------------------------------------------------------------------
    def implementers(self, hook_name: str) -> Iterator[str]:
        """Names of the live plugins implementing a hook: built-ins first, then by name."""
        names = {impl.plugin_name for impl in getattr(self.pm.hook, hook_name).get_hookimpls()}
        yield from sorted(names, key=lambda n: (not self.status.get(n, PluginStatus(n)).builtin, n))

    def call_one(self, plugin_name: str, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a hook through pluggy (hookwrappers and all)."""
        others = [p for n, p in self.pm.list_name_plugin() if n != plugin_name]
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        return caller(**kwargs)


def _explain_validation(exc: pluggy.PluginValidationError) -> str:
    msg = str(exc)
    for v1 in hookspecs.V1_HOOKS:
        if f"unknown hook {v1!r}" in msg:
            return (f"{msg}. {v1!r} is a plugin API v1 hook, gone in backbone-zoo 0.2: implement "
                    "zoo_register_backbones(register) / zoo_register_exporters(register) and register "
                    "zoo.BackboneProvider / zoo.Exporter objects (see `zoo plugins --reference`)")
    if "unknown hook" in msg:
        return f"{msg}; the hooks are: {', '.join(hookspecs.HOOKS)} (check the spelling)"
    return msg


def _warn_unknown_env_entries(allow: set[str] | None, deny: set[str], installed: set[str]) -> None:
    for var, entries in ((ENV_LOAD, allow or set()), (ENV_DISABLE, deny)):
        unknown = sorted(entries - installed)
        if unknown:
            warnings.warn(f"{var} names {', '.join(map(repr, unknown))}, which matches no installed plugin "
                          f"(installed: {', '.join(sorted(installed)) or 'none'}); check the spelling",
                          PluginEnvWarning, stacklevel=4)


_host: PluginHost | None = None
_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide plugin host, built on first use."""
    global _host
    with _lock:
        if _host is None:
            _host = PluginHost()
        return _host


def reset() -> None:
    """Forget loaded plugins and registries (tests; after installing a plugin at run time).

    The registries (zoo.plugin.registry) are built from a host and rebuild themselves when the
    process-wide host is no longer theirs, so forgetting the host forgets them too (and this
    module needs nothing from the floor above it)."""
    global _host
    with _lock:
        _host = None


def call_hook(host: PluginHost, hook_name: str, on_register: Callable[[str, list], None]) -> None:
    """Run a registration hook plugin by plugin: each gets its own `register` list, handed to
    `on_register(plugin_name, registered)`; a plugin whose hook raises is marked broken."""
    for name in list(host.implementers(hook_name)):
        staged: list = []
        try:
            host.call_one(name, hook_name, register=staged.append)
        except Exception as exc:  # noqa: BLE001 - isolate the plugin, whatever it raised
            host.fail(name, exc, hook_name)
            continue
        on_register(name, staged)
