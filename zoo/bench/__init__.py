"""`zoo bench`: side-by-side backbone benchmarking across runtimes.

    from zoo.bench import BenchConfig, run_bench
    doc = run_bench(BenchConfig(["torchvision/resnet18"], batch_sizes=(1, 8)))
    print(render_table(doc)); write_outputs(doc, "out/"); write_plots(doc, "out/")

Modules, one job each: runtimes (adapters), measure (one timed measurement), isolate (in a
child process), flops, probe (linear-probe accuracy), runner (the loop), report (table, CSV,
JSON, compare), plots (PNG), env (machine description).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": "zoo.bench.runner",
    "run_bench": "zoo.bench.runner",
    "Task": "zoo.bench.measure",
    "measure": "zoo.bench.measure",
    "render_table": "zoo.bench.report",
    "write_outputs": "zoo.bench.report",
    "compare": "zoo.bench.report",
    "render_compare": "zoo.bench.report",
    "write_plots": "zoo.bench.plots",
    "RUNTIMES": "zoo.bench.runtimes",
    "MODES": "zoo.bench.runtimes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zoo.bench' has no attribute {name!r}")
