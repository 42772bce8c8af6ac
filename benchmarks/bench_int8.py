"""Is int8 worth shipping? Every static int8 recipe (`-O int8_recipe=...`) on three models, in one run.

    python benchmarks/bench_int8.py [--run RUN] [--recipes nncf ort-minmax ...] [--models main mnv2 fmnist]
                                    [--fmnist 2000 1000] [--optimized] [--json out.json]

Models:
  main    the main job: `zoo train` with no options (lite0, ImageNet weights, the embedded
          Fashion-MNIST sample 400/200), or --run RUN; calibrated on the run's recorded training
          sample (as `zoo export RUN --quantize int8` does), judged on its whole validation split.
  mnv2    torchvision MobileNetV2 with its ImageNet classifier (`--head pretrained`; weights from
          ../shared/weights seeded into a temporary TORCH_HOME) on real photos from installed
          packages (scikit-image's, matplotlib's, scikit-learn's), each as 9 views (whole, mirrored,
          crops at 4 scales): two thirds judged, the other third (other crops) calibrates.
          Unlabelled: top-1 agreement with fp32 is the measure.
  fmnist  lite0 trained by `zoo.train` on Fashion-MNIST from ../shared/data/fashion-mnist
          (--fmnist TRAIN VAL images, class-balanced, seeded), judged on all VAL images.

Per model and recipe: fp32 and int8 top-1 (labelled) with the drop's 95% paired bootstrap
interval, top-1 agreement with fp32, the gate's verdict, file size ratio, ONNX Runtime speed
ratio fp32/int8 at batch 1 and 8 (best of interleaved rounds, same threads), and the same gate in
OpenVINO (compile_model defaults) and OpenCV (dnn.readNetFromONNX). Speeds are noisy on a shared
machine: read the ratios, not the milliseconds.
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
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "camera", "coins", "moon", "page", "text", "clock", "gravel", "brick", "grass")


# -- data --------------------------------------------------------------------------------------------
def write_fmnist(root: Path, stem: str, count: int, seed: int) -> Path:
    from PIL import Image

    with gzip.open(FMNIST / f"{stem}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{stem}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(np.flatnonzero(labels == c), count // len(CLASSES), replace=False):
            Image.fromarray(images[i]).save(root / name / f"{stem}_{i:05d}.png")
    return root


def photos():
    """(name, PIL RGB) real photos that ship with installed packages (no download)."""
    import glob

    from PIL import Image

    out = []
    try:
        import skimage.data as d

        for n in SKIMAGE_PHOTOS:
            try:
                a = d.__getattribute__(n)()
            except Exception:  # noqa: BLE001, S112 - a sample that needs a download
                continue
            out.append((f"skimage:{n}", Image.fromarray(np.asarray(a, np.uint8)).convert("RGB")))
    except ImportError:
        pass
    files = []
    for mod, pattern in (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), ("sklearn", "datasets/images/*.jpg")):
        try:
            files += sorted(glob.glob(os.path.join(os.path.dirname(__import__(mod).__file__), pattern)))
        except ImportError:
            pass
    out += [(os.path.basename(f), Image.open(f).convert("RGB")) for f in files]
    return out


def photo_views(norm):
    """(judged, calibration) uint8 NHWC: 9 views per photo, every third view calibrates."""
    from PIL import Image

    from zoo.preprocess import resize_crop, to_uint8_hwc

    judged, calib = [], []
    for k, (_, img) in enumerate(photos()):
        w, h = img.size
        rng = np.random.default_rng(k)
        boxes = [(0, 0, w, h)]
        for s in (0.8, 0.65, 0.5, 0.4):
            for _ in range(2):
                cw, ch = int(w * s), int(h * s)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                boxes.append((x0, y0, x0 + cw, y0 + ch))
        for i, b in enumerate(boxes):
            v = img.crop(b)
            if i % 2:
                v = v.transpose(Image.FLIP_LEFT_RIGHT)
            (calib if i % 3 == 2 else judged).append(to_uint8_hwc(resize_crop(v, norm)))
    return np.stack(judged), np.stack(calib)


def run_split(run_dir, model):
    """The run's whole validation split (pixels, labels) and its calibration images, as the export uses."""
    from zoo.exporting.images import _calibration_images, _pixels
    from zoo.runs import recorded_validation

    samples, _ = recorded_validation(run_dir, model.meta.labels)
    pixels = _pixels(samples, range(len(samples)), model.meta.normalization)
    targets = [int(t) for t in samples.labels]
    calibration, _ = _calibration_images(model, run_dir, None, lambda m: None)
    return pixels, targets, calibration


# -- measuring ---------------------------------------------------------------------------------------
def speed_ratios(fp32: Path, int8: Path, x: np.ndarray, rounds: int = 5) -> dict:
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in
                (("fp32", fp32), ("int8", int8))}
    out = {}
    for batch in (1, 8):
        b = np.ascontiguousarray(x[:batch])
        best = {k: float("inf") for k in sessions}
        for s in sessions.values():
            s.run(None, {s.get_inputs()[0].name: b})
        for _ in range(rounds):
            for k, s in sessions.items():  # interleaved
                t0 = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: b})
                best[k] = min(best[k], time.perf_counter() - t0)
        out[f"speed_b{batch}"] = round(best["fp32"] / best["int8"], 3)
    return out


