"""Warm vs cold `zoo train` on a folder of 2,000 JPEGs: the warm run must be >= 10x faster and
decode no image.

    python benchmarks/bench_warm.py [--images 2000] [--px 160] [--backbone torchvision/resnet18]
        [--image-size 112]

Cold: empty feature cache (every image verified, decoded and extracted). Warm: the same command
again with another head (an MLP), as in a sweep over head settings: the files are hashed, the
features read from the cache, nothing decoded. Decodes are counted with zoo.data.decode_count() in
this process; a warm run starts no DataLoader at all (0 misses), so no worker can decode either.
Random init weights; 3 epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--px", type=int, default=160)
    ap.add_argument("--backbone", default="torchvision/resnet18")
    ap.add_argument("--image-size", type=int, default=112)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_extraction import write_jpegs

    import zoo
    from zoo.data import decode_count

    common = dict(weights=None, epochs=3, batch_size=64, image_size=args.image_size, progress=False, val_split=0.2,
                  seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_jpegs(tmp / "data", args.images, args.px)
        results = []
        for label, kw in (("cold", {}), ("warm", {"head": "mlp", "hidden": (256,)})):
            d0, t0 = decode_count(), time.perf_counter()
            run = zoo.train(args.backbone, data, cache_dir=str(tmp / "cache"), **common, **kw)
            results.append((label, time.perf_counter() - t0, decode_count() - d0, run.cache, run.val_top1))
    (_, cold_s, cold_dec, cold_c, _), (_, warm_s, warm_dec, warm_c, _) = results
    print(f"warm vs cold zoo.train: {args.images} JPEGs {args.px}px, {args.backbone} at {args.image_size}px, 3 epochs, "
          f"{os.cpu_count()} CPUs (shared machine: load avg {os.getloadavg()[0]:.1f})")
    print(f"  cold: {cold_s:.1f} s, {cold_c['misses']} extracted, {cold_dec} decodes in this process "
          f"(+ those in DataLoader workers), engine {cold_c.get('engine', {}).get('name')}")
    print(f"  warm: {warm_s:.1f} s, {warm_c['hits']} cached / {warm_c['misses']} extracted, {warm_dec} decodes")
    print(f"  warm is {cold_s / warm_s:.1f}x faster (target >= 10x) with {warm_dec} images decoded (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
