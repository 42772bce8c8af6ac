"""The plugin manager: discovers plugins through the `zoo` entry-point group, isolates broken ones.

Environment:
  ZOO_LOAD_PLUGINS=a,b     load only these entry points (empty string: load none)
  ZOO_DISABLE_PLUGINS=a,b  never load these
  ZOO_STRICT_PLUGINS=1     re-raise the first plugin failure instead of isolating it
  ZOO_PLUGIN_TIMEOUT=S     give up on a plugin whose import or registration hook makes no progress for
                           S seconds (default 10; 0 = no limit; at most max(10 x S, 120 s) in all): it is
                           reported broken, the command goes on
  ZOO_PROVIDERS=n=p,...    which plugin owns a backbone provider or export format name `n` that several
                           third-party plugins claim (p: the plugin's entry-point or distribution name)
An entry of ZOO_LOAD_PLUGINS / ZOO_DISABLE_PLUGINS / ZOO_PROVIDERS that names no installed plugin is warned
about, naming the variable.

Time limit: a Python import cannot be interrupted, so each plugin's import and each of its
registration hooks run in a daemon thread the host waits on. "Progress" is a module being imported
anywhere in the process or the thread using CPU, so a plugin's slow first `import torch` (or a busy
machine) is not taken for a hang; one that sleeps, waits on the network or deadlocks is given up on
after ZOO_PLUGIN_TIMEOUT seconds, and one that keeps computing after ten times that (120 s at least). The abandoned thread is a daemon, so the process still exits; nothing
it returns later is used (registration is staged in the thread and committed by the caller).

pluggy does the work: discovery (entry points), validation (`check_pending` rejects an
implementation whose name is no hook), and dispatch (each plugin's hook is called on its own
through `subset_hook_caller`, so the zoo knows which plugin registered what, and one plugin's
failure is its own). Plugins shipped in backbone-zoo's own distribution are "built-in": they are
registered first, so no other plugin can take their names, whatever the entry-point order.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import pluggy

from ..errors import PluginError
from . import hookspecs

ENTRY_POINT_GROUP = "zoo"
DISTRIBUTION = "backbone-zoo"  # plugins shipped in this distribution are the built-ins
ENV_LOAD, ENV_DISABLE = "ZOO_LOAD_PLUGINS", "ZOO_DISABLE_PLUGINS"
ENV_TIMEOUT, ENV_PROVIDERS = "ZOO_PLUGIN_TIMEOUT", "ZOO_PROVIDERS"
DEFAULT_TIMEOUT_S = 10.0
HARD_LIMIT_FACTOR, HARD_LIMIT_MIN_S = 10, 120.0  # busy or not, given up on after max(10 x limit, 120 s)
T = TypeVar("T")


class PluginEnvWarning(UserWarning):
    """ZOO_LOAD_PLUGINS / ZOO_DISABLE_PLUGINS / ZOO_PROVIDERS names a plugin that is not installed."""


class PluginTimeout(PluginError):
    """A plugin's import or registration did not finish within ZOO_PLUGIN_TIMEOUT."""


