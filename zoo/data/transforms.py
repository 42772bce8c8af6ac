"""Transforms from the backbone's Normalization record. Eval transform = zoo.preprocess.resize_crop,
normalization = zoo.preprocess.normalize_uint8's arithmetic (done on the device by
:func:`normalize_batch`), so training, export validation and the torch-free predictor see the same
pixels. The train transform is a RandomResizedCrop + horizontal flip whose randomness comes from an
explicit per-sample seed, so it is reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..preprocess import _RESAMPLE, resize_crop, to_uint8_hwc
from ..records import Normalization

if TYPE_CHECKING:
    from .sources import Samples


def with_image_size(norm: Normalization, size: int | None) -> Normalization:
    """The record for another input size, keeping its crop ratio (resize = floor(size / crop_pct))."""
    if not size or size == norm.input_size[-1]:
        return norm
    resize = max(1, int(math.floor(size / norm.crop_pct)))
    return replace(norm, input_size=(norm.input_size[0], int(size), int(size)), resize_size=resize)


class EvalTransform:
    """PIL RGB -> uint8 HWC array: the reference resize + center crop."""

    def __init__(self, norm: Normalization):
        self.norm = norm

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        return to_uint8_hwc(resize_crop(img, self.norm))

    def describe(self) -> dict:
        return {"kind": "eval", "normalization": self.norm.to_dict()}


class TrainTransform:
    """RandomResizedCrop (torchvision's sampling algorithm) + horizontal flip, seeded per call."""

    def __init__(self, norm: Normalization, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True):
        self.norm, self.scale, self.ratio, self.hflip = norm, tuple(scale), tuple(ratio), hflip

    def _box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return left, top, w, h
        in_ratio = width / height  # fallback: central crop, as torchvision does
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        rng = rng or random.Random()
        left, top, w, h = self._box(img.width, img.height, rng)
        _, out_h, out_w = self.norm.input_size
        out = img.resize((out_w, out_h), _RESAMPLE[self.norm.interpolation], box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_hwc(out)

    def describe(self) -> dict:
        return {"kind": "random_resized_crop", "scale": list(self.scale), "ratio": list(self.ratio),
                "hflip": self.hflip, "normalization": self.norm.to_dict()}


def sample_seed(*parts) -> int:
    """A stable 63-bit seed from (run seed, epoch/view, image index...)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class ImageDataset:
    """torch-style dataset over Samples. Keys are an index, or (index, seed) for seeded transforms.
    Returns (uint8 HWC tensor, label, index)."""

    def __init__(self, samples: Samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        import torch

        i, seed = (key if isinstance(key, tuple) else (key, None))
        rng = random.Random(seed) if seed is not None else None
        arr = self.transform(self.samples.load(i), rng)
        return torch.from_numpy(np.require(arr, requirements=["C", "W"])), int(self.samples.labels[i]), i


def normalize_batch(batch_hwc, norm: Normalization, device=None, channels_last: bool = False):
    """uint8 (N, H, W, 3) tensor -> float32 (N, 3, H, W) with exactly normalize_uint8's arithmetic
    ((x / 255 - mean) / std in float32), done on `device`."""
    import torch

    x = batch_hwc.to(device, non_blocking=True) if device is not None else batch_hwc
    # Reorder while the pixels are one byte each, then one float32 buffer normalized in place: the
    # same operations as (x / 255 - mean) / std, without four full-size temporaries per batch.
    x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last if channels_last else
                                          torch.contiguous_format).to(torch.float32)
    x.div_(torch.tensor(255.0, dtype=torch.float32, device=x.device))
    x.sub_(torch.tensor(norm.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    return x.div_(torch.tensor(norm.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
