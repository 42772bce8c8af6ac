"""Partial fine-tuning, --freeze 3 on ResNet-18: the frozen prefix computed once per image (and
stored) against today's per-step path that runs it on every step. One run, ratios printed.

    python benchmarks/bench_partial.py [--images 200] [--epochs 10] [--size 224]

Data: 200 Fashion-MNIST images (20 per class) from the embedded sample, written as PNG files, split
80/20 stratified (160 train / 40 val). ResNet-18 random init (saved once to a file, so every
contender trains the same backbone). Every contender is `zoo.train(..., freeze=3)` with the same
settings; only the path differs:
  per-step      today's path: decode, resize and run stem..layer2 (frozen) for every batch, every epoch
                (forced here with ZOO_PREFIX_CACHE_GB=0, the size limit that turns the prefix cache off)
  prefix cold   the frozen prefix's output computed once per image and stored (fp16), then 10 epochs
                of layer3..layer4 + head on it; the store starts empty
  prefix warm   the same again, the prefix outputs read from the store
Target (issue #18): prefix cold >= 3x faster than per-step at equal validation accuracy (within 1
point). Validation numbers are the runs' own (40 images: one image is 2.5 points).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_end_to_end import write_images  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--freeze", type=int, default=3)
    args = ap.parse_args()
    import torch

    import zoo
    from zoo.backbones import create_backbone
    from zoo.io import save_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_images(tmp / "data", args.images)
        torch.manual_seed(0)
        module, _ = create_backbone("torchvision/resnet18", weights=None)
        weights = tmp / "resnet18-random.safetensors"
        save_safetensors(module.state_dict(), weights)
        common = dict(weights=str(weights), freeze=args.freeze, epochs=args.epochs, image_size=args.size,
                      val_split=0.2, device="cpu", progress=False, seed=0, batch_size=32)
        results = {}
        for name, env, cache in (("per-step (today)", "0", "c1"), ("prefix cold", None, "c2"),
                                 ("prefix warm", None, "c2")):
            if env is None:
                os.environ.pop("ZOO_PREFIX_CACHE_GB", None)
            else:
                os.environ["ZOO_PREFIX_CACHE_GB"] = env
            t0 = time.perf_counter()
            run = zoo.train("torchvision/resnet18", str(data), cache_dir=str(tmp / cache), **common)
            results[name] = (time.perf_counter() - t0, run.val_top1, run.cache.get("prefix"))
            print(f"{name}: {results[name][0]:.1f} s, val {100 * run.val_top1:.1f}%, prefix {results[name][2]}",
                  file=sys.stderr, flush=True)
        os.environ.pop("ZOO_PREFIX_CACHE_GB", None)
    base_s, base_acc, _ = results["per-step (today)"]
    print(f"\nResNet-18 random init, --freeze {args.freeze}, {args.images} images x {args.epochs} epochs at "
          f"{args.size} px, CPU (shared, loaded machine)\n")
    print(f"{'path':20} {'seconds':>8} {'val top-1':>10} {'speed-up':>9}")
    for name, (secs, acc, _) in results.items():
        print(f"{name:20} {secs:8.1f} {100 * acc:9.1f}% {base_s / secs:8.1f}x")
    cold_s, cold_acc, _ = results["prefix cold"]
    ok = base_s / cold_s >= 3 and abs(cold_acc - base_acc) <= 0.01 + 1e-9
    print(f"\ntarget (prefix cold >= 3x per-step, val within 1 point): {base_s / cold_s:.1f}x, "
          f"|diff| {100 * abs(cold_acc - base_acc):.1f} points: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
