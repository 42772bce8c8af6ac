"""`zoo doctor`: what this machine can do, as the first thing to paste into a bug report.

Versions of everything the zoo runs on, whether torch's dynamo ONNX exporter works (a real export
of a tiny random model, run back with ONNX Runtime), ONNX Runtime's providers, CUDA/MPS devices and
their bf16 support, the CPU and its threads, which images export validation will use, the feature
cache, and every plugin's status. Nothing is downloaded; it takes a few seconds plus importing torch.

Each finding that will change what the zoo does (a fallback, a missing package, a broken plugin)
is also one line in "problems", with the fix.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("backbone-zoo", "torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "scikit-image", "numpy", "pillow", "safetensors", "pluggy", "huggingface_hub")


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


def onnxruntime_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"available": False, "error": str(exc), "providers": []}
    return {"available": True, "version": ort.__version__, "providers": list(ort.get_available_providers()),
            "device": ort.get_device()}


def dynamo_export_probe() -> dict[str, Any]:
    """Export a tiny random CNN with torch's dynamo exporter (dynamic batch, opset 18, as `zoo
    export` does), run it with ONNX Runtime at batch 3 and compare with eager PyTorch."""
    import numpy as np
    import torch

    from zoo_onnx import DEFAULT_OPSET, MAX_BATCH, dynamo_unavailable_reason

    reason = dynamo_unavailable_reason()
    if reason:
        return {"works": False, "error": reason}
    t0 = time.perf_counter()
    try:
        import onnxruntime as ort

        from .exporting import quiet

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
        x = torch.randn(3, 3, 8, 8)
        with quiet(), torch.no_grad():
            program = torch.onnx.export(net, (x[:2],), None, dynamo=True, opset_version=DEFAULT_OPSET,
                                        input_names=["input"], output_names=["out"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},))
            blob = program.model_proto.SerializeToString()
            expected = net(x).numpy()
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        return {"works": diff <= 1e-4, "max_abs_diff": diff, "seconds": round(time.perf_counter() - t0, 2),
                **({} if diff <= 1e-4 else {"error": f"ONNX Runtime disagrees with eager by {diff:.2e}"})}
    except Exception as exc:  # noqa: BLE001 - the probe's job is to report, not to crash
        return {"works": False, "error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}",
                "seconds": round(time.perf_counter() - t0, 2)}


PROBE_TIMEOUT_S = 120


def start_probe():
    """The export probe in a child process, started first so it runs while the rest is gathered
    (and so an exporter that crashes or hangs cannot take the doctor down with it)."""
    import subprocess

    code = "import json, zoo.doctor as d; print(json.dumps(d.dynamo_export_probe()))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_probe(proc) -> dict[str, Any]:
    import json
    import subprocess

    try:
        out, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"works": False, "error": f"the export probe did not finish in {PROBE_TIMEOUT_S}s"}
    lines = out.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"works": False, "error": f"the export probe crashed (exit code {proc.returncode}): {tail[:300]}"}


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
    from dataclasses import asdict

    from .plugin import registry
    from .plugin.host import get_host

    host = get_host()
    for load in (registry.backbones, registry.exporters):  # registration is where most failures show
        try:
            load()
        except Exception:  # noqa: BLE001 - strict mode raises; the statuses still say which plugin
            pass
    return [asdict(s) for s in sorted(host.status.values(), key=lambda s: s.name)]


# -- the report -------------------------------------------------------------------------------------------
def problems(report: dict[str, Any]) -> list[str]:
    out = []
    pk = report["packages"]
    if not pk.get("onnxscript"):
        out.append("onnxscript is not installed: ONNX exports fall back to the TorchScript-based exporter "
                   "(pip install onnxscript)")
    probe = report["onnx_export"]["dynamo"]
    if pk.get("onnxscript") and probe.get("works") is False:
        out.append(f"the dynamo ONNX exporter does not work here ({probe.get('error')}); `zoo export` falls back "
                   "to the TorchScript-based exporter")
    if not report["validation_images"]["scikit_image"]:
        out.append("scikit-image is not installed: export validation uses synthetic images only "
                   "(pip install scikit-image, or pass --images DIR)")
    if not report["onnxruntime"].get("available"):
        out.append("onnxruntime cannot be imported: no ONNX validation, `zoo predict` or onnxruntime benchmarks")
    for p in report["plugins"]:
        if p.get("status") == "broken":
            out.append(f"plugin {p.get('name')!r} is broken: {p.get('error')}")
    return out


def collect(probe: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    child = start_probe() if probe else None
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": packages(),
        "cpu": cpu(),
        "devices": devices(),
        "onnxruntime": onnxruntime_info(),
        "validation_images": validation_images(),
        "cache": cache(),
        "plugins": plugins(),
    }
    report["onnx_export"] = {"dynamo": finish_probe(child) if child else {"works": None, "error": "not probed (--no-probe)"}}
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
    pk, c, d, ort, probe = (report["packages"], report["cpu"], report["devices"], report["onnxruntime"],
                            report["onnx_export"]["dynamo"])
    lines = [f"python       {report['python']} ({report['platform']})",
             "packages     " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
             "missing      " + (", ".join(k for k, v in pk.items() if not v and k != "onnxruntime-gpu") or "-"),
             f"cpu          {c['model']}; {c['logical_cores']} logical / {c['physical_cores']} physical cores, "
             f"affinity {c['affinity']}; torch threads {c['torch_threads']}; capability {c['capability']}"]
    if d["cuda"]:
        for g in d["cuda"]:
            lines.append(f"cuda:{g['index']}       {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, "
                         f"bf16 {'yes' if g['bf16'] else 'no'}); CUDA {d['cuda_version']}")
    else:
        lines.append(f"cuda         none visible (torch built with CUDA {d['cuda_version']})")
    lines.append(f"mps          {'available' if d['mps_available'] else 'no'}; --device auto -> {d['auto_device']}")
    lines.append(f"onnxruntime  {ort.get('version', 'unavailable')}; providers {', '.join(ort.get('providers', [])) or '-'}")
    if probe.get("works") is None:
        lines.append(f"onnx export  {probe.get('error')}")
    elif probe.get("works"):
        lines.append(f"onnx export  dynamo exporter works (tiny model, ORT max |diff| {probe['max_abs_diff']:.1e}, "
                     f"{probe['seconds']}s)")
    else:
        lines.append(f"onnx export  dynamo exporter NOT working: {probe.get('error')}")
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
