"""--probe: linear-probe accuracy on the embedded Fashion-MNIST sample, so quality shows beside speed.

Every backbone gets the same treatment: the 28x28 grayscale images go through the backbone's own
eval preprocessing (upscaled to its input size, or --image-size), features are extracted once
(inference mode), standardized with the training split's statistics, and the same linear head
(softmax regression, full-batch Adam, fixed steps, fixed seed) is trained on the 400 training
images and scored on the 200 validation images. It is a small sample: differences of a few
points are noise. With random-init weights the number measures random features.
"""

from __future__ import annotations

import time
from typing import Any

PROBE_STEPS = 300
PROBE_LR = 0.01
PROBE_WEIGHT_DECAY = 1e-4


def _normalization(info, image_size: int | None):
    from zoo.data import with_image_size  # the one image-size rounding (keeps the crop ratio)

    return with_image_size(info.normalization, image_size)


def preprocess_images(images, norm):
    """uint8 (N, 28, 28) grayscale -> float32 (N, 3, H, W), the backbone's eval preprocessing."""
    import numpy as np
    from PIL import Image

    from zoo.preprocess import normalize_uint8, resize_crop, to_rgb, to_uint8_hwc

    hwc = np.stack([to_uint8_hwc(resize_crop(to_rgb(Image.fromarray(np.asarray(img), mode="L")), norm))
                    for img in images])
    return normalize_uint8(hwc, norm)


def extract_features(module, images, norm, device: str, batch_size: int):
    import torch

    feats = []
    module.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(preprocess_images(images[i:i + batch_size], norm)).to(device)
            feats.append(module(x).float().flatten(1).cpu())
    return torch.cat(feats)


def fit_linear_head(train_x, train_y, num_classes: int, seed: int = 0):
    """The one head every backbone gets: standardized features -> nn.Linear, softmax regression."""
    import torch

    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp_min(1e-6)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    xs = (train_x - mean) / std
    for _ in range(PROBE_STEPS):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(xs), train_y).backward()
        opt.step()
    return lambda x: head((x - mean) / std)


def linear_probe(name: str, weights: Any, image_size: int | None, device: str, threads: int,
                 batch_size: int = 50, seed: int = 0) -> dict[str, Any]:
    """Never raises: a backbone that cannot be probed gets a result with `error` set."""
    import torch

    from zoo.backbones import create_backbone
    from zoo.embedded import load_embedded_dataset

    from .measure import error_text

    result: dict[str, Any] = {"backbone": name, "weights": weights, "dataset": "embedded Fashion-MNIST sample",
                              "train_images": None, "val_images": None, "image_size": image_size,
                              "val_acc": None, "train_acc": None, "extract_s": None, "error": None,
                              "head": f"linear, standardized features, Adam lr={PROBE_LR} "
                                      f"wd={PROBE_WEIGHT_DECAY}, {PROBE_STEPS} full-batch steps"}
    prev_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        data = load_embedded_dataset()
        torch.manual_seed(seed)
        module, info = create_backbone(name, weights=weights)
        result["weights"] = info.weights
        module = module.to(device)
        norm = _normalization(info, image_size)
        result["image_size"] = norm.input_size[-1]
        t0 = time.perf_counter()
        train_x = extract_features(module, data.train_images, norm, device, batch_size)
        val_x = extract_features(module, data.val_images, norm, device, batch_size)
        result["extract_s"] = round(time.perf_counter() - t0, 2)
        train_y = torch.as_tensor(data.train_labels.astype("int64"))
        val_y = torch.as_tensor(data.val_labels.astype("int64"))
        predict = fit_linear_head(train_x, train_y, data.num_classes, seed)
        with torch.no_grad():
            result["train_acc"] = round(float((predict(train_x).argmax(1) == train_y).float().mean()), 4)
            result["val_acc"] = round(float((predict(val_x).argmax(1) == val_y).float().mean()), 4)
        result["train_images"], result["val_images"] = len(train_y), len(val_y)
    except Exception as exc:  # noqa: BLE001 - the probe is optional: report, do not abort the run
        result["error"] = error_text(exc)
    finally:
        torch.set_num_threads(prev_threads)
    return result
