"""--probe: linear-probe accuracy on the embedded Fashion-MNIST sample, so quality shows beside speed.

Every backbone gets the same treatment: the 28x28 grayscale images go through the backbone's own
eval preprocessing (upscaled to its input size, or --image-size), features are extracted the way
`zoo train` extracts them (its engine choice and feature cache, under its key: probing again, or
training on the sample afterwards, extracts nothing), standardized with the training split's
statistics, and the same linear head
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


def probe_features(name: str, weights: Any, image_size: int | None, device: str, seed: int = 0,
                   cache: bool = True, cache_dir: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(train features, val features, facts) of the embedded sample, extracted the way `zoo train`
    extracts them (the backbone's eval transform, zoo's engine choice, the feature cache) and under
    the key `zoo train` uses for the same backbone, weights and image size: a second probe, or a
    `zoo train` on the sample afterwards, extracts nothing (tests/test_bench.py holds the two to that)."""
    import torch

    from zoo.data import EvalTransform, embedded_samples, with_image_size
    from zoo.features import cached_features, model_key
    from zoo.model import build_model
    from zoo.device import seed_everything

    train, val = embedded_samples()
    seed_everything(seed)  # random-init weights: the same draw (and cache key) as `zoo train --seed`
    model = build_model(name, list(train.classes), weights=weights)
    norm = with_image_size(model.meta.normalization, image_size)
    model.backbone.requires_grad_(False)
    model.to(device)
    eval_tf = EvalTransform(norm)
    key = dict(model_key(model), transform=eval_tf.describe(), view_seed=None)
    out, facts = [], {"weights": model.meta.weights, "image_size": norm.input_size[-1], "hits": 0, "misses": 0}
    t0 = time.perf_counter()
    for samples in (train, val):
        feats, stats = cached_features(model.backbone, samples, eval_tf, norm, key_fields=key,
                                       device=torch.device(device), cache=cache, cache_dir=cache_dir,
                                       desc=f"{name} probe features")
        out.append(feats[0])
        facts["hits"] += stats.hits
        facts["misses"] += stats.misses
        facts["engine"] = stats.engine.get("name") if stats.engine else None
    facts["extract_s"] = round(time.perf_counter() - t0, 2)
    return out[0], out[1], facts


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
                 seed: int = 0, cache: bool = True, cache_dir: str | None = None) -> dict[str, Any]:
    """Never raises: a backbone that cannot be probed gets a result with `error` set."""
    import torch

    from zoo.embedded import load_embedded_dataset

    from .measure import error_text

    result: dict[str, Any] = {"backbone": name, "weights": weights, "dataset": "embedded Fashion-MNIST sample",
                              "train_images": None, "val_images": None, "image_size": image_size,
                              "val_acc": None, "train_acc": None, "extract_s": None, "error": None,
                              "cache": None, "engine": None,
                              "head": f"linear, standardized features, Adam lr={PROBE_LR} "
                                      f"wd={PROBE_WEIGHT_DECAY}, {PROBE_STEPS} full-batch steps"}
    prev_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        data = load_embedded_dataset()
        train_x, val_x, facts = probe_features(name, weights, image_size, device, seed, cache, cache_dir)
        result.update(weights=facts["weights"], image_size=facts["image_size"], extract_s=facts["extract_s"],
                      engine=facts["engine"], cache=f"{facts['hits']} hit / {facts['misses']} extracted")
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
