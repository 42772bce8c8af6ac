"""The plugin manager: discovers plugins through the `zoo` entry-point group, isolates broken ones.

Environment:
  ZOO_LOAD_PLUGINS=a,b     load only these entry points (empty string: load none)
  ZOO_DISABLE_PLUGINS=a,b  never load these
  ZOO_STRICT_PLUGINS=1     re-raise the first plugin failure instead of isolating it

Like llm, the manager is built lazily on first use; unlike llm, a plugin that fails to import or
whose hook raises is recorded as broken (see `zoo plugins`) and the others keep working.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "zoo"


def strict_plugins() -> bool:
    return os.environ.get("ZOO_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


def _env_list(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


@dataclass
class PluginStatus:
    """What `zoo plugins` shows for one plugin."""

    name: str
    version: str = ""
    distribution: str = ""
    module: str = ""
    hooks: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | broken | disabled
    error: str = ""
    backbones: int = 0
    exporters: int = 0

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
        allow = _env_list("ZOO_LOAD_PLUGINS")
        deny = _env_list("ZOO_DISABLE_PLUGINS") or set()
        seen: set[str] = set()
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            st = PluginStatus(
                name=ep.name,
                version=getattr(dist, "version", "") or "",
                distribution=(dist.metadata["Name"] if dist is not None else "") or "",
                module=ep.value,
            )
            self.status[ep.name] = st
            if ep.name in deny or (allow is not None and ep.name not in allow):
                st.status = "disabled"
                st.error = "disabled by ZOO_LOAD_PLUGINS / ZOO_DISABLE_PLUGINS"
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure isolates the plugin
                self.fail(ep.name, exc, "import failed")
                continue
            self.register(plugin, ep.name, status=st)

    def register(self, plugin: Any, name: str, status: PluginStatus | None = None) -> None:
        """Register a plugin object by hand (tests, notebooks). Entry points are the normal path."""
        st = status or self.status.setdefault(name, PluginStatus(name=name, module=getattr(plugin, "__name__", "")))
        self.status[name] = st
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validates hook names and signatures here
            self.fail(name, exc, "registration failed")
            return
        st.hooks = sorted(impl_name for impl_name in _hook_names(self.pm, plugin))

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
    def impls(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin name, function) for every live implementation of a hook, in call order."""
        hook = getattr(self.pm.hook, hook_name)
        return [(impl.plugin_name, impl.function) for impl in reversed(hook.get_hookimpls())]

    def call_owner(self, owner: str, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a hook; None if it has none.

        Errors are wrapped in PluginError naming the plugin (strict mode re-raises as is).
        """
        for plugin_name, fn in self.impls(hook_name):
            if plugin_name != owner:
                continue
            try:
                return fn(**{k: kwargs[k] for k in _argnames(fn) if k in kwargs})
            except PluginError:
                raise
            except Exception as exc:
                if strict_plugins() or _is_zoo_error(exc):
                    raise
                raise PluginError(f"plugin {owner!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
        return None


def _is_zoo_error(exc: BaseException) -> bool:
    from .errors import ZooError

    return isinstance(exc, ZooError)


def _argnames(fn: Callable[..., Any]) -> tuple[str, ...]:
    code = getattr(fn, "__code__", None)
    if code is None:
        import inspect

        return tuple(inspect.signature(fn).parameters)
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def _hook_names(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return [caller.name for caller in (pm.get_hookcallers(plugin) or [])]


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
    """Forget loaded plugins and registries (tests; after installing a plugin at run time)."""
    global _host
    with _lock:
        _host = None
    from . import registry

    registry.reset()
