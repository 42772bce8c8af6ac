"""The choice of extraction engine: numerics, `auto`, the memo, the first-batch check (`choose`).

Feature extraction is a pure function of the image, so the trainer may compute it with whatever
runs fastest here, provided the answer stays the same. Engines are providers
(`zoo.ExtractionEngine`, registered through the `zoo_register_engines` hook): the built-in
eager, channels_last, bf16 and compile (zoo.features.core_engines), onnxruntime from the ONNX
plugin, and any third party's. This module names none of them but the reference ("eager") and
the cheap default ("channels_last").

The check: eager fp32 computes the first rows of the job's first batch (CHECK_ROWS when an engine
that may run has reduced precision, else FP32_CHECK_ROWS); every engine is run on those rows (the
engine that runs the first batch is checked on that batch's own first rows, not run on them again)
and each row's cosine similarity to eager's must be >= 0.9999 for fp32 engines, >= 0.99 for
bf16 (BF16_COSINE, the documented bound for reduced precision; the trainer also reports whether
the trained head's predictions on the check rows are unchanged). An engine that fails its check,
or cannot be prepared, is rejected with a one-line reason and the next one is used; eager is
always available.

`auto` (Chooser), a probe that pays for itself:
  * a remembered choice for this machine, backbone state, batch and input size is used as is
    (checked); ``<cache>/engines/choices.json``;
  * otherwise the cheap engines (whose preparation costs nothing now: channels_last, bf16 when
    allowed, an ONNX export already cached...) are each run on real batches of the job: the first
    batch an engine sees warms it up, the next is timed; every one of those batches is output (an
    engine is checked before its first batch counts). Eager's rate comes free from the reference
    rows;
  * an engine whose preparation is not cached (an ONNX export, compilation) is prepared in a
    background thread on a copy of the backbone while the job goes on with the fastest engine so
    far, then checked, warmed up and timed like the others. It is started only when the job's
    expected saving exceeds its cost (`pays`): (remaining images - those extracted meanwhile - its
    warm-up batch) x (1/best rate - 1/(best rate x expected speedup)) > OVERLAP_COST x expected
    preparation seconds, from what this machine measured before (choices.json) or the engine's own
    prior (`prior_speedup`, `prepare_seconds`). Small jobs thus get the fastest engine whose
    preparation is cached or cheap;
  * when: with the job's first batch if it pays at the rate the cheap engine is expected to have
    (the reference rows' rate x CHEAP_OVER_REFERENCE, or the ratio measured on this machine;
    `_start_at_first_batch`); else right after the cheap engine's warm-up batch if it pays at that
    batch's rate (`_start_early`); else after the timed batch. A batch that runs beside a
    preparation gives only a lower bound of its engine's rate (on a CPU its warm-up batch too:
    nothing is tuned there): the prepared engine wins outright if it beats what that engine is
    estimated to do alone, the bound with OVERLAP_COST of the seconds the preparation overlapped
    the batch taken back (at most RETIME_MARGIN x the bound; the bound is reported as ">=" and
    never remembered), otherwise the cheap engine is timed again on the next batch;
  * once every candidate has a rate the fastest is kept for the rest of the job and remembered.
On a CPU, while a preparation runs beside, each batch is run in parts of PROBE_ROWS rows, so the
prepared engine takes over within a batch.
No batch is computed twice (but for the first part, when the engine that ran it fails its check
on it: it is then run again by the next engine). The selection's `overhead_seconds` is what the job spent until the
choice beyond what the chosen engine alone would have taken on the same images.

Numerics: fp32 engines agree to cosine >= 0.9999 and share the cache key's "numerics": "fp32";
bf16 features are rounded differently and are cached under "bf16" (never mixed with fp32 ones).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..digest import state_digest
from ..errors import ZooError
from ..plugin.api import EngineRejected  # noqa: F401 - re-exported: engines raise it
from .core_engines import bf16_supported  # noqa: F401 - re-exported

FP32_COSINE = 0.9999
BF16_COSINE = 0.99
CHECK_ROWS = 8  # rows of the first batch that eager fp32 also computes (it is the slowest engine)
# ... when every engine that may run is fp32 (asked, remembered, or each candidate of a probe): a
# broken fp32 engine disagrees on every image, and a reduced-precision one needs more rows to tell
# its rounding from a fault
FP32_CHECK_ROWS = 4
DEFAULT_PREPARE_SECONDS = 60.0  # an engine whose preparation cost is unknown and never measured here
# What preparing an engine in the background costs the extraction running beside it, as a fraction
# of the preparation's own seconds: an estimate from one measurement on 2 busy cores (ResNet-18,
# channels_last batches of 64 beside the ONNX export in a thread: 43 s overlapped against 66 s one
# after the other); benchmarks/bench_vs_peers.py reports the job's real overhead.
OVERLAP_COST = 0.5
# A batch that ran while a preparation was running beside it is slowed by it, so its rate is only a
# lower bound of the engine's own. What the engine would do alone is estimated from it by taking
# back what the preparation cost the batch, OVERLAP_COST x the seconds the two overlapped, and at
# most this factor (a batch wholly beside a preparation: rate x 2). An engine known only that way
# is not timed again when the prepared engine beats that estimate; otherwise it is timed again on
# the next batch. Measured on 2 cores (the main job, Lite0, 4 runs): channels_last ran 24-25 img/s
# beside the ONNX export against 26-29 alone, so the estimate errs towards timing it again.
RETIME_MARGIN = 2.0
# Before the cheap engine has run, its rate is guessed from the reference rows' (eager's first call,
# on 8 rows): channels_last alone ran 2.7-3.3x that rate in fresh processes on 2 cores (ResNet-18
# and Lite0, 320 and 640 images). A little under, so that the guess errs towards starting a
# preparation that pays.
CHEAP_OVER_REFERENCE = 2.5
# While a preparation runs beside the extraction on a CPU, each batch is run in parts of this many
# rows, and the prepared engine takes over at the next part once it is ready. Why: with whole
# batches of 64 the cheap engine ran all of the first batch beside the ONNX export, about 1.4 s
# slower than onnxruntime would have (ResNet-18, 2 cores). Only beside a preparation: a rate timed
# on a part was too noisy to choose by (onnxruntime timed at 25 img/s on a part, 38-45 on whole
# batches, and channels_last was kept once); the batches timed are whole, a part beside gives only
# a lower bound (as any batch beside a preparation does). 16 rather than 32 rows: the cheap engine
# runs fewer rows before the takeover (Lite0, 320 images, fresh processes, 2 cores: feature phase
# 6.8/6.0 s against 7.2/6.4 s with 32; ResNet-18 unchanged within noise). On a GPU batches are never
# split (a new shape is a new cudnn tuning).
PROBE_ROWS = 16
REFERENCE, DEFAULT = "eager", "channels_last"


class NonFiniteFeaturesError(ZooError):
    """The backbone gave NaN/inf features: the one error for it (nothing of those images is cached).

    Raised with the batch rows by the engine check (which knows no files), then again by
    extraction with `files` named (zoo.features.extract); `files` None: not named yet."""

    def __init__(self, engine: str, rows: list[int], message: str | None = None, files: list[str] | None = None):
        self.engine, self.rows, self.files = engine, list(rows), files
        super().__init__(message or f"the backbone's {engine} features contain NaN/inf for {len(self.rows)} "
                         "image(s) of the batch: the weights or those images are broken; check the weights file "
                         "and the images")


# ----------------------------------------------------------------------------------- the registry
def _registry():
    from ..plugin import registry

    return registry.engines()


def engine_names() -> list[str]:
    """Every registered engine (built-ins first): the one list, from the registry."""
    return _registry().names()


def engine_choices() -> list[str]:
    """What --engine accepts: "auto" and every registered engine."""
    return _registry().choices()


def numerics_of(name: str) -> str:
    return _registry().get(name).numerics


def bound_of(name: str) -> float:
    return BF16_COSINE if numerics_of(name) != "fp32" else FP32_COSINE


def engine_numerics(engine: str, device: torch.device, allow_reduced: bool) -> str:
    """The numerics an extraction will have, known before any image is read (for the cache key):
    `auto` chooses among fp32 engines unless reduced precision is allowed (--amp bf16, or CUDA's
    default autocast) and native bf16 exists, then it uses bf16."""
    if engine == "auto":
        reduced = [e for e in _registry().names() if numerics_of(e) == "bf16"]
        ok = [e for e in reduced if _registry().get(e).unavailable(device) is None]
        return "bf16" if allow_reduced and ok else "fp32"
    return numerics_of(engine)


def _reduced_engine(device: torch.device) -> str | None:
    return next((e for e in _registry().names() if numerics_of(e) == "bf16"
                 and _registry().get(e).unavailable(device) is None), None)


@dataclass
class Prepared:
    """A ready engine: run(x) takes a normalized float32 NCHW batch on the device and returns
    (N, D) float32 features (on the device for torch engines, CPU for onnxruntime)."""

    name: str
    numerics: str
    run: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""
    cleanup: Callable[[], None] = field(default=lambda: None)


def prepare(name: str, backbone: nn.Module, example: torch.Tensor, device: torch.device, *,
            onnx_dir: str | os.PathLike | None = None, threads: int | None = None) -> Prepared:
    """Make engine `name` ready for `backbone` (eval mode, on `device`); raises EngineRejected.
    onnx_dir: the engines' persistent workdir (exports), None for a temporary one."""
    reg = _registry()
    if name not in reg.names():
        raise EngineRejected(f"unknown engine {name!r}: expected one of {', '.join(reg.choices())}")
    engine = reg.get(name)
    why = engine.unavailable(device)
    if why:
        raise EngineRejected(why)
    backbone.eval()
    p = engine.prepare(backbone, example, device, workdir=str(onnx_dir) if onnx_dir is not None else None,
                       threads=threads)
    return Prepared(name, engine.numerics, p.run, p.note or "", p.cleanup or (lambda: None))


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
    reference: torch.Tensor  # eager fp32 features of the check rows of the first batch (CPU)
    features: torch.Tensor  # the chosen engine's features of the check rows (CPU)
    cosine_min: float
    how: str  # "asked", "probe", "remembered", ...
    rates: dict[str, float]  # img/s of each engine timed in this job
    rejected: dict[str, str]  # engine -> reason
    probe_seconds: float = 0.0  # main-thread seconds of the probe: eager reference rows, checks, waits
    overhead_seconds: float = 0.0  # the job's extraction seconds beyond what the chosen engine alone would take
    prepare_seconds: dict[str, float] = field(default_factory=dict)  # engine -> its preparation (background or not)
    lower_bounds: set[str] = field(default_factory=set)  # engines whose rate was measured beside a preparation

    def describe(self) -> str:
        e = self.engine
        text = f"engine: {e.name} ({e.numerics}{', ' + e.note if e.note else ''}; {self.how}; check cosine " \
               f">= {self.cosine_min:.6f})"
        if self.how == "probe":
            text += f"; probe overhead {self.overhead_seconds:.1f} s"
        if self.rates:
            text += "; probe img/s " + ", ".join(f"{k} {'>=' if k in self.lower_bounds else ''}{v:.0f}"
                                                 for k, v in sorted(self.rates.items(), key=lambda kv: -kv[1]))
        if self.rejected:
            text += "; rejected " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return text


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
    """What this machine learnt about engines: the remembered `auto` choices (one per machine,
    backbone state, batch and input), the rates measured with them, and what preparing an engine
    cost per backbone architecture. A small JSON file, written atomically; a damaged one only
    costs a new probe."""

    def __init__(self, root: str | os.PathLike | None):
        self.path = Path(root) / "engines" / "choices.json" if root is not None else None

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, data: dict) -> None:
        if self.path is None:
            return
        from ..io import write_json

        with contextlib.suppress(OSError):
            write_json(self.path, data)

    def get(self, key: str) -> str | None:
        v = self._read().get(key)
        return v.get("engine") if isinstance(v, dict) and v.get("engine") in engine_names() else None

    def put(self, key: str, engine: str, rates: dict[str, float]) -> None:
        data = self._read()
        data[key] = {"engine": engine, "rates": {k: round(v, 1) for k, v in rates.items()},
                     "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write(data)

    def speedup(self, engine: str, over: str, machine: str) -> float | None:
        """Median measured rate ratio engine/over on this machine (any backbone), None if never."""
        ratios = [v["rates"][engine] / v["rates"][over] for k, v in self._read().items()
                  if k.startswith(machine + "|") and isinstance(v, dict) and isinstance(v.get("rates"), dict)
                  and v["rates"].get(engine) and v["rates"].get(over)]
        return statistics.median(ratios) if ratios else None

    def prepare_seconds(self, engine: str, arch: str, machine: str) -> float | None:
        v = self._read().get(f"prepare|{engine}|{machine}|{arch}")
        return float(v) if isinstance(v, (int, float)) else None

    def put_prepare_seconds(self, engine: str, arch: str, machine: str, seconds: float) -> None:
        data = self._read()
        data[f"prepare|{engine}|{machine}|{arch}"] = round(seconds, 2)
        self._write(data)


def check(engine: Prepared, x: torch.Tensor, reference: torch.Tensor,
          got: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Run the engine on the check rows (or take `got`, its features of them); raise EngineRejected
    when they disagree with eager fp32's (`reference`). Returns (those features, min cosine)."""
    if got is None:
        with torch.inference_mode():
            got = engine.run(x[:len(reference)]).float().cpu()
    if got.shape[1:] != reference.shape[1:] or len(got) != len(reference):
        raise EngineRejected(f"{engine.name}: features of shape {tuple(got.shape)}, eager gives "
                             f"{tuple(reference.shape)}")
    if not torch.isfinite(got).all():
        raise EngineRejected(f"{engine.name}: non-finite features on the check batch")
    cos = float(row_cosine(got, reference).min())
    bound = bound_of(engine.name)
    if not cos >= bound:
        raise EngineRejected(f"{engine.name}: features disagree with eager fp32 (min cosine {cos:.6f} < {bound})")
    return got, cos


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Chooser:
    """One job's engine: `run(x)` gives the features of each batch in turn, from the engine asked
    or remembered, or, for `auto` without a memory, from each candidate in turn while it is being
    timed (see the module docstring), then from the fastest. `selection` says what was chosen."""

    def __init__(self, asked: str, backbone: nn.Module, device: torch.device, *, allow_reduced: bool, total: int,
                 cache_root: str | os.PathLike | None, choice_key: str, threads: int | None = None,
                 say: Callable[[str], None] | None = None, may_probe: bool = True, machine: str = "",
                 background: bool = True, _prepare=prepare, _clock: Callable[[], float] = time.perf_counter):
        if asked not in engine_choices():
            raise ZooError(f"--engine must be one of {', '.join(engine_choices())}, got {asked!r}")
        self.asked, self.backbone, self.device, self.allow_reduced = asked, backbone, device, allow_reduced
        self.total, self.threads, self.may_probe, self._prepare = int(total), threads, may_probe, _prepare
        self.background = background  # a costly preparation runs in a thread beside the extraction
        self._clock = _clock  # tests inject a clock that their fake engines advance
        self.say = say or (lambda msg: print(msg, file=sys.stderr))
        self.workdir = Path(cache_root) / "engines" / "onnx" if cache_root is not None else None
        self.store, self.key = ChoiceStore(cache_root), choice_key
        self.machine = machine
        self.arch = type(backbone).__qualname__
        self.rejected: dict[str, str] = {}
        self.rates: dict[str, float] = {}
        self.seen = 0  # images output so far
        self.last_batch = 0
        self.reference: torch.Tensor | None = None
        self.check_x: torch.Tensor | None = None
        self.probe_seconds = 0.0
        self.selection: Selection | None = None
        self._current: Prepared | None = None  # the engine giving this batch's features
        self._current_features: torch.Tensor | None = None
        self._cos: dict[str, float] = {}
        self._check_features: dict[str, torch.Tensor] = {}  # each checked engine's features of the check rows
        self._prepared: dict[str, Prepared] = {}
        self._unchecked: Prepared | None = None  # the engine running the first batch, checked on its rows
        self._plan: list[str] = []  # probe: engines still to warm up and time, in order
        self._warm: set[str] = set()
        self._pending: tuple[str, threading.Thread, dict] | None = None  # a preparation in the background
        self._beside: dict[str, float] = {}  # rates measured while a preparation ran beside: lower bounds
        self._alone: dict[str, float] = {}  # ... and what each engine would have done alone, estimated from them
        self._early = False  # whether a costly preparation was considered after the cheap engine's warm-up
        self._spent = 0.0  # main-thread seconds in run() until the choice: the job's extraction while choosing
        self.prepare_times: dict[str, float] = {}
        self.how = "asked"

    # -- the first batch: reference rows, then the plan -------------------------------------------
    def _start(self, x: torch.Tensor) -> None:
        order = [self.asked]
        if self.asked == "auto":
            remembered = self.store.get(self.key)
            reduced = _reduced_engine(self.device) if self.allow_reduced else None
            if remembered and self._eligible(remembered, max(self.total, 1 << 30)):
                order, self.how = [remembered], "remembered"
            elif reduced is not None and not self.may_probe:
                order, self.how = [reduced], "auto, reduced precision"
            elif not self.may_probe:
                order, self.how = [DEFAULT], "auto, not the probing rank (rank 0 probes; no choice remembered yet)"
            else:
                order, self.how = [], "probe"
        probing = self.how == "probe"
        candidates = self._candidates() if probing else []
        may_run = candidates if probing else order
        rows = FP32_CHECK_ROWS if all(self._numerics(n) == "fp32" for n in may_run) else CHECK_ROWS
        t0 = self._clock()
        eager = self._prepare(REFERENCE, self.backbone, x, self.device)
        with torch.inference_mode():
            self.reference = eager.run(x[:rows]).float().cpu()
        _sync(self.device)
        dt = self._clock() - t0
        self.probe_seconds += dt
        if not torch.isfinite(self.reference).all():
            raise NonFiniteFeaturesError(REFERENCE, torch.nonzero(~torch.isfinite(self.reference).all(1)).flatten()
                                         .tolist())
        self.check_x = x[:rows].clone()
        self._prepared[REFERENCE] = eager
        self._cos[REFERENCE] = 1.0
        if probing:
            self.rates[REFERENCE] = rows / max(dt, 1e-9)  # the reference rows time eager for free
            self._plan = [n for n in candidates if self._cheap(n)]
            if not self._plan:
                self._plan = [REFERENCE]
            self._use_first_usable(self._plan, check_on_batch=True)
            if self._current is None:
                self._next()
            else:
                self._start_at_first_batch()
        else:  # asked or remembered: chosen once its first batch passes the check (`_run_part`)
            self._use_first_usable(order, check_on_batch=True)
            if self._current is None:  # it could not be prepared
                self._fall_back()

    def _fall_back(self) -> None:
        """The asked or remembered engine was rejected: eager, said so."""
        if self.asked != "auto":
            self.say(f"engine {self.asked} rejected ({self.rejected.get(self.asked)}); using eager")
        self.how += ", fallback"
        self._current = self._prepared[REFERENCE]
        self._select(self._current)

    def _numerics(self, name: str) -> str:
        try:
            return numerics_of(name)
        except ZooError:
            return "fp32"

    def _eligible(self, name: str, total: int) -> bool:
        reg = _registry()
        if name not in reg.names():
            return False
        e = reg.get(name)
        if e.numerics != "fp32" and not self.allow_reduced:
            return False
        if e.auto_min_images is None or total < e.auto_min_images:
            return False
        return e.unavailable(self.device) is None

    def _candidates(self) -> list[str]:
        names = [n for n in engine_names() if n != REFERENCE and self._eligible(n, self.total)]
        if self.allow_reduced and _reduced_engine(self.device) is not None:
            # reduced precision allowed: the cache key says bf16, so only bf16 engines qualify
            names = [n for n in names if self._numerics(n) == "bf16"] or names
        else:
            names = [n for n in names if self._numerics(n) == "fp32"]
        return names

    def _cheap(self, name: str) -> bool:
        try:
            return _registry().get(name).prepare_seconds(self.backbone, str(self.workdir) if self.workdir else None) \
                == 0.0
        except Exception:  # noqa: BLE001 - an engine that cannot say is not cheap
            return False

    def _get(self, name: str, check_on_batch: bool = False) -> Prepared | None:
        """The prepared and checked engine `name`, or None (rejected, with its reason).
        check_on_batch: checked on the first batch's own rows once it has run it (`_check_unchecked`)."""
        if name in self._prepared:
            return self._prepared[name]
        if name in self.rejected:
            return None
        costly = not self._cheap(name)
        t0 = self._clock()
        try:
            engine, why = self._build(name, self.backbone)
            return self._adopt(name, engine, why, self._clock() - t0, costly, check_on_batch)
        finally:
            self.probe_seconds += self._clock() - t0

    def _build(self, name: str, module: nn.Module) -> tuple[Prepared | None, str | None]:
        """Prepare engine `name` for `module`: (the engine, None) or (None, why it was rejected)."""
        try:
            return self._prepare(name, module, self.check_x, self.device, onnx_dir=self.workdir,
                                 threads=self.threads), None
        except Exception as exc:  # noqa: BLE001 - any failure of an optional engine is a rejection
            return None, _reason(name, exc)

    def _adopt(self, name: str, engine: Prepared | None, why: str | None, seconds: float,
               costly: bool, check_on_batch: bool = False, got: torch.Tensor | None = None) -> Prepared | None:
        """Check a prepared engine against the reference rows and keep it, or record its rejection
        (check_on_batch: the check waits for the engine's run of the first batch; got: the engine's
        features of the check rows, already computed)."""
        cos = 0.0
        if check_on_batch and engine is not None:
            self._unchecked = engine
        elif engine is not None:
            try:
                got, cos = check(engine, self.check_x, self.reference, got=got)
            except Exception as exc:  # noqa: BLE001
                why = _reason(name, exc)
        if engine is None or why is not None:
            self.rejected[name] = why or "could not be prepared"
            return None
        if costly:
            self.prepare_times[name] = seconds
            if self.may_probe:
                self.store.put_prepare_seconds(name, self.arch, self.machine, seconds)
        self._prepared[name], self._cos[name] = engine, cos
        if got is not None:
            self._check_features[name] = got
        return engine

    # -- a costly preparation beside the extraction ----------------------------------------------
    def _prepare_in_background(self, name: str) -> None:
        """Prepare `name` in a thread on a copy of the backbone (an export changes the module's
        memory format, and the extraction goes on with the module meanwhile)."""
        module, box = copy.deepcopy(self.backbone), {}

        def work() -> None:
            t0 = box["began"] = self._clock()
            box["engine"], box["why"] = self._build(name, module)
            box["seconds"] = self._clock() - t0
            box["ended"] = self._clock()

        thread = threading.Thread(target=work, name=f"zoo-prepare-{name}", daemon=True)
        self._pending = (name, thread, box)
        thread.start()

    def _collect(self, wait: bool) -> Prepared | None:
        """The background preparation's engine once it is ready (checked), else None."""
        name, thread, box = self._pending
        if thread.is_alive() and not wait:
            return None
        t0 = self._clock()
        thread.join()
        self._pending = None
        try:
            return self._adopt(name, box.get("engine"), box.get("why"), box.get("seconds", 0.0), costly=True)
        finally:
            self.probe_seconds += self._clock() - t0

    def _use_first_usable(self, names: list[str], check_on_batch: bool = False) -> None:
        self._current = None
        while names:
            engine = self._get(names[0], check_on_batch)
            if engine is not None:
                self._current = engine
                return
            names.pop(0)

    @property
    def engine_name(self) -> str:
        return self._current.name if self._current is not None else REFERENCE

    # -- each batch ------------------------------------------------------------------------------
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The features of batch x (float32, CPU), from the engine of the moment; on a CPU, while a
        preparation runs beside, in parts of PROBE_ROWS rows (see PROBE_ROWS)."""
        if self.reference is None:  # the job's first batch: the reference rows, then the plan
            entered = self._clock()
            self._start(x)
            self._spent += self._clock() - entered
            if self.selection is not None:  # asked or remembered: nothing to time
                self._settle()
        parts, start = [], 0
        while start < len(x):
            rows = self._part_rows(len(x) - start)
            parts.append(self._run_part(x[start:start + rows]))
            start += rows
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _part_rows(self, left: int) -> int:
        if self.device.type != "cpu" or self.selection is not None or self._pending is None \
                or left < PROBE_ROWS + PROBE_ROWS // 2:
            return left
        return PROBE_ROWS

    def _run_part(self, x: torch.Tensor) -> torch.Tensor:
        choosing, entered = self.selection is None, self._clock()
        if self._pending is not None:
            ready = self._collect(wait=False)
            if ready is not None:  # it takes over: warmed up on this batch, timed on the next (then
                # any cheap engine timed only beside the preparation, unless it clearly lost)
                self._current, self._plan = ready, [ready.name] + [n for n in self._plan if n != ready.name]
            elif self._pending is None:  # rejected: the next candidate, or the choice
                self._next()
        engine = self._current
        if self._unchecked is not None and self._unchecked is not engine:  # another took the first batch
            self._check_unchecked()
        beside = self._pending is not None  # a preparation runs beside this batch: its rate is a lower bound
        # (an engine timed on its own already, running on beside a preparation, keeps its rate)
        timed = self.selection is None and engine.name in self._warm and engine.name not in self.rates
        t0 = self._clock()
        try:
            with torch.inference_mode():
                f = engine.run(x).float().cpu()
            _sync(self.device)
        except Exception as exc:  # noqa: BLE001
            # failing on the batch it is checked on rejects an engine, as failing its check does; once
            # checked, its errors are the job's
            if self._unchecked is not engine:
                raise
            f = None
            self._check_unchecked(error=exc)
        dt = self._clock() - t0
        counted = True  # the batch times its engine
        if f is None or (self._unchecked is engine and not self._check_unchecked(f[:len(self.reference)].clone())):
            f, counted = self._after_rejection(x), False  # this batch from the next engine
        if self.selection is None and self.how != "probe":  # asked or remembered: its first batch passed
            self._select(engine)
        self.seen += len(x)
        self.last_batch = len(x)
        rate = len(x) / max(dt, 1e-9)
        if self.selection is None and counted:
            if not timed:
                self._warm.add(engine.name)
                if beside and self.device.type == "cpu" and engine.name not in self.rates:
                    # On a CPU an engine's first batch costs little more than its next ones (nothing is
                    # tuned), so beside a preparation it is a lower bound like a timed batch there. On a
                    # GPU the first batch includes autotuning (cudnn) and bounds nothing usefully.
                    self._bound(engine.name, rate, t0, dt)
                if not beside:
                    self._start_early(engine.name, rate)
            elif beside:
                self._bound(engine.name, rate, t0, dt)
            else:
                self.rates[engine.name] = rate
                self._beside.pop(engine.name, None)
                self._alone.pop(engine.name, None)
                self._plan = [n for n in self._plan if n != engine.name]
                self._next()
        if choosing:
            self._spent += self._clock() - entered
            if self.selection is not None:
                self._settle()
        return f

    def _check_unchecked(self, got: torch.Tensor | None = None, error: BaseException | None = None) -> bool:
        """Check the engine whose check waited for the first batch: on `got`, its features of that
        batch's first rows (they are the check rows), else on the check rows (another engine ran
        that batch). Why wait: running it on them beforehand cost a call of its own (the check
        rows' shape is new to it), 0.15-0.2 s of a 320-image job on 2 cores. error: what it raised on
        that batch (rejected without a check). False: rejected, with its reason, and out of the plan."""
        engine, self._unchecked = self._unchecked, None
        self._prepared.pop(engine.name, None)
        t0 = self._clock()
        try:
            why = _reason(engine.name, error) if error is not None else None
            ok = self._adopt(engine.name, None if why else engine, why, 0.0, costly=False, got=got) is not None
        finally:
            self.probe_seconds += self._clock() - t0
        if not ok:
            self._plan = [n for n in self._plan if n != engine.name]
        return ok

    def _after_rejection(self, x: torch.Tensor) -> torch.Tensor:
        """The first batch again after the engine that ran it failed its check: from the probe's next
        usable engine (checked as usual; a preparation beside goes on, eager running until it is
        ready), or from eager for an asked or remembered one."""
        t0 = self._clock()
        if self.how != "probe":
            self._fall_back()
        else:
            self._use_first_usable(self._plan)
        if self._current is None:
            if self._pending is not None:
                self._current = self._prepared[REFERENCE]
            else:
                self._next()
        with torch.inference_mode():
            f = self._current.run(x).float().cpu()
        _sync(self.device)
        self.probe_seconds += self._clock() - t0
        return f

    def _next(self) -> None:
        """After an engine is timed: the next cheap one, else a costly one that pays, else decide."""
        self._drop_clear_losers()
        self._use_first_usable(self._plan)
        if self._current is not None:
            return
        timed = {n: r for n, r in self.rates.items() if n in self._prepared}
        best_name = max(timed, key=timed.__getitem__) if timed else None
        for name in self._untried():
            cost, saving, price = self._pays_for(name, timed.get(best_name, 0.0))
            if saving > price and self.background:
                self._prepare_in_background(name)
                if best_name is not None:  # meanwhile the fastest engine so far runs the job
                    self._current = self._prepared[best_name]
                return
            if saving > price:
                engine = self._get(name)
                if engine is not None:
                    self._plan = [name]
                    self._current = engine
                    return
            else:
                self.rejected.setdefault(name, f"not tried: its preparation (~{cost:.0f} s) would cost this job more "
                                               f"than it saves (~{max(saving, 0):.0f} s)")
        self._decide()

    def _untried(self) -> list[str]:
        """The costly candidates not yet timed, rejected or prepared."""
        done = {*self.rates, *self.rejected, *self._prepared}
        return [n for n in self._candidates() if n not in done]

    def _pays_for(self, name: str, best_rate: float) -> tuple[float, float, float]:
        """(expected preparation seconds, saving, price) of preparing `name` now, against `best_rate`."""
        cost = self._expected_prepare_seconds(name)
        speedup = self.store.speedup(name, DEFAULT, self.machine) or _registry().get(name).prior_speedup
        # the images left once a preparation is ready also pay its warm-up batch at the old rate
        remaining = max(0, self.total - self.seen - self.last_batch)
        return (cost, *pays(remaining, best_rate, speedup, cost, self.background))

    def _start_early(self, name: str, warm_rate: float) -> None:
        """After the last cheap engine's warm-up batch: start a costly preparation that pays now,
        beside that engine's next batches, instead of after its timed batch (one batch of the slow
        engine fewer). The warm-up batch's rate is below the engine's own (it includes the first
        call), so the saving is if anything overestimated here; a preparation that does not pay
        even so is not started, and is weighed again, at the engine's timed rate, in _next."""
        if self._early or not self.background or self._plan != [name]:
            return
        self._early = True
        self._start_paying(max(warm_rate, self._best_timed_rate()))

    def _start_at_first_batch(self) -> None:
        """At the job's first batch, before the cheap engine has run: a costly preparation that pays
        at the rate that engine is expected to have (the reference rows' rate times the ratio
        measured on this machine, else CHEAP_OVER_REFERENCE) starts now, beside the cheap engine's
        warm-up batch, whose rate (on a CPU) is then a lower bound. In fresh processes on 2 cores
        (one run each, against starting after that batch) Lite0's 320-image job took 8.6-9.2 s
        instead of 15.4-17.4 s (the export now paid) and ResNet-18's 640-image job 19.1-20.2 s
        instead of 20.5-20.7 s; measured with a guess of 1.5x, before CHEAP_OVER_REFERENCE was set."""
        name = self._current.name
        if not self.background or self._pending is not None or self._plan != [name] or name == REFERENCE:
            return
        ratio = self.store.speedup(name, REFERENCE, self.machine) or CHEAP_OVER_REFERENCE
        self._start_paying(self.rates[REFERENCE] * ratio)

    def _start_paying(self, rate: float) -> None:
        """Start in the background the first costly candidate whose preparation pays against `rate`."""
        for candidate in self._untried():
            _, saving, price = self._pays_for(candidate, rate)
            if saving > price:
                self._prepare_in_background(candidate)
                return

    def _drop_clear_losers(self) -> None:
        """Cheap engines still to be timed that were run only beside a preparation: their rate then is
        a lower bound; one whose estimated rate alone (`_bound`) the best engine timed beats is not
        timed again (it cannot win), its bound kept for the record."""
        best = self._best_timed_rate()
        for name in [n for n in self._plan if n in self._beside]:
            if best >= self._alone[name]:
                self._plan.remove(name)

    def _bound(self, name: str, rate: float, t0: float, dt: float) -> None:
        """Record a batch of `name` that ran beside the pending preparation from t0 for dt seconds:
        its rate is a lower bound; the estimate of the rate alone takes back OVERLAP_COST of the
        seconds the preparation overlapped the batch (capped at RETIME_MARGIN x the rate)."""
        box = self._pending[2] if self._pending is not None else {}
        overlap = max(0.0, min(t0 + dt, box.get("ended", t0 + dt)) - max(t0, box.get("began", t0)))
        alone = rate * dt / max(dt - OVERLAP_COST * overlap, dt / RETIME_MARGIN, 1e-12)
        self._beside[name] = max(self._beside.get(name, 0.0), rate)
        self._alone[name] = max(self._beside[name], min(self._alone.get(name, alone), alone))

    def _best_timed_rate(self) -> float:
        """The best rate timed on its own so far by a prepared engine other than the reference (0: none)."""
        return max((r for n, r in self.rates.items() if n in self._prepared and n != REFERENCE), default=0.0)

    def _expected_prepare_seconds(self, name: str) -> float:
        e = _registry().get(name)
        measured = self.store.prepare_seconds(name, self.arch, self.machine)
        if measured is not None:
            return measured
        try:
            s = e.prepare_seconds(self.backbone, str(self.workdir) if self.workdir else None)
        except Exception:  # noqa: BLE001
            s = None
        # The engine's own prior, as is: priors are measured beside a running extraction (the case
        # they are used in). Scaling them by the load average counted this job's own decoding
        # workers as load and priced Lite0's 2 s export at 10-11 s, so 640-image jobs never tried it.
        return DEFAULT_PREPARE_SECONDS if s is None else float(s)

    def finish(self) -> Selection:
        """The selection, deciding now if the job ended while candidates were still being timed."""
        if self.selection is None:
            t0 = self._clock()
            if self._pending is not None:  # the job ended first: its preparation is cached for the next job
                name = self._pending[0]
                if self._collect(wait=True) is not None:
                    self.rejected[name] = "ready after the job's last batch (prepared for the next job)"
            self._decide()
            self._spent += self._clock() - t0
            self._settle()
        return self.selection

    def _settle(self) -> None:
        """The probe's overhead (the job's seconds until the choice beyond what the chosen engine
        alone would have taken on the same images), then say what was chosen."""
        sel = self.selection
        rate = self.rates.get(sel.engine.name, 0.0)
        sel.probe_seconds = self.probe_seconds
        sel.prepare_seconds = dict(self.prepare_times)
        if self.how == "probe" and rate > 0:
            sel.overhead_seconds = max(0.0, self._spent - self.seen / rate)
        else:  # asked or remembered: the reference rows and the check are all it costs
            sel.overhead_seconds = self.probe_seconds
        self.say(sel.describe())

    def _decide(self) -> None:
        timed = {n: r for n, r in self.rates.items() if n in self._prepared}
        self.rates.update(self._beside)  # the bounds, for the record (describe says ">="); never remembered
        if any(n != REFERENCE for n in timed):
            name = max(timed, key=timed.get)
        else:  # nothing but the reference rows timed: keep the engine that ran the job
            name = self._current.name if self._current is not None else REFERENCE
        engine = self._prepared.get(name) or self._prepared[REFERENCE]
        for other, e in self._prepared.items():
            if e is not engine and other != REFERENCE:
                e.cleanup()
        _restore_layout(engine, self.backbone)
        self._current = engine
        if self.asked == "auto" and self.how == "probe" and self.may_probe and len(timed) > 1:
            self.store.put(self.key, engine.name, timed)
        self._select(engine)

    def _select(self, engine: Prepared) -> None:
        ref = self.reference
        # the check already ran this engine on the check rows: its features of them are kept, not recomputed
        feats = ref if engine.name == REFERENCE else self._check_features.get(engine.name)
        if feats is None:
            with torch.inference_mode():
                feats = engine.run(self.check_x).float().cpu()
        self.selection = Selection(engine, ref, feats, self._cos.get(engine.name, 1.0), self.how, dict(self.rates),
                                   dict(self.rejected), self.probe_seconds,
                                   lower_bounds=set(self._beside))


def select(asked: str, backbone: nn.Module, x: torch.Tensor, device: torch.device, *, allow_reduced: bool,
           total: int, cache_root: str | os.PathLike | None, choice_key: str, threads: int | None = None,
           say: Callable[[str], None] | None = None, may_probe: bool = True, _prepare=prepare,
           _clock: Callable[[], float] = time.perf_counter) -> Selection:
    """The engine a job of `total` images would use, choosing on batch x run again and again (each
    run standing for the job's next batch): what Chooser does on a real job, for tests and tools.
    A background preparation is waited for before the next batch, so the choice does not depend
    on how fast this machine prepares."""
    ch = Chooser(asked, backbone, device, allow_reduced=allow_reduced, total=total, cache_root=cache_root,
                 choice_key=choice_key, threads=threads, say=say, may_probe=may_probe, _prepare=_prepare,
                 _clock=_clock)
    for _ in range(64):
        if ch._pending is not None:
            ch._pending[1].join()
        ch.run(x)
        if ch.selection is not None:
            return ch.selection
    return ch.finish()


def pays(remaining: int, best_rate: float, speedup: float, cost: float, background: bool) -> tuple[float, float]:
    """(expected saving, price) in seconds of preparing an engine `speedup` times the best rate so
    far that costs `cost` seconds to prepare, with `remaining` images of the job left. In the
    background the images extracted meanwhile gain nothing and the job pays OVERLAP_COST of the
    preparation (the cores it takes); in the foreground the job waits for all of it."""
    if best_rate <= 0 or speedup <= 1:
        return 0.0, cost
    per_image = 1.0 / best_rate - 1.0 / (best_rate * speedup)
    if background:
        return max(0.0, remaining - best_rate * cost) * per_image, OVERLAP_COST * cost
    return remaining * per_image, cost


def _reason(name: str, exc: BaseException) -> str:
    if isinstance(exc, EngineRejected):
        return str(exc).split(": ", 1)[-1] if str(exc).startswith(name + ":") else str(exc)
    return _first_line(exc)


def _restore_layout(engine: Prepared, backbone) -> None:
    """Probing later engines may have changed the module's memory format: restore the winner's."""
    if engine.name == REFERENCE:
        backbone.to(memory_format=torch.contiguous_format)
    elif engine.name != "onnxruntime":
        backbone.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- the memo
_CHOOSERS: dict = {}  # (id(backbone), ...) -> (weak ref, Chooser): train and val extraction share one


def choose(backbone: nn.Module, device: torch.device, engine: str, *, allow_reduced: bool, total: int,
           cache_root: str | os.PathLike | None, batch_size: int, input_shape: tuple, say=None,
           may_probe: bool = True, _prepare=prepare) -> Chooser:
    """The Chooser for this backbone's extraction in this process: numerics, the auto choice, the
    memo (the train and validation passes of a run share one) and the first-batch check.
    cache_root None: nothing remembered or written."""
    key = (id(backbone), str(device), batch_size, engine, allow_reduced, tuple(input_shape))
    memo = _CHOOSERS.get(key)
    if memo is not None and memo[0]() is backbone:
        return memo[1]
    choice_key = f"{machine_id(device)}|{state_digest(backbone)[:16]}|{type(backbone).__qualname__}|" \
                 f"b{batch_size}|{tuple(input_shape)}|{'reduced' if allow_reduced else 'fp32'}"
    ch = Chooser(engine, backbone, device, allow_reduced=allow_reduced, total=total, cache_root=cache_root,
                 choice_key=choice_key, say=say, may_probe=may_probe, machine=machine_id(device), _prepare=_prepare)
    _CHOOSERS.clear()
    _CHOOSERS[key] = (weakref.ref(backbone), ch)
    return ch
