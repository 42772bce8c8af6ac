"""`zoo doctor`: what this machine can do, as the first thing to paste into a bug report.

Versions of everything the zoo runs on, CUDA/MPS devices and their bf16 support, the CPU and its
threads, which images export validation will use, the feature cache, every plugin's status (from the
listing index: no plugin is imported for it), and each exporter's own self-check, asked through the
plugin API (`zoo.Exporter.self_check`: its runtime, and a real export of a tiny model unless
--no-probe). The self-checks run in one child process started first, so they overlap the rest and an
exporter that crashes or hangs cannot take the doctor down. Nothing is downloaded; it takes a few
seconds plus the exporters' probes.

Each finding that will change what the zoo does (a fallback, a missing package, a broken plugin)
is also one line in "problems", with the fix.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from typing import Any

PACKAGES = ("backbone-zoo", "torch", "torchvision", "timm", "scikit-image", "numpy", "pillow", "safetensors", "pluggy",
            "huggingface_hub")  # an exporter's own requirements come from its `Exporter.requires`


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -- sections ------------------------------------------------------------------------------------------
def packages() -> dict[str, str | None]:
    return {dist: _version(dist) for dist in PACKAGES}


def cpu() -> dict[str, Any]:
    import torch

    from .bench.env import cpu_model, physical_cores

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"model": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "affinity": affinity, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "capability": capability}


def devices() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
                           "cuda": [], "mps_available": False}
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            with torch.cuda.device(i):
                bf16 = bool(torch.cuda.is_bf16_supported())
            out["cuda"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(props.total_memory / 2 ** 30, 1), "bf16": bf16})
    mps = getattr(torch.backends, "mps", None)
    out["mps_available"] = bool(mps is not None and mps.is_available())
    from .device import select_device

    out["auto_device"] = str(select_device("auto"))
    return out


PROBE_TIMEOUT_S = 120


def exporter_checks(probe: bool = True) -> dict[str, Any]:
    """Every exporter's `self_check(probe)`, with its plugin, its requirements' versions and the time
    it took (run in the doctor's child process; callable directly)."""
    from .plugin import registry
    from .plugin.api import SelfCheck

    reg = registry.exporters()
    out: dict[str, Any] = {}
    for name in reg.names():
        exporter = reg.get(name)
        t0 = time.perf_counter()
        try:
            result = exporter.self_check(probe=probe)
            if result is None:
                entry: dict[str, Any] = {"ok": None, "summary": "no self-check", "problems": [], "details": {}}
            elif isinstance(result, SelfCheck):
                entry = result.to_dict()
            else:
                entry = {"ok": False, "summary": "", "details": {},
                         "problems": [f"self_check() returned {type(result).__name__}, not zoo.SelfCheck: fix the "
                                      f"plugin {reg.owner(name)!r}"]}
        except Exception as exc:  # noqa: BLE001 - a self-check reports, it never takes the doctor down
            entry = {"ok": False, "summary": "", "details": {},
                     "problems": [f"self_check() raised {type(exc).__name__}: {str(exc)[:300]} (plugin "
                                  f"{reg.owner(name)!r})"]}
        entry.update(plugin=reg.owner(name), requires={d: _version(d) for d in exporter.requires},
                     seconds=round(time.perf_counter() - t0, 2))
        out[name] = entry
    return out


def start_checks(probe: bool = True) -> Any:
    """The exporters' self-checks in a child process, started first so they run while the rest is gathered."""
    import subprocess

    code = f"import json, zoo.doctor as d; print(json.dumps(d.exporter_checks(probe={bool(probe)}), default=str))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_checks(proc: Any) -> dict[str, Any]:
    import json
    import subprocess

    def failed(why: str) -> dict[str, Any]:
        return {"*": {"ok": False, "summary": why, "problems": [why], "details": {}, "plugin": "", "requires": {}}}

    try:
        out, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return failed(f"the exporters' self-checks did not finish in {PROBE_TIMEOUT_S}s (run `zoo doctor --no-probe`)")
    lines = out.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        tail = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return failed(f"the exporters' self-checks crashed (exit code {proc.returncode}): {tail[:300]}")


def validation_images() -> dict[str, Any]:
    try:
        import skimage  # noqa: F401

        present = True
    except ImportError:
        present = False
    return {"scikit_image": present,
            "default_images": "a run's own validation split (up to 64 images); otherwise "
                              + ("scikit-image sample photos + synthetic" if present else "synthetic only")}


def cache() -> dict[str, Any]:
    from .features import cache_root

    root = cache_root()
    size = files = 0
    if root.is_dir():
        for dirpath, _, names in os.walk(root):
            for n in names:
                try:
                    size += os.path.getsize(os.path.join(dirpath, n))
                    files += 1
                except OSError:
                    continue
    return {"dir": str(root), "from": "ZOO_CACHE_DIR" if os.environ.get("ZOO_CACHE_DIR") else "default",
            "exists": root.is_dir(), "size_bytes": size, "files": files}


def plugins() -> list[dict[str, Any]]:
    """Every plugin's status, from the listing index when it is current (no plugin imported)."""
    from dataclasses import asdict

    from . import index

    try:
        statuses = index.plugin_statuses(index.catalog())
    except Exception:  # noqa: BLE001 - strict mode raises; the live statuses still say which plugin
        from .plugin.host import get_host

        statuses = list(get_host().status.values())
    return [asdict(s) for s in sorted(statuses, key=lambda s: s.name)]


# -- the report -------------------------------------------------------------------------------------------
def problems(report: dict[str, Any]) -> list[str]:
    out = []
    if not report["validation_images"]["scikit_image"]:
        out.append("scikit-image is not installed: export validation uses synthetic images only "
                   "(pip install scikit-image, or pass --images DIR)")
    for name, check in sorted(report["exporters"].items()):
        out.extend(f"exporter {name!r}: {p}" for p in check.get("problems") or [])
    for p in report["plugins"]:
        if p.get("status") in ("broken", "conflict"):
            out.append(f"plugin {p.get('name')!r} is {p.get('status')}: {p.get('error')}")
    return out


def collect(probe: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    child = start_checks(probe)
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": packages(),
        "cpu": cpu(),
        "devices": devices(),
        "validation_images": validation_images(),
        "cache": cache(),
        "plugins": plugins(),
    }
    report["exporters"] = finish_checks(child)
    for check in report["exporters"].values():  # what each exporter needs, beside the core's packages
        for dist, version in (check.get("requires") or {}).items():
            report["packages"].setdefault(dist, version)
        for dist, version in ((check.get("details") or {}).get("packages") or {}).items():
            report["packages"].setdefault(dist, version)
    report["problems"] = problems(report)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(report: dict[str, Any]) -> str:
    pk, c, d = report["packages"], report["cpu"], report["devices"]
    lines = [f"python       {report['python']} ({report['platform']})",
             "packages     " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
             "missing      " + (", ".join(k for k, v in pk.items() if not v and not k.endswith("-gpu")) or "-"),
             f"cpu          {c['model']}; {c['logical_cores']} logical / {c['physical_cores']} physical cores, "
             f"affinity {c['affinity']}; torch threads {c['torch_threads']}; capability {c['capability']}"]
    if d["cuda"]:
        for g in d["cuda"]:
            lines.append(f"cuda:{g['index']}       {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, "
                         f"bf16 {'yes' if g['bf16'] else 'no'}); CUDA {d['cuda_version']}")
    else:
        lines.append(f"cuda         none visible (torch built with CUDA {d['cuda_version']})")
    lines.append(f"mps          {'available' if d['mps_available'] else 'no'}; --device auto -> {d['auto_device']}")
    unchecked = []
    for name, check in sorted(report["exporters"].items()):
        if check.get("ok") is None and check.get("summary") == "no self-check":
            unchecked.append(name)
            continue
        state = {True: "ok", False: "NOT working", None: "not checked"}[check.get("ok")]
        lines.append(f"exporter     {name} (plugin {check.get('plugin') or '?'}): {state}"
                     + (f": {check['summary']}" if check.get("summary") else ""))
    if unchecked:
        lines.append(f"exporter     {', '.join(unchecked)}: no self-check")
    lines.append(f"validation   {report['validation_images']['default_images']}")
    ca = report["cache"]
    lines.append(f"cache        {ca['dir']} ({ca['from']}; "
                 + (f"{_size(ca['size_bytes'])} in {ca['files']} files)" if ca["exists"] else "not created yet)"))
    for p in report["plugins"]:
        exporters = p.get("exporters") or []
        exporters = ", ".join(exporters) if isinstance(exporters, list) else f"{exporters}"
        lines.append(f"plugin       {p['name']} {p.get('version') or ''} ({p.get('distribution') or '?'}): {p['status']}, "
                     f"{p.get('backbones', 0)} backbones, exporters: {exporters or '-'}"
                     + (f": {p.get('error')}" if p["status"] != "ok" else ""))
    lines.append("problems     " + ("none" if not report["problems"] else ""))
    lines.extend(f"  - {p}" for p in report["problems"])
    return "\n".join(lines)