def measure(model, name: str, pixels, targets, calibration, recipes, work: Path, optimized: bool = False) -> list[dict]:
    from zoo_onnx import export_onnx
    from zoo_onnx.graph import _ort_optimize
    from zoo_onnx.int8 import _consumer_runner, _quantize_static, _top1, int8_gate

    from zoo.validation import Tolerance, eager_outputs

    fp32 = work / f"{name}-fp32.onnx"
    export_onnx(model, fp32, preprocess="normalize")
    # --optimized: each recipe also quantizes the fp32 file with ONNX Runtime's basic offline
    # optimizations saved in (what `--optimize` exports); speed is always against the default fp32 file
    bases = {"": fp32}
    if optimized:
        bases["+opt"] = work / f"{name}-fp32-opt.onnx"
        shutil.copy(fp32, bases["+opt"])
        _ort_optimize(bases["+opt"])
    ref_top1 = eager_outputs(model, pixels)["logits"].argmax(1)
    tol = Tolerance()
    rows = []
    for recipe, tag in [(r, t) for r in recipes for t in bases]:
        base, int8 = bases[tag], work / f"{name}-{recipe}{tag}.onnx"
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                _quantize_static(model, str(base), int8, calibration, "normalize", "all", tmp, recipe)
        except Exception as exc:  # noqa: BLE001 - a recipe that cannot run here is a row saying so
            rows.append({"model": name, "recipe": recipe + tag, "error": f"{type(exc).__name__}: {exc}"})
            continue
        row = {"model": name, "recipe": recipe + tag, "quantize_seconds": round(time.perf_counter() - t0, 1),
               "images": len(pixels), "calibration_images": len(calibration),
               "size_ratio": round(int8.stat().st_size / fp32.stat().st_size, 3)}
        for runtime in ("onnxruntime", "openvino", "opencv"):
            try:
                g = int8_gate(ref_top1, _top1(_consumer_runner(runtime, int8), pixels), targets, tol)
            except Exception as exc:  # noqa: BLE001
                row[runtime] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                continue
            row[runtime] = {k: g[k] for k in ("passed", "top1_agreement", "fp32_accuracy", "int8_accuracy", "drop",
                                              "drop_interval95") if k in g}
        row.update(speed_ratios(fp32, int8, pixels))
        rows.append(row)
        print(line(row), flush=True)
    return rows


def line(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:7s} {row['recipe']:15s} error: {row['error'][:100]}"
    o = row["onnxruntime"]
    acc = (f"fp32 {o['fp32_accuracy']:.3f} int8 {o['int8_accuracy']:.3f} drop {100 * o['drop']:+.1f} "
           f"[{100 * o['drop_interval95'][0]:+.1f}, {100 * o['drop_interval95'][1]:+.1f}]") if "drop" in o else ""
    other = " ".join(f"{'ov' if rt == 'openvino' else 'cv'} {row[rt].get('top1_agreement', float('nan')):.3f}"
                     f"{'' if row[rt].get('passed') else '(fail)'}" for rt in ("openvino", "opencv")
                     if "error" not in row[rt]) or "-"
    errs = " ".join(f"{rt} error" for rt in ("openvino", "opencv") if "error" in row[rt])
    return (f"{row['model']:7s} {row['recipe']:15s} n={row['images']:<5d} {acc} agree {o['top1_agreement']:.3f} "
            f"{'pass' if o['passed'] else 'FAIL'} | size {row['size_ratio']:.2f}x speed b1 {row['speed_b1']:.2f}x "
            f"b8 {row['speed_b8']:.2f}x | {other} {errs}")


def main(argv=None) -> int:
    from zoo_onnx.int8 import INT8_RECIPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="the main job's run directory (default: train it here)")
    ap.add_argument("--models", nargs="+", default=["main", "mnv2", "fmnist"], choices=("main", "mnv2", "fmnist"))
    ap.add_argument("--recipes", nargs="+", default=list(INT8_RECIPES), choices=tuple(INT8_RECIPES))
    ap.add_argument("--fmnist", nargs=2, type=int, default=(2000, 1000), metavar=("TRAIN", "VAL"))
    ap.add_argument("--optimized", action="store_true",
                    help="also quantize each recipe from the ORT-optimized fp32 file (what --optimize exports)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import zoo
    from zoo.model import load_model, pretrained_classifier

    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    rows: list[dict] = []
    try:
        if "main" in args.models:
            run_dir = Path(args.run) if args.run else work / "main-run"
            if not args.run:
                zoo.train(out=run_dir, progress=False)
            model = load_model(run_dir)
            rows += measure(model, "main", *run_split(run_dir, model), args.recipes, work, args.optimized)
        if "mnv2" in args.models:
            src = SHARED / "weights" / MOBILENET_FILE
            if src.is_file():
                ckpt = work / "torch-home" / "hub" / "checkpoints"
                ckpt.mkdir(parents=True)
                (ckpt / MOBILENET_FILE).symlink_to(src)
                os.environ["TORCH_HOME"] = str(work / "torch-home")
                model = pretrained_classifier("torchvision/mobilenet_v2", weights="IMAGENET1K_V1")
                judged, calib = photo_views(model.meta.normalization)
                rows += measure(model, "mnv2", judged, None, calib, args.recipes, work, args.optimized)
            else:
                print(f"mnv2 skipped: {src} is absent", file=sys.stderr)
        if "fmnist" in args.models:
            if FMNIST.is_dir():
                n_train, n_val = args.fmnist
                train_dir = write_fmnist(work / "fm-train", "train", n_train, seed=0)
                val_dir = write_fmnist(work / "fm-val", "t10k", n_val, seed=1)
                zoo.train("timm/tf_efficientnet_lite0", train_dir, val_data=str(val_dir), out=work / "fm-run",
                          progress=False)
                model = load_model(work / "fm-run")
                rows += measure(model, "fmnist", *run_split(work / "fm-run", model), args.recipes, work, args.optimized)
            else:
                print(f"fmnist skipped: {FMNIST} is absent", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(line(r) for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
