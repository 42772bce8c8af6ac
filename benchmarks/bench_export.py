"""Two benchmarks.

`--seconds`: how long the main job's `zoo export RUN` (all formats) takes, per step and format
(export and validation seconds from export-report.json, wall and CPU time of the whole command),
for this checkout ("after") and a git ref ("before", default main), in alternating rounds:

    python benchmarks/bench_export.py --seconds [--run RUN] [--before main] [--rounds 2]

RUN defaults to a fresh `zoo.train()` with no options (lite0 on the embedded sample). The
"before" checkout is a temporary `git worktree` run through PYTHONPATH.

Default: ResNet-18 inference: eager PyTorch (NCHW and channels_last) vs TorchScript vs ONNX Runtime,
and our exported ONNX (baked uint8 preprocessing, softmax, embedding, metadata) vs a bare ONNX
Runtime run of the same network. All measured in one run, interleaved round-robin so that load
from other processes hits every engine alike.

    python benchmarks/bench_export.py [--rounds 5] [--iters 20] [--size 224] [--json out.json]

The weights are random init (torchvision/resnet18, weights=None): timing does not depend on the
values, and no download is needed. Reported: batch-1 latency p50/p95 (ms) and batch-8
throughput (images/s, median over rounds); ratios against eager NCHW; and our artifact's batch-8
throughput over the bare ORT run's (target: within 5%, i.e. ratio >= 0.95), both in wall time
and in CPU time on one thread (that second figure does not move with other processes' load).

Inputs per engine: eager/TorchScript/bare ORT take the float normalized NCHW batch; our
baked artifact takes the uint8 NHWC batch and does the scaling and mean/std inside the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _timeit(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def build(size: int, workdir: Path):
    import dataclasses

    import onnxruntime as ort
    import torch

    import zoo
    from zoo.model import build_model

    torch.manual_seed(0)
    model = build_model("torchvision/resnet18", [f"class{i}" for i in range(10)], weights=None)
    norm = dataclasses.replace(model.meta.normalization, input_size=(3, size, size), resize_size=int(size / 0.875))
    model.meta = dataclasses.replace(model.meta, normalization=norm)
    model.eval()

    t = time.perf_counter()
    rep_baked = zoo.export(model, formats=["onnx"], out=workdir / "baked", preprocess="normalize")
    rep_ts = zoo.export(model, formats=["torchscript"], out=workdir / "ts", preprocess="none", embedding=False)
    export_s = time.perf_counter() - t

    # the bare network: the same ZooModel straight through torch.onnx.export, logits only
    bare = workdir / "bare.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(bare), dynamo=True, external_data=False,
                          opset_version=18, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False)
    model.eval()

    def session(path, threads=0):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    s_bare, s_ours = session(bare), session(workdir / "baked" / "model.onnx")
    s1_bare, s1_ours = session(bare, threads=1), session(workdir / "baked" / "model.onnx", threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 marks torch.jit.* deprecated
        ts = torch.jit.load(str(workdir / "ts" / "model.torchscript.pt"))
    cl_model = __import__("copy").deepcopy(model).to(memory_format=torch.channels_last)

    rng = np.random.default_rng(0)
    u8 = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in (1, 8)}
    from zoo.preprocess import normalize_uint8

    f32 = {b: normalize_uint8(u8[b], norm) for b in (1, 8)}
    t32 = {b: torch.from_numpy(f32[b]) for b in (1, 8)}
    tcl = {b: t32[b].contiguous(memory_format=torch.channels_last) for b in (1, 8)}

    def eager(m, x):
        def run():
            with torch.inference_mode():
                m(x)
        return run

    engines = {
        "eager NCHW": {b: eager(model, t32[b]) for b in (1, 8)},
        "eager channels_last": {b: eager(cl_model, tcl[b]) for b in (1, 8)},
        "TorchScript (frozen)": {b: eager(ts, t32[b]) for b in (1, 8)},
        "ORT bare network": {b: (lambda x=f32[b]: s_bare.run(None, {"input": x})) for b in (1, 8)},
        "ORT ours (baked uint8)": {b: (lambda x=u8[b]: s_ours.run(None, {"image": x})) for b in (1, 8)},
    }
    single_thread = {
        "ORT bare network": lambda: s1_bare.run(None, {"input": f32[8]}),
        "ORT ours (baked uint8)": lambda: s1_ours.run(None, {"image": u8[8]}),
    }
    info = {
        "export_seconds": round(export_s, 1),
        "validation": {k: {m: r["artifacts"][k]["validation"][m] for m in ("max_abs_logit_diff", "top1_agreement",
                                                                           "min_embedding_cosine")}
                       for r, k in ((rep_baked, "onnx"), (rep_ts, "torchscript"))},
    }
    return engines, single_thread, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds over all engines")
    ap.add_argument("--iters", type=int, default=20, help="batch-1 calls per engine per round")
    ap.add_argument("--iters8", type=int, default=4, help="batch-8 calls per engine per round")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--seconds", action="store_true", help="time the main job's `zoo export RUN` before/after")
    ap.add_argument("--run", default=None, help="with --seconds: the run to export (default: a fresh zoo.train())")
    ap.add_argument("--before", default="main", help="with --seconds: the git ref to compare with ('' to skip)")
    args = ap.parse_args(argv)
    if args.seconds:
        return export_seconds(args)

    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        engines, single_thread, info = build(args.size, Path(tmp))
        for runs in engines.values():  # warm up (JIT profiling passes, ORT arenas)
            for b in (1, 8):
                for _ in range(3):
                    runs[b]()
        lat = {name: [] for name in engines}
        thr = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, runs in engines.items():
                lat[name] += _timeit(runs[1], args.iters)
                t8 = _timeit(runs[8], args.iters8)
                thr[name].append(8 * len(t8) / sum(t8))
        # ours vs bare once more in CPU time on one thread each: immune to other processes' load
        cpu = {name: [] for name in single_thread}
        for _ in range(args.rounds + 2):
            for name, fn in single_thread.items():
                fn()
                t = time.process_time()
                fn()
                fn()
                cpu[name].append((time.process_time() - t) / 2)

    results = {}
    for name in engines:
        ms = np.array(lat[name]) * 1000
        results[name] = {"b1_p50_ms": float(np.percentile(ms, 50)), "b1_p95_ms": float(np.percentile(ms, 95)),
                         "b8_img_per_s": float(statistics.median(thr[name]))}
    base = results["eager NCHW"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ResNet-18 (random init), {args.size}x{args.size}, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {ort.__version__}; {args.rounds} rounds x ({args.iters} b1 + {args.iters8} b8 calls); load average {load:.1f}")
    print(f"{'engine':<24} {'b1 p50 ms':>10} {'b1 p95 ms':>10} {'b8 img/s':>10} {'b8 vs eager':>12}")
    for name, r in results.items():
        print(f"{name:<24} {r['b1_p50_ms']:>10.2f} {r['b1_p95_ms']:>10.2f} {r['b8_img_per_s']:>10.1f} "
              f"{r['b8_img_per_s'] / base['b8_img_per_s']:>11.2f}x")
    ours, bare = results["ORT ours (baked uint8)"], results["ORT bare network"]
    ratio = ours["b8_img_per_s"] / bare["b8_img_per_s"]
    lat_ratio = ours["b1_p50_ms"] / bare["b1_p50_ms"]
    print(f"\nours (baked preprocessing + softmax + embedding) / bare ORT: batch-8 throughput {ratio:.3f}, "
          f"batch-1 p50 latency {lat_ratio:.3f}  (target: throughput >= 0.95 -> "
          f"{'MET' if ratio >= 0.95 else 'MISSED'})")
    cpu_s = {name: statistics.median(v) for name, v in cpu.items()}
    cpu_ratio = cpu_s["ORT bare network"] / cpu_s["ORT ours (baked uint8)"]
    print(f"same, in CPU time on 1 thread (load-independent): bare {8 / cpu_s['ORT bare network']:.1f} img/s, "
          f"ours {8 / cpu_s['ORT ours (baked uint8)']:.1f} img/s -> ratio {cpu_ratio:.3f} "
          f"({'MET' if cpu_ratio >= 0.95 else 'MISSED'})")
    print(f"ORT bare / eager channels_last (b8): {bare['b8_img_per_s'] / results['eager channels_last']['b8_img_per_s']:.2f}x; "
          f"TorchScript / eager NCHW (b8): {results['TorchScript (frozen)']['b8_img_per_s'] / base['b8_img_per_s']:.2f}x")
    print(f"export + validation took {info['export_seconds']} s; validation: {json.dumps(info['validation'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ours_over_bare_b8": ratio,
                                               "ours_over_bare_b1_p50": lat_ratio,
                                               "ours_over_bare_b8_cpu_1thread": cpu_ratio, **info,
                                               "args": vars(args)}, indent=2))
    return 0


def export_seconds(args) -> int:
    """`zoo export RUN` (all formats) for this checkout and `args.before`, alternating rounds."""
    import resource
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    run = args.run
    if run is None:
        import zoo

        run = str(zoo.train(out=str(work / "run")).dir)
    checkouts = {"after": None}
    if args.before:
        before = work / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(repo), "archive", args.before], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        checkouts["before"] = before
    rows: dict[str, list[dict]] = {k: [] for k in checkouts}
    try:
        for r in range(args.rounds):
            for name, tree in (checkouts.items() if r % 2 == 0 else reversed(list(checkouts.items()))):
                env = dict(os.environ)
                if tree is not None:
                    env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in ("", "exporters", "plugins"))
                out = work / f"{name}-{r}"
                usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", "from zoo.cli.main import main; raise SystemExit(main())",
                                       "export", run, "--out", str(out)], env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
                report = json.loads((out / "export-report.json").read_text()) if (out / "export-report.json").exists() else {}
                per = {n: (a.get("export_seconds"), (a.get("validation") or {}).get("seconds"))
                       for n, a in report.get("artifacts", {}).items()}
                rows[name].append({"exit": proc.returncode, "wall": round(wall, 1), "cpu": round(cpu, 1), "formats": per,
                                   "steps": report.get("seconds")})
                steps = report.get("seconds") or {}
                print(f"round {r} {name:<6} exit {proc.returncode} wall {wall:6.1f} s cpu {cpu:6.1f} s  "
                      f"reference {steps.get('reference')} s  " + "  ".join(
                    f"{n}: export {e} s validate {v} s" for n, (e, v) in per.items()), flush=True)
                if proc.returncode != 0:  # a failed round is no timing: say why
                    print(f"  {name} failed: " + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300],
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{os.cpu_count()} cores, load average {load:.1f} (other processes share the CPU: compare ratios)")
    timed = {k: [x for x in v if x["exit"] == 0] for k, v in rows.items()}  # failed rounds time nothing
    med = {k: statistics.median(x["wall"] for x in v) for k, v in timed.items() if v}
    medc = {k: statistics.median(x["cpu"] for x in v) for k, v in timed.items() if v}
    for k in med:
        print(f"{k:<6} median wall {med[k]:.1f} s, CPU {medc[k]:.1f} s")
    if "before" in med:
        print(f"after / before: wall {med['after'] / med['before']:.2f}x, CPU {medc['after'] / medc['before']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