def strict_plugins() -> bool:
    return os.environ.get("ZOO_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


def plugin_timeout() -> float | None:
    """ZOO_PLUGIN_TIMEOUT in seconds (default 10); None for no limit (0, "none" or "off")."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip().lower()
    if not raw:
        return DEFAULT_TIMEOUT_S
    if raw in ("0", "none", "off"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise PluginError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set e.g. {ENV_TIMEOUT}=30 "
                          "(0 for no limit)") from None
    if value < 0 or value != value:
        raise PluginError(f"{ENV_TIMEOUT}={raw!r} must be >= 0 seconds (0 for no limit)")
    return value or None


def provider_choices() -> dict[str, str]:
    """ZOO_PROVIDERS as {provider or format name: plugin (entry-point or distribution name)}."""
    out: dict[str, str] = {}
    for item in (os.environ.get(ENV_PROVIDERS) or "").split(","):
        if not item.strip():
            continue
        name, sep, plugin = item.partition("=")
        if not sep or not name.strip() or not plugin.strip():
            raise PluginError(f"{ENV_PROVIDERS} entry {item.strip()!r} is not NAME=PLUGIN; write e.g. "
                              f"{ENV_PROVIDERS}=lite=zoo-lite-plugin (several: comma-separated)")
        out[name.strip()] = plugin.strip()
    return out


def _cpu_clock(thread: threading.Thread) -> int | None:
    """The thread's CPU-time clock (Linux and most Unixes), or None where there is none."""
    try:
        return time.pthread_getcpuclockid(thread.ident or 0)
    except (AttributeError, OSError, OverflowError):
        return None


def _cpu_seconds(clock: int | None) -> float:
    if clock is None:
        return 0.0
    try:
        return time.clock_gettime(clock)
    except OSError:  # the thread has just ended
        return 0.0


def run_limited(fn: Callable[[], T], what: str, timeout: float | None = None) -> T:
    """`fn()` in a daemon thread, waited on while it makes progress (see the module docstring);
    PluginTimeout once it has made none for `timeout` seconds (default: ZOO_PLUGIN_TIMEOUT)."""
    limit = plugin_timeout() if timeout is None else (timeout or None)
    if limit is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"zoo-plugin: {what}", daemon=True)
    start = last = time.monotonic()
    seen = len(sys.modules)
    worker.start()
    cpu_clock = _cpu_clock(worker)
    cpu = _cpu_seconds(cpu_clock)
    while True:
        worker.join(min(0.1, limit))
        if not worker.is_alive():
            break
        now, count, used = time.monotonic(), len(sys.modules), _cpu_seconds(cpu_clock)
        if count != seen or used > cpu + 0.01:  # importing, or computing: alive (a hang sleeps or waits)
            seen, cpu, last = count, max(cpu, used), now
        if now - last >= limit or now - start >= max(HARD_LIMIT_FACTOR * limit, HARD_LIMIT_MIN_S):
            raise PluginTimeout(
                f"{what} did not finish within {limit:g}s ({ENV_TIMEOUT}; it was abandoned and the command went "
                f"on without it); fix the plugin, or raise the limit, e.g. {ENV_TIMEOUT}={max(30, int(limit * 3))}")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


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
    status: str = "ok"  # ok | broken | disabled | conflict
    error: str = ""
    conflicts: list[str] = field(default_factory=list)  # the other plugins claiming one of its names
    providers: list[str] = field(default_factory=list)  # backbone provider names it owns
    backbones: int = 0
    exporters: list[str] = field(default_factory=list)  # format names it owns
    engines: list[str] = field(default_factory=list)  # extraction engine names it owns

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
        _warn_unknown_choices(provider_choices(), eps)
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
                plugin = run_limited(ep.load, f"plugin {ep.name!r} ({ep.value}): import")
            except PluginTimeout as exc:
                self.fail(ep.name, exc, "import timed out")
                continue
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

    def fail(self, name: str, exc: BaseException, during: str, status: str = "broken",
             conflicts: list[str] | None = None) -> None:
        """Record that plugin `name` is broken (or, with status="conflict", held out because another
        plugin claims one of its names); in strict mode raise instead."""
        st = self.status.setdefault(name, PluginStatus(name=name))
        st.mark_broken(exc, during)
        st.status = status
        st.conflicts = sorted(conflicts or [])
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        if strict_plugins():
            if isinstance(exc, PluginError):
                raise exc
            raise PluginError(f"plugin {name!r}: {during}: {exc}") from exc

    def matches(self, name: str, who: str) -> bool:
        """Whether `who` (an entry-point or distribution name) names plugin `name`."""
        st = self.status.get(name)
        return _norm(who) == _norm(name) or (st is not None and bool(st.distribution)
                                             and _norm(who) == _norm(st.distribution))

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


def _norm(name: str) -> str:
    """Plugin and distribution names compare as pip compares distribution names."""
    return name.strip().lower().replace("_", "-")


def _warn_unknown_choices(choices: dict[str, str], eps: list[md.EntryPoint]) -> None:
    known = {_norm(ep.name) for ep in eps} | {_norm(_dist_name(ep)) for ep in eps if _dist_name(ep)}
    for name, who in sorted(choices.items()):
        if _norm(who) not in known:
            warnings.warn(f"{ENV_PROVIDERS} gives {name!r} to {who!r}, which matches no installed plugin "
                          f"(entry points: {', '.join(sorted(ep.name for ep in eps)) or 'none'}); check the "
                          f"spelling: until then no plugin gets {name!r}", PluginEnvWarning, stacklevel=4)


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


def call_hook(host: PluginHost, hook_name: str, stage: Callable[[str, list[Any]], T]) -> dict[str, T]:
    """Run a registration hook plugin by plugin (built-ins first), under the time limit: each
    plugin gets its own `register` list, and `stage(plugin_name, registered)` (which checks what it
    registered and must change nothing shared) runs in the same limited call. Returns the staged
    values by plugin; a plugin whose hook or staging raises or times out is marked broken."""
    out: dict[str, T] = {}
    for name in list(host.implementers(hook_name)):
        def one(name: str = name) -> T:
            registered: list[Any] = []
            host.call_one(name, hook_name, register=registered.append)
            return stage(name, registered)

        try:
            out[name] = run_limited(one, f"plugin {name!r}: {hook_name}")
        except Exception as exc:  # noqa: BLE001 - isolate the plugin, whatever it raised
            host.fail(name, exc, hook_name + (" timed out" if isinstance(exc, PluginTimeout) else ""))
            continue
    return out
