"""Extraction engines: ways to run a frozen backbone's forward pass, each checked against eager fp32.

Feature extraction is a pure function of the image, so the trainer may compute it with whatever
runs fastest here, provided the answer stays the same. Engines:

  eager          the module as is, NCHW fp32: the reference every other engine is checked against
  channels_last  NHWC memory format, fp32 (oneDNN / cuDNN pick faster kernels for it)
  bf16           channels_last under bf16 autocast (CUDA; CPU where oneDNN has native bf16)
  onnxruntime    the backbone exported to ONNX, run by ONNX Runtime (CUDA provider where installed)
  compile        torch.compile (inductor): minutes of compilation, so `auto` tries it on large jobs only

The check (first batch; eager fp32 computes its first CHECK_ROWS rows, FP32_CHECK_ROWS when one
fp32 engine is remembered or asked): each row's cosine similarity to eager fp32 must be >= 0.9999 for fp32
engines, >= 0.99 for bf16 (BF16_COSINE, the documented bound for reduced precision; the trainer
also reports whether the trained head's predictions on the check batch are unchanged). An engine
that fails its check, or cannot be prepared, is rejected with a one-line reason and the next one
is used; eager is always available.

`auto` uses a remembered choice when there is one; otherwise, on fewer than PROBE_MIN_IMAGES
images it is channels_last (checked; probing would cost more than it saves), and on more it times
each eligible engine on the first batch (after the check) and picks the fastest; the
choice is remembered in ``<cache>/engines/choices.json`` per machine (host, CPU, threads, torch
version, device), backbone state and batch size, so later runs skip the probe (the check still runs).

Numerics: fp32 engines agree to cosine >= 0.9999 and share the cache key's "numerics": "fp32";
bf16 features are rounded differently and are cached under "bf16" (never mixed with fp32 ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ZooError

ENGINES = ("eager", "channels_last", "bf16", "onnxruntime", "compile")
ENGINE_CHOICES = ("auto",) + ENGINES
FP32_COSINE = 0.9999
BF16_COSINE = 0.99
COMPILE_MIN_IMAGES = 20000  # below this, compilation costs more than it saves (CPU: minutes)
CHECK_ROWS = 16  # rows of the first batch that eager fp32 also computes (it is the slowest engine)
FP32_CHECK_ROWS = 4  # ... for one remembered or asked fp32 engine: a broken engine disagrees on every image
PROBE_MIN_IMAGES = 500  # below this, a probe (an ONNX export...) costs more than it saves: channels_last


class NonFiniteFeatures(ZooError):
    """The backbone gave NaN/inf features for some rows of a batch (the caller names their files)."""

    def __init__(self, engine: str, rows: list[int]):
        self.engine, self.rows = engine, list(rows)
        super().__init__(f"the backbone's {engine} features contain NaN/inf for {len(self.rows)} image(s) of the "
                         "batch: the weights or those images are broken; check the weights file and the images")


class EngineRejected(RuntimeError):
    """An engine could not be prepared here, or its features disagree with eager fp32."""


@dataclass
class Prepared:
    """A ready engine: run(x) takes a normalized float32 NCHW batch on the device and returns
    (N, D) float32 features (on the device for torch engines, CPU for onnxruntime)."""

    name: str
    numerics: str
    run: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""
    cleanup: Callable[[], None] = field(default=lambda: None)


def numerics_of(name: str) -> str:
    return "bf16" if name == "bf16" else "fp32"


def bound_of(name: str) -> float:
    return BF16_COSINE if numerics_of(name) != "fp32" else FP32_COSINE


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # native bf16 (AVX512-BF16 / AMX); without it autocast emulates bf16 and is slower than fp32
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # noqa: BLE001
            return False
    return False


def _flat(f: torch.Tensor) -> torch.Tensor:
    return f.float().flatten(1)


def prepare(name: str, backbone: nn.Module, example: torch.Tensor, device: torch.device, *,
            onnx_dir: str | os.PathLike | None = None, threads: int | None = None) -> Prepared:
    """Make engine `name` ready for `backbone` (eval mode, on `device`); raises EngineRejected."""
    backbone.eval()
    if name == "eager":
        backbone.to(memory_format=torch.contiguous_format)
        return Prepared(name, "fp32", lambda x: _flat(backbone(x.contiguous())))
    if name == "channels_last":
        backbone.to(memory_format=torch.channels_last)
        return Prepared(name, "fp32", lambda x: _flat(backbone(x.contiguous(memory_format=torch.channels_last))))
    if name == "bf16":
        if not bf16_supported(device):
            raise EngineRejected(f"bf16: no native bf16 on {device.type} here")
        backbone.to(memory_format=torch.channels_last)

        def run_bf16(x):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return _flat(backbone(x.contiguous(memory_format=torch.channels_last)))

        return Prepared(name, "bf16", run_bf16)
    if name == "compile":
        backbone.to(memory_format=torch.channels_last)
        try:
            compiled = torch.compile(backbone, dynamic=False)
        except Exception as exc:  # noqa: BLE001
            raise EngineRejected(f"compile: {_first_line(exc)}") from exc
        return Prepared(name, "fp32", lambda x: _flat(compiled(x.contiguous(memory_format=torch.channels_last))))
    if name == "onnxruntime":
        return _prepare_ort(backbone, example, device, onnx_dir, threads)
    raise EngineRejected(f"unknown engine {name!r}: expected one of {', '.join(ENGINE_CHOICES)}")


def _prepare_ort(backbone, example, device, onnx_dir, threads) -> Prepared:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EngineRejected("onnxruntime: not installed (pip install onnxruntime)") from exc
    providers = ["CPUExecutionProvider"]
    note = "CPU provider"
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers, note = ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA provider"
        else:
            raise EngineRejected("onnxruntime: this build has no CUDAExecutionProvider (pip install "
                                 "onnxruntime-gpu); a CPU session would starve the GPU")
    tmp = None
    if onnx_dir is None:
        tmp = tempfile.mkdtemp(prefix="zoo-engine-")
        onnx_dir = tmp
    # The ONNX file depends only on the backbone's architecture and state: reuse an earlier export.
    path = Path(onnx_dir) / f"{_module_digest(backbone)}.onnx"
    if not path.is_file():
        _export_onnx(backbone, example, path)
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
        raise EngineRejected(f"onnxruntime: session failed: {_first_line(exc)}") from exc
    name = session.get_inputs()[0].name

    def run(x):
        out = session.run(None, {name: x.detach().float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(out).flatten(1)

    def cleanup():
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    return Prepared("onnxruntime", "fp32", run, note=note, cleanup=cleanup)


def _export_onnx(backbone, example, path: Path) -> None:
    """Dynamic-batch export through the ONNX exporter plugin (zoo.exporting.bare_module_to_onnx: one
    graph path for every ONNX file the zoo writes), atomically; any failure rejects the engine."""
    from ..exporting import bare_module_to_onnx
    from ..io import atomic_path

    module = backbone.to(memory_format=torch.contiguous_format).eval()
    try:
        with torch.inference_mode(False), atomic_path(path) as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            x = example[:2].detach().float().cpu().clone()  # a normal tensor, even if `example` came from inference mode
            bare_module_to_onnx(module.to("cpu"), x, tmp)
    except Exception as exc:  # noqa: BLE001 - the engine is rejected with the reason; eager etc. remain
        raise EngineRejected(f"onnxruntime: ONNX export failed; {_first_line(exc)}") from exc
    finally:
        backbone.to(example.device)


def _module_digest(module: nn.Module) -> str:
    from ..digest import state_digest

    return hashlib.sha256(f"{type(module).__qualname__}|{state_digest(module)}|{torch.__version__}".encode()
                          ).hexdigest()[:24]


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().flatten(1).cpu(), b.double().flatten(1).cpu()
    num = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    # two all-zero rows agree; one zero row against a non-zero one does not
    return torch.where(den > 0, num / den.clamp_min(1e-300), (a.abs().sum(1) + b.abs().sum(1) == 0).double())


# ----------------------------------------------------------------------------------------- choice
@dataclass
class Selection:
    engine: Prepared
    reference: torch.Tensor  # eager fp32 features of the first CHECK_ROWS rows of the first batch (CPU)
    features: torch.Tensor  # the chosen engine's features of the whole first batch (CPU)
    cosine_min: float
    how: str  # "asked", "probe", "remembered"
    rates: dict[str, float]  # img/s of each probed engine
    rejected: dict[str, str]  # engine -> reason

    def describe(self) -> str:
        e = self.engine
        text = f"engine: {e.name} ({e.numerics}{', ' + e.note if e.note else ''}; {self.how}; check cosine " \
               f">= {self.cosine_min:.6f})"
        if self.rates:
            text += "; probe img/s " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(self.rates.items(), key=lambda kv: -kv[1]))
        if self.rejected:
            text += "; rejected " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return text


def candidates(device: torch.device, allow_reduced: bool, total: int) -> list[str]:
    names = ["eager", "channels_last", "onnxruntime"]
    if allow_reduced:
        names.append("bf16")
    if total >= COMPILE_MIN_IMAGES:
        names.append("compile")
    return names


def machine_id(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return f"{platform.node()}|{cpu}|{os.cpu_count()}cpu|{torch.get_num_threads()}thr|torch {torch.__version__}|" \
           f"{device.type}|{gpu}"


class ChoiceStore:
    """The remembered `auto` choices: a small JSON file, written atomically."""

    def __init__(self, root: str | os.PathLike | None):
        self.path = Path(root) / "engines" / "choices.json" if root is not None else None

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # a damaged file only costs a new probe

    def get(self, key: str) -> str | None:
        v = self._read().get(key)
        return v.get("engine") if isinstance(v, dict) and v.get("engine") in ENGINES else None

    def put(self, key: str, engine: str, rates: dict[str, float]) -> None:
        if self.path is None:
            return
        from ..io import write_json

        data = self._read()
        data[key] = {"engine": engine, "rates": {k: round(v, 1) for k, v in rates.items()},
                     "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with contextlib.suppress(OSError):
            write_json(self.path, data)


def _timed(run, x, device, min_seconds: float = 0.5, max_calls: int = 3) -> float:
    """img/s of run(x): the check call already warmed it up; at least two timed calls (one call of a
    large model, ~1 s on 2 cores, let one stray hiccup of a shared machine pick the slower engine)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    calls, t0 = 0, time.perf_counter()
    while True:
        run(x)
        sync()
        calls += 1
        dt = time.perf_counter() - t0
        if calls >= max_calls or (dt >= min_seconds and calls >= 2):
            return calls * len(x) / dt


