"""Runtime adapters: turn a torch module into something `zoo bench` can time.

Each adapter prepares a module for one mode ("infer", "train-frozen" use the module in eval
mode for features; "train-full" needs a trainable module) and returns a `Prepared`:
`to_input(x)` converts a torch batch to the runtime's native input once (outside the timed
region) and `run(inp)` is the timed call. Exports go to a private temp dir.

A runtime that cannot do something raises `Unsupported` (or any exception) from `prepare`;
the benchmark turns that into an error row and goes on.

Runtimes can also be given as "package.module:attribute" (a Runtime instance or class), which
is how tests plug in a deliberately broken one that must also resolve in a child process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

INFER, TRAIN_FROZEN, TRAIN_FULL = "infer", "train-frozen", "train-full"
MODES = (INFER, TRAIN_FROZEN, TRAIN_FULL)
PRECISIONS = ("fp32", "bf16", "fp16")


class Unsupported(Exception):
    """This runtime cannot run this mode/device (reported as the row's error)."""


@dataclass
class Prepared:
    run: Callable[[Any], Any]
    to_input: Callable[[Any], Any]
    to_torch: Callable[[Any], Any] = lambda out: out  # runtime output -> torch tensor
    trainable: Any = None  # for train-full: the module whose parameters the optimizer steps
    note: str = ""
    cleanup: Callable[[], None] = lambda: None


class Runtime:
    name = "?"
    modes: tuple[str, ...] = MODES
    precisions: tuple[str, ...] = PRECISIONS  # bf16/fp16: the timed call runs under torch.autocast
    devices: tuple[str, ...] = ("cpu", "cuda")

    def check_precision(self, precision: str, device: str) -> None:
        if precision not in self.precisions:
            raise Unsupported(f"runtime {self.name!r} runs {', '.join(self.precisions)} only, not {precision}")
        if precision == "bf16" and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_bf16_supported():
                raise Unsupported("this GPU has no bf16")

    def check(self, mode: str, device: str) -> None:
        if device.split(":")[0] not in self.devices:
            raise Unsupported(f"runtime {self.name!r} needs {' or '.join(self.devices)}, not {device}")
        if mode not in self.modes:
            raise Unsupported(f"runtime {self.name!r} does not support mode {mode!r} "
                              f"(supports: {', '.join(self.modes)})")

    def prepare(self, module, example, mode: str, device: str, threads: int) -> Prepared:
        raise NotImplementedError


def _identity(x):
    return x


class Eager(Runtime):
    name = "eager"

    def prepare(self, module, example, mode, device, threads):
        self.check(mode, device)
        return Prepared(run=module, to_input=_identity, trainable=module)


class ChannelsLast(Runtime):
    name = "channels_last"

    def prepare(self, module, example, mode, device, threads):
        import torch

        self.check(mode, device)
        module = module.to(memory_format=torch.channels_last)
        return Prepared(run=module, to_input=lambda x: x.contiguous(memory_format=torch.channels_last),
                        trainable=module)


class Compile(Runtime):
    """torch.compile with the default (inductor) backend; compilation happens on the first call,
    which the benchmark times as setup, not as a measurement. `compile_mode` is torch.compile's
    mode: "max-autotune" (kernel autotuning), "reduce-overhead" (CUDA graphs: the whole forward
    replayed as one graph launch, what batch-1 latency on a GPU needs)."""

    name = "compile"
    compile_mode: str | None = None

    def __init__(self, name: str = "compile", compile_mode: str | None = None, devices=("cpu", "cuda")):
        self.name, self.compile_mode, self.devices = name, compile_mode, tuple(devices)

    def prepare(self, module, example, mode, device, threads):
        import torch

        self.check(mode, device)
        torch._dynamo.reset()  # a fresh cache per measurement when running in-process
        compiled = torch.compile(module, dynamic=False, mode=self.compile_mode)
        if self.compile_mode == "reduce-overhead":
            # CUDA graphs reuse their output buffers: hand out a copy, as a caller keeping it would need
            return Prepared(run=lambda x: compiled(x).clone(), to_input=_identity, trainable=module,
                            note="CUDA graphs (mode reduce-overhead)")
        return Prepared(run=compiled, to_input=_identity, trainable=module,
                        note=f"mode {self.compile_mode}" if self.compile_mode else "")


class TorchScript(Runtime):
    """torch.jit.trace; frozen (torch.jit.freeze) for inference and frozen features. train-full
    traces the module in train mode without freezing, so autograd flows through the graph."""

    name = "torchscript"
    precisions = ("fp32",)  # a frozen traced graph ignores autocast

    def prepare(self, module, example, mode, device, threads):
        import torch

        self.check(mode, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == TRAIN_FULL:
                traced = torch.jit.trace(module, example, check_trace=False)
                return Prepared(run=traced, to_input=_identity, trainable=traced, note="traced (train mode)")
            with torch.no_grad():
                traced = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
        return Prepared(run=traced, to_input=_identity, note="traced+frozen")


class OnnxRuntime(Runtime):
    """torch.onnx.export (dynamic batch axis) to a temp dir + onnxruntime.InferenceSession with
    intra-op threads = the recorded thread count. Inference only (train-frozen runs the backbone
    here and the head step in torch); on CUDA it needs onnxruntime's CUDA provider."""

    name = "onnxruntime"
    modes = (INFER, TRAIN_FROZEN)
    precisions = ("fp32",)  # the exported graph is fp32; no fp16 conversion is done here

    def check(self, mode, device):
        if mode == TRAIN_FULL:
            raise Unsupported("onnxruntime runs inference only: no train-full (use train-frozen)")
        super().check(mode, device)

    def prepare(self, module, example, mode, device, threads):
        import numpy as np
        import onnxruntime as ort
        import torch

        self.check(mode, device)
        providers, provider_note = ["CPUExecutionProvider"], "CPU provider"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers, provider_note = ["CUDAExecutionProvider"], "CUDA provider"
            else:  # measured on the CPU provider, and the row says so (not an error row)
                provider_note = ("CPU provider: this onnxruntime has no CUDAExecutionProvider "
                                 "(pip install onnxruntime-gpu)")
        tmp = tempfile.mkdtemp(prefix="zoo-bench-onnx-")
        path = os.path.join(tmp, "model.onnx")
        exporter = export_onnx(module.eval(), example, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        name = session.get_inputs()[0].name

        def cleanup():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

        return Prepared(
            run=lambda inp: session.run(None, {name: inp})[0],
            to_input=lambda x: np.ascontiguousarray(x.detach().cpu().numpy()),
            to_torch=lambda out: torch.from_numpy(out).to(device),
            note=f"{provider_note}; onnx exporter: {exporter}" + ("; host numpy in/out" if device != "cpu" else ""),
            cleanup=cleanup,
        )


def export_onnx(module, example, path: str) -> str:
    """Export through the ONNX exporter plugin (zoo.exporting.bare_module_to_onnx: the graph path
    `zoo export` uses). Returns which torch exporter wrote it."""
    from zoo.errors import UnknownExporterError
    from zoo.exporting import bare_module_to_onnx

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            report = bare_module_to_onnx(module, example, path)
    except UnknownExporterError as exc:
        raise Unsupported(f"no 'onnx' exporter plugin is loaded ({exc})") from exc
    chosen = str(report.get("exporter", "?"))
    return f"{chosen} (fallback: {report['fallback']})" if report.get("fallback") else chosen


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Eager(), ChannelsLast(), Compile(), Compile("compile-max-autotune", "max-autotune"),
    Compile("compile-cudagraphs", "reduce-overhead", devices=("cuda",)), TorchScript(), OnnxRuntime())}
DEFAULT_RUNTIMES = ("eager", "channels_last", "torchscript", "onnxruntime")
# On a GPU compilation is seconds, not minutes, and CUDA graphs are what batch-1 latency needs.
DEFAULT_CUDA_RUNTIMES = DEFAULT_RUNTIMES + ("compile", "compile-cudagraphs")


def default_runtimes(device: str) -> tuple[str, ...]:
    return DEFAULT_CUDA_RUNTIMES if device.startswith("cuda") else DEFAULT_RUNTIMES


def get_runtime(name: str) -> Runtime:
    """A built-in runtime by name, or "package.module:attr" naming a Runtime (instance or class)."""
    if name in RUNTIMES:
        return RUNTIMES[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        obj = getattr(importlib.import_module(mod), attr)
        return obj() if isinstance(obj, type) else obj
    from zoo.errors import ZooError

    raise ZooError(f"unknown runtime {name!r}: expected one of {', '.join(RUNTIMES)} (or module:attr)")


def runtime_label(name: str) -> str:
    """The name shown in tables: built-ins as is, plug-in runtimes by their declared name."""
    if name in RUNTIMES:
        return name
    try:
        return get_runtime(name).name
    except Exception:  # noqa: BLE001
        return name
