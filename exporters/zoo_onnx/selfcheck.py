"""`zoo doctor`'s question to the ONNX exporter: can this machine export and run ONNX?

The packages (onnx, onnxscript, onnxruntime) and ONNX Runtime's providers, and with `probe` a real
export of a tiny random CNN with torch's dynamo exporter (dynamic batch, opset 18, as `zoo export`
does), run back with ONNX Runtime at batch 3 and compared with eager PyTorch. The doctor runs it in
a child process, so an exporter that crashes or hangs cannot take the doctor down.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

from zoo import SelfCheck


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def onnxruntime_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"available": False, "error": str(exc), "providers": []}
    return {"available": True, "version": ort.__version__, "providers": list(ort.get_available_providers()),
            "device": ort.get_device()}


def dynamo_export_probe() -> dict[str, Any]:
    """Export a tiny random CNN with the dynamo exporter, run it with ONNX Runtime, compare."""
    import numpy as np
    import torch

    from zoo.exporting import quiet
    from zoo_onnx import DEFAULT_OPSET, MAX_BATCH, dynamo_unavailable_reason

    reason = dynamo_unavailable_reason()
    if reason:
        return {"works": False, "error": reason}
    t0 = time.perf_counter()
    try:
        import onnxruntime as ort

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


def self_check(probe: bool = True) -> SelfCheck:
    packages = {d: _version(d) for d in ("onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu")}
    ort = onnxruntime_info()
    dynamo = dynamo_export_probe() if probe else {"works": None, "error": "not probed (--no-probe)"}
    problems = []
    if not packages["onnxscript"]:
        problems.append("onnxscript is not installed: ONNX exports fall back to the TorchScript-based exporter "
                        "(pip install onnxscript)")
    elif dynamo.get("works") is False:
        problems.append(f"the dynamo ONNX exporter does not work here ({dynamo.get('error')}); `zoo export` falls "
                        "back to the TorchScript-based exporter")
    if not ort.get("available"):
        problems.append("onnxruntime cannot be imported: no ONNX validation, `zoo predict` or onnxruntime "
                        "benchmarks (pip install onnxruntime)")
    if dynamo.get("works"):
        probe_text = (f"dynamo exporter works (tiny model, ORT max |diff| {dynamo['max_abs_diff']:.1e}, "
                      f"{dynamo['seconds']}s)")
    elif dynamo.get("works") is None:
        probe_text = str(dynamo.get("error"))
    else:
        probe_text = f"dynamo exporter NOT working: {dynamo.get('error')}"
    summary = (f"{probe_text}; onnxruntime {ort.get('version', 'unavailable')} "
               f"(providers {', '.join(ort.get('providers', [])) or '-'})")
    ok = None if not probe and not problems else not problems
    return SelfCheck(ok=ok, summary=summary, problems=tuple(problems),
                     details={"packages": packages, "onnxruntime": ort, "dynamo": dynamo})