def check(engine: Prepared, x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run the engine on the first batch; raise EngineRejected when its first rows disagree with
    eager fp32's (`reference`). Returns (the engine's features of the whole batch, min cosine)."""
    with torch.inference_mode():
        got = engine.run(x).float().cpu()
    if got.shape[1:] != reference.shape[1:] or len(got) != len(x):
        raise EngineRejected(f"{engine.name}: features of shape {tuple(got.shape)}, eager gives "
                             f"{tuple(reference.shape)}")
    if not torch.isfinite(got).all():
        raise EngineRejected(f"{engine.name}: non-finite features on the check batch")
    cos = float(row_cosine(got[:len(reference)], reference).min())
    bound = bound_of(engine.name)
    if not cos >= bound:
        raise EngineRejected(f"{engine.name}: features disagree with eager fp32 (min cosine {cos:.6f} < {bound})")
    return got, cos


def select(asked: str, backbone: nn.Module, x: torch.Tensor, device: torch.device, *, allow_reduced: bool,
           total: int, cache_root: str | os.PathLike | None, choice_key: str, threads: int | None = None,
           say: Callable[[str], None] | None = None, may_probe: bool = True, _prepare=prepare) -> Selection:
    """Pick and check the engine for this job; x is the first normalized batch on `device`.
    may_probe=False (every DDP rank but 0): `auto` uses the remembered choice, else channels_last;
    it neither probes nor writes the choice, so ranks do not time each other's load or race on the
    file, and need no collective (a rank whose rows are all cached never gets here)."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if asked not in ENGINE_CHOICES:
        from ..errors import ZooError

        raise ZooError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {asked!r}")
    onnx_dir = Path(cache_root) / "engines" / "onnx" if cache_root is not None else None
    store = ChoiceStore(cache_root)
    rejected: dict[str, str] = {}
    rates: dict[str, float] = {}
    how = "asked"
    if asked == "auto":
        remembered = store.get(choice_key)
        if remembered and remembered in candidates(device, allow_reduced, max(total, COMPILE_MIN_IMAGES)):
            order, how = [remembered], "remembered"
        elif total < PROBE_MIN_IMAGES:
            order, how = ["channels_last"], f"auto, small job (< {PROBE_MIN_IMAGES} images, no probe)"
        elif not may_probe:
            order, how = ["channels_last"], "auto, not the probing rank (rank 0 probes; no choice remembered yet)"
        else:
            order, how = candidates(device, allow_reduced, total), "probe"
    else:
        order = [asked]
    # The reference: eager is the slowest engine (lite0: 1/9 of ONNX Runtime's rate), and 16 eager rows
    # cost a 320-image job a third of its time. A probe, or a reduced-precision engine (whose head
    # predictions are compared on these rows), gets CHECK_ROWS; one known fp32 engine FP32_CHECK_ROWS.
    rows = CHECK_ROWS if how == "probe" or any(numerics_of(n) != "fp32" for n in order) else FP32_CHECK_ROWS
    eager = _prepare("eager", backbone, x, device)
    with torch.inference_mode():
        reference = eager.run(x[:rows]).float().cpu()
    if not torch.isfinite(reference).all():
        raise NonFiniteFeatures("eager", torch.nonzero(~torch.isfinite(reference).all(1)).flatten().tolist())
    best: tuple[float, Prepared, torch.Tensor, float] | None = None
    for name in order:
        try:
            engine = eager if name == "eager" else _prepare(name, backbone, x, device, onnx_dir=onnx_dir,
                                                            threads=threads)
            got, cos = check(engine, x, reference)
        except EngineRejected as exc:
            rejected[name] = str(exc).split(": ", 1)[-1]
            continue
        except Exception as exc:  # noqa: BLE001 - any failure of an optional engine is a rejection
            rejected[name] = _first_line(exc)
            continue
        if len(order) > 1:
            with torch.inference_mode():
                rates[name] = _timed(engine.run, x, device)
        if best is None or rates.get(name, 0.0) > best[0]:
            if best is not None and best[1] is not engine:
                best[1].cleanup()
            best = (rates.get(name, 0.0), engine, got, cos)
        else:
            engine.cleanup()
    if best is None:  # every asked/remembered engine failed: eager is the answer, said so
        if asked != "auto":
            say(f"engine {asked} rejected ({rejected.get(asked)}); using eager")
        with torch.inference_mode():
            best = (0.0, eager, eager.run(x).float().cpu(), 1.0)
        how = how + ", fallback"
    _, engine, got, cos = best
    _restore_layout(engine, backbone)
    if asked == "auto" and how == "probe":
        store.put(choice_key, engine.name, rates)
    sel = Selection(engine, reference, got, cos, how, rates, rejected)
    say(sel.describe())
    return sel


def _restore_layout(engine: Prepared, backbone) -> None:
    """Probing later engines may have changed the module's memory format: restore the winner's."""
    if engine.name == "eager":
        backbone.to(memory_format=torch.contiguous_format)
    elif engine.name in ("channels_last", "bf16", "compile"):
        backbone.to(memory_format=torch.channels_last)
