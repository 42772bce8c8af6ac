"""GPU: ResNet-50 features from 8,000 JPEGs of 320 px in `zoo train`, vs the model's own bf16 rate and
vs the loaders a user writes by hand, on the same folder and the same machine.

    python benchmarks/bench_gpu_extraction.py [--images 8000] [--px 320] [--batch 256]
    python benchmarks/bench_gpu_extraction.py --dry-run    # CPU, 64 images: every code path, no GPU

Targets (issue 20): cold extraction >= 0.5x the model's bf16 rate at its best batch size (the model
alone on a batch already on the GPU, batch sizes 64/128/256/512 tried), and >= 2x the seed-style
torchvision loader (ImageFolder + the backbone's eval transform + DataLoader, the model on the GPU,
NCHW fp32) on the same folder. Also shown: the same loader with channels_last + bf16 autocast (what a
careful user writes). zoo runs two cold extractions (an empty cache each): CPU decoding in
DataLoader workers and `--gpu-decode` (batched nvJPEG), both with the default `auto` engine (bf16 on
CUDA). Prepared to run in under 5 minutes; needs a CUDA GPU (exits 2 without one) unless --dry-run.
Random init weights.
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


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def model_rate(batch: int, dtype, device: str = "cuda", seconds: float = 5.0) -> float:
    """The model alone, channels_last, on a batch already on the device (the upper bound)."""
    import torch

    from zoo.backbones import create_backbone

    m, _ = create_backbone("torchvision/resnet50", weights=None)
    m = m.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for _ in range(2 if device == "cpu" else 5):
            m(x)
        sync(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            m(x)
            n += 1
        sync(device)
    return n * batch / (time.perf_counter() - t0)


def peer_rate(data: Path, batch: int, device: str, careful: bool) -> float:
    """img/s of the loader a user writes: torchvision ImageFolder + the plugin's eval transform +
    DataLoader (workers = min(8, cores), pinned memory on CUDA), the model on the device under
    inference_mode. careful=False is the seed's NCHW fp32; careful=True adds channels_last and bf16
    autocast. DataLoader start-up is included, as in the user's job."""
    import torch
    from torchvision import datasets, transforms

    from zoo.backbones import create_backbone

    module, info = create_backbone("torchvision/resnet50", weights=None)
    norm = info.normalization
    tf = transforms.Compose([transforms.Resize(norm.resize_size), transforms.CenterCrop(norm.input_size[-1]),
                             transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)])
    model = module.to(device).eval()
    if careful:
        model = model.to(memory_format=torch.channels_last)
    workers = min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(data), tf), batch_size=batch,
                                         num_workers=workers, pin_memory=device == "cuda")
    n = 0
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=careful):
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if careful:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            n += len(x)
        sync(device)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--px", type=int, default=320)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dry-run", action="store_true", help="CPU, 64 images, 1 s model timings: the code paths only")
    args = ap.parse_args(argv)
    import torch

    import zoo

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.images, args.batch = min(args.images, 64), min(args.batch, 16)
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark needs one (--dry-run runs the code paths on the CPU)", file=sys.stderr)
        return 2
    seconds = 1.0 if args.dry_run else 5.0
    sizes = [args.batch] if args.dry_run else sorted({64, 128, 256, 512, args.batch})
    bf16_by_batch = {b: model_rate(b, torch.bfloat16, device, seconds) for b in sizes}
    best_batch = max(bf16_by_batch, key=bf16_by_batch.get)
    bf16 = bf16_by_batch[best_batch]
    fp32 = model_rate(min(64, args.batch), None, device, seconds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = write(tmp / "data", args.images, args.px)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        peers = {"seed loader (NCHW fp32)": peer_rate(data, args.batch, device, careful=False),
                 "careful loader (channels_last bf16)": peer_rate(data, args.batch, device, careful=True)}
        variants = [("CPU decode (workers)", {})] + ([] if args.dry_run else [("--gpu-decode", {"gpu_decode": True})])
        for label, kw in variants:
            shutil.rmtree(tmp / "cache" / "features", ignore_errors=True)
            shutil.rmtree(tmp / "cache" / "readable", ignore_errors=True)
            t0 = time.perf_counter()
            run = zoo.train("torchvision/resnet50", data, weights=None, epochs=5, batch_size=args.batch,
                            device=device, cache_dir=str(tmp / "cache"), progress=False, val_split=0.1, **kw)
            total = time.perf_counter() - t0
            rate = run.cache["misses"] / run.cache["seconds"]
            rows.append((label, rate, total, run.cache.get("engine")))
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"GPU extraction: {where}, {os.cpu_count()} CPUs, ResNet-50, {args.images} JPEGs {args.px}px; model alone: "
          f"{bf16:.0f} img/s bf16 at its best batch {best_batch} ("
          + ", ".join(f"{b}: {r:.0f}" for b, r in bf16_by_batch.items())
          + f"), {fp32:.0f} img/s fp32 channels_last (batch {min(64, args.batch)})")
    seed = peers["seed loader (NCHW fp32)"]
    for label, rate in peers.items():
        print(f"  {label:<36} {rate:8.0f} img/s ({rate / bf16:.2f}x the bf16 rate)")
    met = True
    for label, rate, total, engine in rows:
        ok = rate >= 0.5 * bf16 and rate >= 2 * seed
        met &= ok
        print(f"  zoo, {label:<31} {rate:8.0f} img/s ({rate / bf16:.2f}x the bf16 rate, {rate / seed:.2f}x the seed "
              f"loader; targets >= 0.5x and >= 2x: {'met' if ok else 'MISSED'}), whole run {total:.1f} s, "
              f"engine {engine}")
    print(f"targets: {'met' if met else 'MISSED'}{' (dry run: CPU numbers mean nothing)' if args.dry_run else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
