"""One measurement: build a backbone, prepare it for a runtime and mode, time it.

`measure(task)` runs in whatever process calls it; `zoo.bench.isolate` calls it in a fresh
child process so the child's peak RSS belongs to this measurement alone. Timing: the first
call (where compilation / lazy init happens) is timed separately as setup, then `warmup`
untimed calls, then `repeats` timed calls, each bracketed by a CUDA synchronize on GPU.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .runtimes import INFER, TRAIN_FROZEN, TRAIN_FULL, get_runtime, runtime_label


@dataclass
class Task:
    backbone: str
    runtime: str
    mode: str
    batch_size: int
    image_size: int
    device: str = "cpu"
    weights: Any = None  # None: random init (the default: no downloads)
    warmup: int = 2
    repeats: int = 5
    threads: int = 1
    head_classes: int = 0  # infer: add a linear head with this many classes (0: headless backbone)
    num_classes: int = 10  # train modes: classes of the linear head being trained
    seed: int = 0
    memory: str | None = None  # "rss" (isolated child), "cuda", or None (not measured)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (torch runtimes: the timed call under torch.autocast)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_calls(step: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Time `step` `repeats` times after `warmup` untimed calls; seconds per call."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"mean": statistics.fmean(times), "p50": percentile(times, 50), "p95": percentile(times, 95),
            "min": min(times), "n": len(times)}


def rss_mb() -> float | None:
    """Current resident set size of this process, MiB (Linux /proc; None elsewhere)."""
    try:
        import os

        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """This process's peak RSS so far, MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image's memory.
    Not ru_maxrss: Linux carries ru_maxrss across exec, so a freshly spawned child (fork+exec)
    would report at least its parent's RSS at fork time. Elsewhere ru_maxrss (bytes on macOS).
    """
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def error_text(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def base_row(task: Task) -> dict[str, Any]:
    return {
        "backbone": task.backbone,
        "weights": task.weights,
        "runtime": runtime_label(task.runtime),
        "precision": task.precision,
        "mode": task.mode,
        "device": task.device,
        "batch_size": task.batch_size,
        "image_size": task.image_size,
        "params": None,
        "gflops": None,
        "feature_dim": None,
        "throughput": None,
        "time_mean_ms": None,
        "time_p50_ms": None,
        "time_p95_ms": None,
        "latency_p50_ms": None,
        "latency_p95_ms": None,
        "setup_s": None,
        "peak_mem_mb": None,
        "mem_kind": None,
        "base_rss_mb": None,
        "threads": task.threads,
        "load_avg_1m": _loadavg_1m(),
        "warmup": task.warmup,
        "repeats": task.repeats,
        "note": "",
        "error": None,
    }


def _loadavg_1m() -> float | None:
    """Recorded per row: on a shared machine other processes skew CPU timings."""
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def measure(task: Task | dict) -> dict[str, Any]:
    """Run one measurement; never raises: failures come back as a row with `error` set."""
    if isinstance(task, dict):
        task = Task(**task)
    row = base_row(task)
    try:
        _measure(task, row)
    except BaseException as exc:  # noqa: BLE001 - a failing combination is a row, not a crash
        if isinstance(exc, KeyboardInterrupt):
            raise
        row["error"] = error_text(exc)
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        if task.memory == "rss":
            row["peak_mem_mb"] = round(peak_rss_mb(), 1)
            row["mem_kind"] = "peak RSS (child process)"
    if row["error"] and task.memory == "cuda":
        row["peak_mem_mb"] = None
    return row


def _sync_for(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _measure(task: Task, row: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(max(1, int(task.threads)))
    row["threads"] = torch.get_num_threads()
    if task.memory == "rss":
        row["base_rss_mb"] = None if rss_mb() is None else round(rss_mb(), 1)
    device = torch.device(task.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    from zoo.backbones import create_backbone

    runtime = get_runtime(task.runtime)
    runtime.check(task.mode, task.device)  # cheap refusal before building anything
    from .runner import _check_precision

    _check_precision(runtime, task.precision, task.device)

    torch.manual_seed(task.seed)
    backbone, info = create_backbone(task.backbone, weights=task.weights)
    row["params"] = info.num_params
    row["feature_dim"] = info.feature_dim
    row["weights"] = info.weights
    backbone = backbone.to(device)
    gen = torch.Generator().manual_seed(task.seed)
    x = torch.randn(task.batch_size, 3, task.image_size, task.image_size, generator=gen).to(device)

    if task.mode == INFER:
        module = backbone
        if task.head_classes:
            feat = _feature_dim(backbone, info, device, task.image_size)
            module = torch.nn.Sequential(backbone, torch.nn.Linear(feat, task.head_classes)).to(device)
        module.eval()
        with torch.inference_mode():
            t0 = time.perf_counter()
            prepared = runtime.prepare(module, x, task.mode, task.device, row["threads"])
            inp = prepared.to_input(x)
            prep_s = time.perf_counter() - t0

            def step():
                return prepared.run(inp)

            _time_into(row, task, step, cuda, prep_s, prepared)
    elif task.mode == TRAIN_FROZEN:
        backbone.eval()
        feat = _feature_dim(backbone, info, device, task.image_size)
        head = torch.nn.Linear(feat, task.num_classes).to(device).train()
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
        y = torch.randint(0, task.num_classes, (task.batch_size,), generator=gen).to(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            prepared = runtime.prepare(backbone, x, task.mode, task.device, row["threads"])
            inp = prepared.to_input(x)
        prep_s = time.perf_counter() - t0

        def step():
            with torch.inference_mode():
                features = prepared.to_torch(prepared.run(inp))
            features = features.clone()  # a normal tensor again, usable by autograd
            loss = torch.nn.functional.cross_entropy(head(features), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        _time_into(row, task, step, cuda, prep_s, prepared)
    elif task.mode == TRAIN_FULL:
        feat = _feature_dim(backbone, info, device, task.image_size)
        model = torch.nn.Sequential(backbone, torch.nn.Linear(feat, task.num_classes)).to(device).train()
        for p in model.parameters():
            p.requires_grad_(True)
        y = torch.randint(0, task.num_classes, (task.batch_size,), generator=gen).to(device)
        t0 = time.perf_counter()
        prepared = runtime.prepare(model, x, task.mode, task.device, row["threads"])
        prep_s = time.perf_counter() - t0
        trainable = prepared.trainable if prepared.trainable is not None else model
        opt = torch.optim.SGD(trainable.parameters(), lr=0.01, momentum=0.9)
        inp = prepared.to_input(x)

        def step():
            out = prepared.to_torch(prepared.run(inp))
            loss = torch.nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        _time_into(row, task, step, cuda, prep_s, prepared)
    else:
        from zoo.errors import ZooError

        raise ZooError(f"unknown mode {task.mode!r}: expected infer, train-frozen or train-full")
    if cuda:
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["mem_kind"] = "CUDA allocator peak"


def _feature_dim(backbone, info, device, image_size: int) -> int:
    if info.feature_dim:
        return int(info.feature_dim)
    import torch

    with torch.inference_mode():
        return int(backbone.eval()(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1])


def _autocast(task: Task, step: Callable[[], Any]) -> Callable[[], Any]:
    """fp32: the step as is; bf16/fp16: the step under torch.autocast on the task's device."""
    if task.precision == "fp32":
        return step
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[task.precision]
    device_type = task.device.split(":")[0]

    def amp_step():
        with torch.autocast(device_type, dtype=dtype):
            return step()

    return amp_step


def _time_into(row: dict[str, Any], task: Task, step: Callable[[], Any], cuda: bool, prepare_s: float,
               prepared) -> None:
    """setup_s = preparing (trace/export/session) + the first call (compilation, lazy init)."""
    sync = _sync_for(task.device) if cuda else (lambda: None)
    step = _autocast(task, step)
    row["note"] = prepared.note
    try:
        t0 = time.perf_counter()
        step()
        sync()
        row["setup_s"] = round(prepare_s + time.perf_counter() - t0, 3)
        stats = time_calls(step, task.warmup, task.repeats, sync)
    finally:
        prepared.cleanup()
    row["time_mean_ms"] = round(stats["mean"] * 1e3, 3)
    row["time_p50_ms"] = round(stats["p50"] * 1e3, 3)
    row["time_p95_ms"] = round(stats["p95"] * 1e3, 3)
    row["throughput"] = round(task.batch_size / stats["mean"], 2)
    if task.batch_size == 1:
        row["latency_p50_ms"] = row["time_p50_ms"]
        row["latency_p95_ms"] = row["time_p95_ms"]
