"""The benchmark loop: backbones x runtimes x modes x batch sizes -> rows (never aborts on one).

Per backbone the parent builds the model once for parameters, feature dim and GFLOPs, then each
measurement runs in a fresh child process (CPU default: honest peak RSS, no cross-talk) or
in-process (CUDA default: the allocator's peak is reset per measurement).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .measure import Task, base_row, error_text, measure
from .runtimes import MODES, PRECISIONS, default_runtimes, get_runtime

SCHEMA = "zoo-bench/1"


@dataclass
class BenchConfig:
    patterns: Sequence[str]
    runtimes: Sequence[str] | None = None  # None: default_runtimes(device)
    modes: Sequence[str] = MODES
    batch_sizes: Sequence[int] = (1, 8, 32)
    image_size: int | None = None  # None: each backbone's own input size
    device: str = "auto"
    weights: Any = None  # None: random init, "default": the plugin's pretrained weights
    warmup: int = 2
    repeats: int = 5
    threads: int | None = None  # None: torch's default for this machine
    isolate: str = "auto"  # auto (process on CPU, none on CUDA) | process | none
    timeout: float | None = 900.0  # per isolated measurement
    head_classes: int = 0
    num_classes: int = 10
    probe: bool = False
    cache: bool = True  # --probe's features through the feature cache (zoo train's key); --no-cache: not
    cache_dir: str | None = None  # None: $ZOO_CACHE_DIR or the default
    seed: int = 0
    precisions: Sequence[str] = ("fp32",)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["patterns"] = list(self.patterns)
        d["runtimes"] = None if self.runtimes is None else list(self.runtimes)
        d["precisions"] = list(self.precisions)
        d["modes"] = list(self.modes)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def resolve_device(device: str) -> str:
    """zoo.device.select_device without MPS (the bench runtimes are CPU and CUDA)."""
    from zoo.device import select_device

    return str(select_device(device, allow_mps=False))


def resolve_backbones(patterns: Sequence[str]) -> list[str]:
    """Names or globs -> qualified names, in the order given, without duplicates."""
    from zoo.backbones import get_info, list_models
    from zoo.errors import ZooError

    out: list[str] = []
    for pattern in patterns:
        names = list_models(pattern)
        if not names and not any(c in pattern for c in "*?["):
            get_info(pattern)  # unknown names raise here, with suggestions
            names = [pattern]  # e.g. a name with a weights tag, which globs do not list
        if not names:
            raise ZooError(f"no backbone matches {pattern!r} (see `zoo list {pattern}`)")
        out += [n for n in names if n not in out]
    return out


def validate(cfg: BenchConfig) -> None:
    from zoo.errors import ZooError

    if not cfg.patterns:
        raise ZooError("name at least one backbone or glob, e.g. `zoo bench torchvision/resnet18`")
    for r in cfg.runtimes or ():
        get_runtime(r)
    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad or not cfg.precisions:
        raise ZooError(f"unknown precision(s) {', '.join(bad) or '(none)'}: expected {', '.join(PRECISIONS)}")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad:
        raise ZooError(f"unknown mode(s) {', '.join(bad)}: expected {', '.join(MODES)}")
    if not cfg.batch_sizes or any(int(b) < 1 for b in cfg.batch_sizes):
        raise ZooError(f"batch sizes must be positive integers, got {list(cfg.batch_sizes)}")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ZooError("--repeats must be >= 1 and --warmup >= 0")
    if cfg.isolate not in ("auto", "process", "none"):
        raise ZooError(f"isolate must be auto, process or none, got {cfg.isolate!r}")
    from zoo.options import OptionError, number

    for flag, value, check in (("--image-size", cfg.image_size, number(8, 4096, integer=True, optional=True)),
                               ("--threads", cfg.threads, number(1, integer=True, optional=True)),
                               ("--timeout", cfg.timeout, number(0, lo_open=True, optional=True)),
                               ("--head-classes", cfg.head_classes, number(0, integer=True)),
                               ("--repeats", cfg.repeats, number(1, integer=True)),
                               ("--warmup", cfg.warmup, number(0, integer=True))):
        expected = check(value)
        if expected is not None:
            raise OptionError(f"{flag} must be {expected}, got {value!r}")


def backbone_facts(name: str, weights: Any, image_size: int | None, device: str) -> dict[str, Any]:
    """params, feature dim, input size and GFLOPs of one backbone (built once, in this process)."""
    import torch

    from zoo.backbones import create_backbone

    from .flops import forward_gflops

    torch.manual_seed(0)
    module, info = create_backbone(name, weights=weights)
    size = int(image_size or info.normalization.input_size[-1])
    facts = {"params": info.num_params, "feature_dim": info.feature_dim, "image_size": size,
             "weights": info.weights, "gflops": None, "gflops_error": None}
    try:
        facts["gflops"] = float(f"{forward_gflops(module, size):.4g}")
    except Exception as exc:  # noqa: BLE001 - a model the counter cannot trace still gets timed
        facts["gflops_error"] = error_text(exc)
    del module
    return facts


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None,
              measure_fn: Callable[[Task], dict] | None = None) -> dict[str, Any]:
    """Run every combination; return the result document (environment, config, rows, probe)."""
    import torch

    from . import env as envmod

    validate(cfg)
    say = progress or (lambda msg: None)
    device = resolve_device(cfg.device)
    threads = int(cfg.threads or torch.get_num_threads())
    isolate = cfg.isolate if cfg.isolate != "auto" else ("none" if device.startswith("cuda") else "process")
    memory = "cuda" if device.startswith("cuda") else ("rss" if isolate == "process" else None)
    if measure_fn is None:
        if isolate == "process":
            from .isolate import measure_in_child

            measure_fn = lambda task: measure_in_child(task, cfg.timeout)  # noqa: E731
        else:
            measure_fn = measure
    names = resolve_backbones(cfg.patterns)
    environment = envmod.collect(device, threads)
    environment["load_avg_start"] = _loadavg()
    started = time.time()

    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    runtimes = list(cfg.runtimes) if cfg.runtimes else list(default_runtimes(device))
    combos = [(r, m, p) for m in cfg.modes for r in runtimes for p in cfg.precisions]
    total = len(names) * len(combos) * len(cfg.batch_sizes)
    done = 0
    for name in names:
        try:
            facts = backbone_facts(name, cfg.weights, cfg.image_size, device)
        except Exception as exc:  # noqa: BLE001 - a backbone that cannot be built is one error row
            row = base_row(Task(name, "-", "-", 0, int(cfg.image_size or 0), device=device, weights=cfg.weights,
                                threads=threads, warmup=cfg.warmup, repeats=cfg.repeats))
            row["runtime"], row["mode"], row["batch_size"] = "-", "-", None
            row["error"] = f"build failed: {error_text(exc)}"
            rows.append(row)
            done += len(combos) * len(cfg.batch_sizes)
            say(f"[{done}/{total}] {name}: {row['error']}")
            continue
        for runtime, mode, precision in combos:
            for bs in cfg.batch_sizes:
                task = Task(backbone=name, runtime=runtime, mode=mode, batch_size=int(bs),
                            image_size=facts["image_size"], device=device, weights=cfg.weights,
                            warmup=cfg.warmup, repeats=cfg.repeats, threads=threads,
                            head_classes=cfg.head_classes, num_classes=cfg.num_classes, seed=cfg.seed,
                            memory=memory, precision=precision)
                try:
                    get_runtime(runtime).check(mode, device)  # refuse here: no child process for a known no
                    _check_precision(get_runtime(runtime), precision, device)
                    row = measure_fn(task)
                except Exception as exc:  # noqa: BLE001 - unsupported, or the child could not even start
                    row = base_row(task)
                    row["error"] = error_text(exc)
                for key in ("params", "feature_dim"):
                    if row.get(key) is None:
                        row[key] = facts[key]
                row["gflops"] = facts["gflops"]
                if facts["gflops_error"] and not row.get("note"):
                    row["note"] = f"GFLOPs not counted: {facts['gflops_error']}"
                rows.append(row)
                done += 1
                say(f"[{done}/{total}] {_progress_line(row)}")
        if cfg.probe:
            from .probe import linear_probe

            say(f"probe: {name} ...")
            probes.append(linear_probe(name, cfg.weights, cfg.image_size, device, threads, seed=cfg.seed,
                                       cache=cfg.cache, cache_dir=cfg.cache_dir))
            p = probes[-1]
            say(f"probe: {name}: " + (f"val acc {p['val_acc']:.3f}" if p["error"] is None else p["error"]))
    if probes:
        by_name = {p["backbone"]: p for p in probes}
        for row in rows:
            p = by_name.get(row["backbone"])
            row["probe_acc"] = None if p is None else p["val_acc"]
    environment["load_avg_end"] = _loadavg()
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "environment": environment,
        "config": {**cfg.to_dict(), "runtimes": runtimes, "device": device, "threads": threads, "isolate": isolate,
                   "weights_note": _weights_note(cfg.weights)},
        "rows": rows,
        "probe": probes,
    }


def _check_precision(runtime, precision: str, device: str) -> None:
    """Runtimes from elsewhere (module:attr) that predate precisions run fp32 only."""
    check = getattr(runtime, "check_precision", None)
    if check is not None:
        check(precision, device)
    elif precision != "fp32":
        from .runtimes import Unsupported

        raise Unsupported(f"runtime {getattr(runtime, 'name', runtime)!r} declares no precisions: fp32 only")


def _weights_note(weights: Any) -> str:
    if weights is None:
        return ("random init (--weights none): nothing is downloaded; speed and memory do not depend on "
                "weight values, but probe accuracy then measures random features")
    return f"weights: {weights}"


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _progress_line(row: dict[str, Any]) -> str:
    prec = "" if row.get("precision", "fp32") == "fp32" else f" {row['precision']}"
    head = f"{row['backbone']} {row['runtime']}{prec} {row['mode']} b={row['batch_size']} {row['image_size']}px"
    if row.get("error"):
        return f"{head}: ERROR {row['error']}"
    mem = f", peak {row['peak_mem_mb']:.0f} MiB" if row.get("peak_mem_mb") else ""
    return f"{head}: {row['throughput']:.1f} img/s, p50 {row['time_p50_ms']:.1f} ms{mem}"
