"""zoo bench: throughput, latency, memory and FLOPs of backbones across runtimes, side by side."""

from __future__ import annotations

import sys

RUNTIME_NAMES = ("eager", "channels_last", "compile", "compile-max-autotune", "compile-cudagraphs", "torchscript",
                 "onnxruntime")
DEFAULT_RUNTIMES = "eager,channels_last,torchscript,onnxruntime"
DEFAULT_CUDA_RUNTIMES = DEFAULT_RUNTIMES + ",compile,compile-cudagraphs"
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("infer", "train-frozen", "train-full")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    import argparse

    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="benchmark backbones across runtimes (speed, latency, memory, FLOPs)",
        description="Measure backbones side by side: parameters, GFLOPs, feature dim, throughput, latency "
        "p50/p95 at batch 1, peak memory (CPU: peak RSS of a fresh child process per measurement; GPU: the CUDA "
        "allocator's peak), for each runtime, mode and batch size. A combination that fails is reported as a row "
        "with its error and the run goes on. Backbones use random init by default (no downloads).",
        epilog=f"runtimes: {', '.join(RUNTIME_NAMES)} (on CPU compile is not in the default set: its compile "
        "time dominates; ask for it. On CUDA the default adds compile and compile-cudagraphs (torch.compile "
        "mode reduce-overhead: CUDA graphs, for batch-1 latency); onnxruntime uses the CUDA provider where "
        "installed, else the CPU provider, and the row says which). precisions: fp32, bf16, fp16 (torch "
        "runtimes under torch.autocast; torchscript and onnxruntime rows are fp32 only). modes: infer = headless backbone forward; train-frozen = features under "
        "inference_mode + a linear-head optimizer step; train-full = full fine-tuning step. "
        "Example: zoo bench torchvision/resnet18 'timm/efficientnet_b*' --batch-size 1,8 --out results/",
    )
    p.add_argument("patterns", nargs="*", metavar="PATTERN", help="backbone names or globs (as in `zoo list`)")
    p.add_argument("--runtime", default=None, metavar="LIST",
                   help=f"comma-separated, from {','.join(RUNTIME_NAMES)} (default: {DEFAULT_RUNTIMES}; on CUDA "
                   f"{DEFAULT_CUDA_RUNTIMES})")
    p.add_argument("--precision", default="fp32", metavar="LIST",
                   help=f"comma-separated, from {','.join(PRECISIONS)} (default fp32), e.g. fp32,bf16")
    p.add_argument("--batch-size", type=_ints, default=[1, 8, 32], metavar="LIST", help="default: 1,8,32")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="square input side (default: each backbone's own input size)")
    p.add_argument("--mode", default=",".join(MODES), metavar="LIST", help=f"comma-separated, from {','.join(MODES)}"
                   " (default: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--weights", default="none", metavar="none|default|TAG",
                   help="none = random init (default; speed does not depend on weights, nothing is downloaded); "
                   "default = the plugin's pretrained weights (matters for --probe)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed calls per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="untimed calls after the first (setup) call (default 2)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads and onnxruntime intra_op threads (default: torch's default here)")
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="run each measurement in a fresh child process (auto: yes on CPU, no on CUDA)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="per isolated measurement; past it the child is killed and the row says so")
    p.add_argument("--head-classes", type=int, default=0, metavar="N",
                   help="infer mode: time backbone + linear head with N classes (default 0: headless backbone)")
    p.add_argument("--probe", action="store_true",
                   help="also linear-probe accuracy on the embedded Fashion-MNIST sample (same head for all); its "
                        "features go through the feature cache under `zoo train`'s key")
    p.add_argument("--no-cache", action="store_true", help="--probe: extract without the feature cache")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write bench.json, bench.csv, bench.txt and PNG plots here (default: bench-results/<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-measurement progress on stderr")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two bench.json files row by row (B / A ratios) and exit")
    return p


def run(args) -> int:
    from zoo.errors import ZooError

    if args.compare:
        return _run_compare(args)
    import time
    from pathlib import Path

    from zoo.bench.plots import write_plots
    from zoo.bench.report import render_table, write_outputs
    from zoo.bench.runner import BenchConfig, run_bench
    from zoo.table import print_json

    if not args.patterns:
        raise ZooError("name at least one backbone or glob, e.g. `zoo bench torchvision/resnet18` "
                       "(or --compare A.json B.json)")
    weights = None if args.weights.lower() in ("none", "random") else args.weights
    cfg = BenchConfig(
        patterns=args.patterns, runtimes=_csv(args.runtime) if args.runtime else None, modes=_csv(args.mode),
        precisions=_csv(args.precision), batch_sizes=args.batch_size,
        image_size=args.image_size, device=args.device, weights=weights, warmup=args.warmup, repeats=args.repeats,
        threads=args.threads, isolate=args.isolate, timeout=args.timeout, head_classes=args.head_classes,
        probe=args.probe, cache=not args.no_cache,
    )
    out_dir = Path(args.out) if args.out else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    doc = run_bench(cfg, progress=progress)
    paths = write_outputs(doc, out_dir)
    plots = [] if args.no_plots else write_plots(doc, out_dir)
    if args.json:
        print_json(doc)
    else:
        print(render_table(doc))
        print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['table']}"
              + (f" and {len(plots)} plots ({', '.join(p.name for p in plots)})" if plots else ""))
    return 0


def _run_compare(args) -> int:
    from zoo.bench.report import compare, load, render_compare
    from zoo.table import print_json

    a, b = load(args.compare[0]), load(args.compare[1])
    rows = compare(a, b)
    if args.json:
        print_json({"a": args.compare[0], "b": args.compare[1], "rows": rows})
    else:
        print(render_compare(a, b, rows, names=(args.compare[0], args.compare[1])))
    return 0
