"""GPU: ResNet-50 features from 8,000 JPEGs of 320 px in `zoo train`, vs the model's own bf16 rate.

    python benchmarks/bench_gpu_extraction.py [--images 8000] [--px 320] [--batch 256]

Targets (one H100): >= 6,000 img/s of cold extraction, and >= 0.5x the model's bf16 rate at the
same batch (the model alone on a batch already on the GPU). Runs three cold extractions (an empty
cache each): CPU decoding in DataLoader workers, `--gpu-decode` (batched nvJPEG), and both with the
default `auto` engine (bf16 on CUDA). Prepared to run in under 5 minutes; needs a CUDA GPU and
exits 2 without one. Random init weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def write(root: Path, n: int, px: int) -> Path:
    import numpy as np
    from PIL import Image

    def one(i):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (px // 16, px // 16, 3), dtype=np.uint8)
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((px, px), Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, range(n)))
    return root


def model_rate(batch: int, dtype) -> float:
    import torch

    from zoo.backbones import create_backbone

    m, _ = create_backbone("torchvision/resnet50", weights=None)
    m = m.cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        for _ in range(5):
            m(x)
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 5:
            m(x)
            n += 1
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--px", type=int, default=320)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    import torch

    import zoo

    if not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark needs one", file=sys.stderr)
        return 2
    bf16 = model_rate(args.batch, torch.bfloat16)
    fp32 = model_rate(64, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = write(tmp / "data", args.images, args.px)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for label, kw in (("CPU decode (workers)", {}), ("--gpu-decode", {"gpu_decode": True})):
            shutil.rmtree(tmp / "cache" / "features", ignore_errors=True)
            shutil.rmtree(tmp / "cache" / "readable", ignore_errors=True)
            t0 = time.perf_counter()
            run = zoo.train("torchvision/resnet50", data, weights=None, epochs=5, batch_size=args.batch,
                            device="cuda", cache_dir=str(tmp / "cache"), progress=False, val_split=0.1, **kw)
            total = time.perf_counter() - t0
            rate = run.cache["misses"] / run.cache["seconds"]
            rows.append((label, rate, total, run.cache.get("engine")))
    print(f"GPU extraction: {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs, ResNet-50, {args.images} JPEGs "
          f"{args.px}px; model alone: {bf16:.0f} img/s bf16 (batch {args.batch}), {fp32:.0f} img/s fp32 channels_last "
          "(batch 64)")
    for label, rate, total, engine in rows:
        print(f"  {label:<22} {rate:8.0f} img/s extraction ({rate / bf16:.2f}x the bf16 rate; targets >= 6000 img/s "
              f"and >= 0.5x), whole run {total:.1f} s, engine {engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
