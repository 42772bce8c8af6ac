"""Scoring: the one evaluation loop (`score`), the metrics record, and zoo.evaluate()."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..device import select_device
from ..errors import ZooError


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, count: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a binomial proportion (95% by default): unlike the normal
    approximation it stays inside [0, 1] and keeps close to its nominal coverage at small counts
    and near 0% or 100%. None for count 0."""
    if count <= 0:
        return None
    p = correct / count
    denom = 1 + z * z / count
    centre = (p + z * z / (2 * count)) / denom
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == count else min(1.0, centre + half)
    return lo, hi


def _metrics(loss_sum: float, confusion) -> dict:
    """loss, top-1 with its 95% Wilson interval, per-class recall (None for a class with no
    images), the confusion matrix (rows: true class)."""
    cm = np.asarray(confusion, dtype=np.int64)
    count = int(cm.sum())
    correct = int(np.trace(cm))
    per_class = [float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None for i in range(len(cm))]
    ci = wilson_interval(correct, count)
    return {"loss": loss_sum / max(1, count), "top1": float(correct / max(1, count)), "count": count,
            "top1_ci95": list(ci) if ci else None, "interval": "Wilson score, 95%",
            "per_class": per_class, "per_class_recall": per_class, "confusion": cm.tolist()}


def score(module, batches, num_classes: int, device, amp_dtype=None, label_smoothing: float = 0.0):
    """The one evaluation loop: (loss sum as a float64 tensor of one, confusion matrix (K, K)) of
    `module` in eval mode over (inputs, labels) batches. Training's validation and evaluate() use it."""
    import torch

    k = num_classes
    confusion = torch.zeros((k, k), dtype=torch.int64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    module.eval()
    with torch.inference_mode():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = module(x).float()
            loss_sum += loss_fn(logits, y).item()
            pred = logits.argmax(1).cpu()
            confusion += torch.bincount(y.cpu() * k + pred, minlength=k * k).reshape(k, k)
    return loss_sum, confusion


def evaluate(model, data: str | os.PathLike | None = None, csv: str | os.PathLike | None = None, *,
             batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
             strict: bool = False, max_image_pixels: int | None = None) -> dict:
    """Top-1, loss, per-class accuracy and confusion matrix of a ZooModel (or a run directory)
    on a labelled folder/CSV. The folder may hold only some of the model's classes; a class the
    model does not know is an error listing them. With no data/csv, a run directory is scored on
    the validation split it recorded (a clear error if it has none)."""
    from torch.utils.data import DataLoader

    from .. import runs
    from ..data import EvalTransform, ImageDataset, align_labels, normalize_batch, read_csv, scan_folder
    from ..data import verify_images
    from ..model import ZooModel, load_model
    from ..options import EvaluateConfig

    run_dir = None if isinstance(model, ZooModel) else Path(model)
    EvaluateConfig(run=str(run_dir or "<model>"), data=None if data is None else os.fspath(data),
                   csv=None if csv is None else os.fspath(csv), batch_size=batch_size, device=device,
                   num_workers=num_workers, strict=strict,
                   **({"max_image_pixels": max_image_pixels} if max_image_pixels else {}))
    model = load_model(run_dir) if run_dir is not None else model
    labels = list(model.labels)
    # the labelled images, indexed by the model's labels
    if data is None and csv is None:
        if run_dir is None:
            raise ZooError("evaluate(model) needs data= or csv= (or pass the run directory, to score its recorded "
                           "validation split)")
        samples, source = runs.recorded_validation(run_dir, labels)
        skipped: list = []
    elif csv is not None:
        samples, skipped = read_csv(csv, root=data, classes=labels, min_classes=1)
        source = os.fspath(csv)
    else:
        samples, skipped = scan_folder(data, min_classes=1)
        samples = align_labels(samples, labels, repr(os.fspath(data)))
        source = os.fspath(data)
    samples, skipped = verify_images(samples, strict, already_skipped=skipped, max_pixels=max_image_pixels)
    # the model over them
    dev = select_device(device)
    norm = model.normalization
    model = model.to(dev)
    workers = num_workers if num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    idx = list(range(len(samples)))
    loader = DataLoader(ImageDataset(samples, EvalTransform(norm)),
                        batch_sampler=[idx[i:i + batch_size] for i in range(0, len(idx), batch_size)],
                        num_workers=workers if len(idx) > batch_size else 0)
    batches = ((normalize_batch(images, norm, dev), y) for images, y, _ in loader)
    loss_sum, confusion = score(model, batches, len(labels), dev)
    out = _metrics(float(loss_sum[0]), confusion.numpy())
    out["labels"] = labels
    selection = (model.meta.extra.get("training") or {}).get("selection") or {}
    out["cv"] = selection.get("cv")  # the training run's cross-validated estimate, when it made one
    out["source"] = source
    out["skipped"] = [list(s) for s in skipped]
    return out
