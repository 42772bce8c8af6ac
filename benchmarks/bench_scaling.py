"""Scaling: zoo.train on 10^3 / 10^4 / 10^5 synthetic images with a tiny backbone, cold feature
cache. Time per item and peak RSS per size, each size in a fresh process (VmHWM). Target: both
within 1.5x of each other across sizes (linear time, bounded memory).

The `auto` engine's one-time probe is done by an untimed first run on the smallest size (its choice
is remembered per machine, as after any first run); each measured size then starts from an empty
feature cache and readable-image record. Whole-run time per item includes the fixed start-up
(imports, plugin registration, model build, worker start: seconds, whatever the size); the features
phase's time per item is the per-item cost.

    python benchmarks/bench_scaling.py [--sizes 1000,10000,100000] [--px 24]

Backbone: example/tinynet (the example plugin, installed into a temporary site directory the way
pip would, 32-dim features), random weights seed0. Images: PNG files of `--px` pixels, two classes,
written once (the largest size; smaller sizes use a prefix of the same files, via a CSV).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def install_example_plugin(site: Path) -> None:
    src = ROOT / "examples" / "zoo-example-plugin" / "src" / "zoo_example_plugin"
    shutil.copytree(src, site / "zoo_example_plugin")
    info = site / "zoo_example_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-example-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[zoo]\nexample = zoo_example_plugin\n")
    (info / "RECORD").write_text("")


def write_images(root: Path, n: int, px: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        c = i % 2
        d = root / f"class{c}" / f"{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (px, px, 3), dtype=np.uint8) // 2 + (100 if c else 0)
        p = d / f"{i:06d}.png"
        Image.fromarray(arr).save(p)
        paths.append(f"{p},class{c}")
    return paths


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(csv: str, cache: str, n: int) -> None:
    import zoo

    t0 = time.perf_counter()
    run = zoo.train("example/tinynet", csv=csv, weights="seed0", epochs=1, batch_size=256, cache_dir=cache,
                    progress=False, val_split=0.1, seed=0)
    dt = time.perf_counter() - t0
    print(json.dumps({"n": n, "seconds": dt, "per_item_ms": 1e3 * dt / n, "peak_rss_mb": peak_rss_mb(),
                      "features_ms": 1e3 * run.cache["seconds"] / n,
                      "misses": run.cache["misses"], "engine": run.cache.get("engine", {}).get("name")}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--px", type=int, default=24)
    ap.add_argument("--child", nargs=3, metavar=("CSV", "CACHE", "N"))
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        site = tmp / "site"
        site.mkdir()
        install_example_plugin(site)
        t0 = time.perf_counter()
        lines = write_images(tmp / "data", max(sizes), args.px)
        print(f"wrote {max(sizes)} {args.px}px PNGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
        results = []
        cache = tmp / "cache"
        for n in [min(sizes)] + sizes:  # the first run: the engine probe, not reported
            csv = tmp / f"items-{n}.csv"
            csv.write_text("path,label\n" + "\n".join(lines[:n]) + "\n")
            shutil.rmtree(cache / "features", ignore_errors=True)
            shutil.rmtree(cache / "readable", ignore_errors=True)
            out = subprocess.run([sys.executable, __file__, "--child", str(csv), str(cache), str(n)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {results[-1]}", file=sys.stderr)
        results = results[1:]
    print(f"scaling: zoo.train example/tinynet, {args.px}px PNGs, cold cache, 1 epoch, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'items':>8}{'seconds':>10}{'ms/item':>10}{'features ms/item':>18}{'peak RSS MiB':>14}")
    for r in results:
        print(f"{r['n']:>8}{r['seconds']:>10.1f}{r['per_item_ms']:>10.3f}{r['features_ms']:>18.3f}"
              f"{r['peak_rss_mb']:>14.0f}")
    t = [r["per_item_ms"] for r in results]
    f = [r["features_ms"] for r in results]
    m = [r["peak_rss_mb"] for r in results]
    print(f"time/item max/min {max(t) / min(t):.2f}x (features phase {max(f) / min(f):.2f}x), peak RSS max/min "
          f"{max(m) / min(m):.2f}x (target <= 1.5x each; whole-run time/item includes ~fixed start-up: imports, "
          "model build, worker start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
