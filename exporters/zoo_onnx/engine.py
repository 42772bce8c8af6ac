"""The onnxruntime extraction engine (`zoo train --engine onnxruntime`): the frozen backbone
exported to ONNX and run by ONNX Runtime (its CUDA provider on a GPU, where installed).

Registered from this plugin's `zoo_register_engines` hook, so the zoo core names no ONNX: the
feature wing sees an `zoo.ExtractionEngine` like any other, checked against eager fp32 on each
job's first batch. The export is cached under the engine workdir the zoo gives
(`<cache>/engines/onnx/`), keyed by the module's architecture and state (zoo.digest), so a second
job on the same backbone prepares in a second; `prepare_seconds` says so, and `auto` weighs an
export that is not cached against what it would save on the job.

The graph is traced with the TorchScript-based exporter (opset 17) first: for extraction any
correct graph serves (the check compares it with eager), and it exports ResNet-18 in about half
the time the dynamo exporter takes (EfficientNet-Lite0 about a third); its onnxscript pass, which
imports `onnx` only to re-serialize a graph a backbone never needs it for, is skipped
(`_no_onnxscript_pass`: 1.5 s -> 0.45 s for ResNet-18). The dynamo path is the fallback. Nothing here imports torch or onnxruntime until an engine is prepared.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import tempfile
import threading
import warnings
from pathlib import Path

from zoo import EngineRejected, ExtractionEngine, PreparedEngine

ENGINE_OPSET = 17


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def module_digest(module) -> str:
    """The export's file name: the module's architecture, state and the torch that traced it."""
    import torch

    from zoo.digest import state_digest

    return hashlib.sha256(f"{type(module).__qualname__}|{state_digest(module)}|{torch.__version__}".encode()
                          ).hexdigest()[:24]


class OnnxRuntimeEngine(ExtractionEngine):
    """The backbone exported to ONNX, run by ONNX Runtime (CPU provider; CUDA provider on a GPU)."""

    name = "onnxruntime"
    description = "the backbone exported to ONNX, run by ONNX Runtime (export cached per backbone state)"
    prior_speedup = 1.5  # measured 1.5-1.7x channels_last on 2-core CPUs (ResNet-18), more for Lite0

    def unavailable(self, device) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "not installed (pip install onnxruntime)"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this build has no CUDAExecutionProvider (pip install onnxruntime-gpu); a CPU session would " \
                   "starve the GPU"
        return None

    def prepare_seconds(self, backbone, workdir) -> float | None:
        if workdir is not None and (Path(workdir) / f"{module_digest(backbone)}.onnx").is_file():
            return 0.0  # exported before: a session loads in well under a second
        # Not measured here yet (the zoo remembers what an export took once it has run one): about
        # 0.9 s plus 1 ms per module with the TorchScript-based exporter and no onnxscript pass, in
        # a thread beside the job's extraction on 2 CPU cores, the session included (measured
        # 1.04-1.15 s for ResNet-18, 1.13 s for EfficientNet-Lite0; torch 2.14; 2.0-2.1 s with the pass).
        return 0.9 + 0.001 * sum(1 for _ in backbone.modules())

    def prepare(self, backbone, example, device, *, workdir, threads) -> PreparedEngine:
        import onnxruntime as ort
        import torch

        why = self.unavailable(device)
        if why:
            raise EngineRejected(why)
        providers, note = ["CPUExecutionProvider"], "CPU provider"
        if device.type == "cuda":
            providers, note = ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA provider"
        tmp = None
        if workdir is None:
            tmp = tempfile.mkdtemp(prefix="zoo-engine-")
            workdir = tmp
        path = Path(workdir) / f"{module_digest(backbone)}.onnx"
        if not path.is_file():
            _export(backbone, example, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: during extraction the decoding workers share
        # the cores, and a spinning ORT thread takes a core from the worker feeding it its next batch.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a damaged or unloadable export is a rejection, not a crash
            path.unlink(missing_ok=True)
            raise EngineRejected(f"session failed: {_first_line(exc)}") from exc
        name = session.get_inputs()[0].name

        def run(x):
            out = session.run(None, {name: x.detach().float().contiguous().cpu().numpy()})[0]
            return torch.from_numpy(out).flatten(1)

        def cleanup():
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)

        return PreparedEngine(run, note=note, cleanup=cleanup)


@contextlib.contextmanager
def _quiet():
    """The exporter's chatter silenced. sys.stdout/stderr and the warning filters are the whole
    process's: in a background thread (auto prepares an export beside the extraction) swapping them
    would swallow or clobber the main thread's output, so there only the exporter's own loggers are
    quietened and its warnings are left to the filters in force."""
    if threading.current_thread() is threading.main_thread():
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
        return
    me, shown = threading.current_thread(), warnings.showwarning

    def show(*args, **kwargs):  # this thread's warnings dropped, every other thread's shown as before
        if threading.current_thread() is not me:
            shown(*args, **kwargs)

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_onnxscript_pass():
    """The TorchScript-based exporter with its last pass skipped, in this thread only.

    Why: after building the graph, torch's TorchScript-based exporter always imports the `onnx`
    package, parses the serialized model back and re-serializes it, to insert the onnxscript
    functions of custom ops (`onnx_proto_utils._add_onnxscript_fn`). A backbone has none, and
    importing `onnx` costs 0.6-0.9 s of CPU on its own (ml_dtypes registers its numpy loops), so
    that pass was two thirds of the engine's export (ResNet-18: 1.5 s -> 0.45 s, on 2 cores, idle),
    CPU taken from the job's extraction beside it. Other threads still get the pass (a user's own
    export meanwhile is untouched); where torch is laid out differently nothing is skipped. A graph
    that needed the pass fails to load in ONNX Runtime or fails the check against eager: the engine
    is then rejected, never wrong."""
    target = None
    for where in ("torch.onnx._internal.torchscript_exporter.onnx_proto_utils", "torch.onnx._internal.onnx_proto_utils"):
        with contextlib.suppress(ImportError):
            target = importlib.import_module(where)
            if callable(getattr(target, "_add_onnxscript_fn", None)):
                break
            target = None
    if target is None:
        yield
        return
    original, me = target._add_onnxscript_fn, threading.current_thread()

    def passthrough(model_bytes, custom_opsets, *args, **kwargs):
        if threading.current_thread() is me:
            return model_bytes
        return original(model_bytes, custom_opsets, *args, **kwargs)

    with _PATCH_LOCK:
        target._add_onnxscript_fn = passthrough
    try:
        yield
    finally:
        with _PATCH_LOCK:
            if target._add_onnxscript_fn is passthrough:
                target._add_onnxscript_fn = original


_PATCH_LOCK = threading.Lock()


def _export_lean(module, example, path: Path) -> None:
    """The TorchScript-based exporter straight to `path` (dynamic batch, "input" -> "output")."""
    import torch

    with torch.no_grad(), _no_onnxscript_pass():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=ENGINE_OPSET,
                          input_names=["input"], output_names=["output"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def _export(backbone, example, path: Path) -> None:
    """Dynamic-batch export, atomically: the TorchScript-based exporter first (fast, and without
    its onnxscript pass: `_no_onnxscript_pass`), dynamo if it fails; any failure rejects the
    engine (eager and the others remain)."""
    import torch

    from zoo.io import atomic_path

    from . import export_module

    module = backbone.to(memory_format=torch.contiguous_format).eval()
    errors = []
    try:
        for how in ("legacy", "auto"):
            try:
                with torch.inference_mode(False), atomic_path(path) as tmp, _quiet():
                    x = example[:2].detach().float().cpu().clone()  # a normal tensor, even from inference mode
                    if how == "legacy":
                        _export_lean(module.to("cpu"), x, tmp)
                    else:
                        export_module(module.to("cpu"), x, tmp, onnx_exporter=how)
                return
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{how}: {_first_line(exc)}")
        raise EngineRejected("ONNX export failed; " + "; ".join(errors))
    finally:
        backbone.to(example.device)
