"""Cold extraction in `zoo train` vs the fastest engine's raw rate, same backbone, batch and threads.

    python benchmarks/bench_extraction.py [--images 1200] [--px 320] [--batch 64]
        [--backbones timm/tf_efficientnet_lite0,torchvision/resnet18]

Raw rate (the mean of a measurement right before and right after the cold runs): each engine (eager, channels_last, onnxruntime, bf16 where the CPU has native bf16) on one
preprocessed batch already in memory, timed after a warm-up call: the model alone. Cold extraction:
`zoo.train --epochs 1` (train and validation images both extracted) on a folder of `--images` JPEGs (`--px` square, decoded, resized and cropped
as the plugin says) with an empty feature cache; img/s = images / the trainer's feature phase
(hashing, cache lookup, decode + preprocess in DataLoader workers, the engine, writing shards).
The `auto` engine's one-time probe is done by a first, untimed run on 1,300 small JPEGs (its choice is
remembered per machine); `--amp bf16` lets the trainer use bf16. Target: cold >= 0.9x the fastest
engine's raw rate (for fp32 runs, the fastest fp32 engine is the comparable one; both are printed).
Random init weights (speed does not depend on them; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def write_jpegs(root: Path, n: int, px: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (px // 8, px // 8, 3), dtype=np.uint8)
    for i in range(n):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        tile = np.roll(base, i, axis=(0, 1))
        tile[0, 0] = (i % 256, (i // 256) % 256, 255)  # every file distinct (no duplicate content hashes)
        img = Image.fromarray(tile).resize((px, px), Image.BILINEAR)
        img.save(d / f"{i:05d}.jpg", quality=90)
    return root


def raw_rates(name: str, batch: int, threads: int | None = None, engines: list[str] | None = None) -> dict[str, float]:
    """img/s of each of zoo's `engines` (default: every CPU engine) on one random batch in memory, as
    the trainer prepares them, timed after a warm-up call (the ONNX export is not timed); an engine
    that fails is printed and left out. Also the other benchmarks' raw diagnostic."""
    import torch

    from zoo.features import engines as E
    from zoo.backbones import create_backbone

    torch.manual_seed(0)
    module, info = create_backbone(name, weights=None)
    size = info.normalization.input_size[-1]
    x = torch.randn(batch, 3, size, size)
    out = {}
    names = engines or ["eager", "channels_last", "onnxruntime"] + (
        ["bf16"] if E.bf16_supported(torch.device("cpu")) else [])
    with tempfile.TemporaryDirectory() as onnx_dir:
        for eng in names:
            try:
                p = E.prepare(eng, module, x, torch.device("cpu"), onnx_dir=onnx_dir, threads=threads)
                with torch.inference_mode():
                    p.run(x)
                    t0, calls = time.perf_counter(), 0
                    while calls < 3 or time.perf_counter() - t0 < 3.0:
                        p.run(x)
                        calls += 1
                out[eng] = calls * batch / (time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                print(f"  {name} {eng}: {exc}", file=sys.stderr)
    return out


def cold_rate(name: str, data: Path, cache: Path, batch: int, **kw) -> tuple[float, dict]:
    import zoo

    shutil.rmtree(cache / "features", ignore_errors=True)
    shutil.rmtree(cache / "readable", ignore_errors=True)
    run = zoo.train(name, data, weights=None, epochs=1, batch_size=batch, cache_dir=str(cache), progress=False,
                    val_split=0.1, seed=0, **kw)
    n = run.cache["misses"]
    return n / run.cache["seconds"], run.cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--px", type=int, default=320)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backbones", default="timm/tf_efficientnet_lite0,torchvision/resnet18")
    args = ap.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_jpegs(tmp / "data", args.images, args.px)
        for name in args.backbones.split(","):
            cache = tmp / "cache"
            probe_data = write_jpegs(tmp / f"probe-{len(lines)}", 1300, 48)  # large enough for auto to time every engine, cheap to decode
            cold_rate(name, probe_data, cache, args.batch)  # the auto probe, once (remembered afterwards)
            before = raw_rates(name, args.batch, threads)
            auto, info = cold_rate(name, data, cache, args.batch)
            bf16, info16 = cold_rate(name, data, cache, args.batch, amp="bf16")
            after = raw_rates(name, args.batch, threads)
            # the machine is shared: raw rates are taken right before and after, and averaged
            raw = {k: (before[k] + after[k]) / 2 for k in before if k in after}
            print(f"  {name} raw before {before}, after {after}", file=sys.stderr)
            fp32_best = max((v for k, v in raw.items() if k != "bf16"), default=float("nan"))
            best = max(raw.values())
            lines.append((name, raw, auto, info, bf16, info16, fp32_best, best))
    print(f"cold extraction in zoo.train vs raw engine rates: {args.images} JPEGs {args.px}px, batch {args.batch}, "
          f"{threads} threads, {os.cpu_count()} CPUs (shared machine: load avg {os.getloadavg()[0]:.1f})")
    for name, raw, auto, info, bf16, info16, fp32_best, best in lines:
        print(f"{name}: raw img/s " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(raw.items(), key=lambda kv: -kv[1])))
        print(f"  zoo.train cold (engine {info['engine'].get('name')}): {auto:.1f} img/s = {auto / fp32_best:.2f}x the "
              f"fastest fp32 engine, {auto / best:.2f}x the fastest engine")
        print(f"  zoo.train cold --amp bf16 (engine {info16['engine'].get('name')}): {bf16:.1f} img/s = "
              f"{bf16 / best:.2f}x the fastest engine (target >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
