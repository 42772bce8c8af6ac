"""Decoding for extraction: the run's DecodePool (persistent DataLoader workers over every source),
JPEG draft decoding, raw JPEG bytes for batched decoding on the device (DeviceJpegDecoder).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch

from ..data import ImageDataset, Samples, count_decode
from ..records import Normalization


def default_workers(samples: Samples, device: torch.device | None = None) -> int:
    """DataLoader workers for decoding: every core but the one running the model (on CUDA all
    cores decode: the GPU does the math), none for in-memory arrays (nothing to decode)."""
    if not any(isinstance(i, (str, os.PathLike)) for i in samples.items[:1]):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(64, cores if device is not None and device.type == "cuda" else cores - 1))



class DraftImageDataset(ImageDataset):
    """ImageDataset whose JPEG files are decoded at reduced size (libjpeg DCT scaling) when they are
    at least twice the resize target on each side; see the module docstring for the numerics."""

    def __init__(self, samples: Samples, transform, target: int):
        super().__init__(samples, transform)
        self.target = int(target)

    def __getitem__(self, key):
        import random

        from PIL import Image, ImageOps

        from ..preprocess import ImageDecodeError, to_rgb

        i, seed = (key if isinstance(key, tuple) else (key, None))
        item = self.samples.items[i]
        if not isinstance(item, (str, os.PathLike)):
            return super().__getitem__(key)
        count_decode()
        try:
            with Image.open(item) as img:
                if img.format == "JPEG" and min(img.size) >= 4 * self.target:
                    img.draft("RGB", (2 * self.target, 2 * self.target))  # keeps >= 2x the target
                img.load()
                img = to_rgb(ImageOps.exif_transpose(img) or img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"{item}: not a readable image ({type(exc).__name__}: {exc})") from exc
        arr = self.transform(img, random.Random(seed) if seed is not None else None)
        return torch.from_numpy(np.require(arr, requirements=["C", "W"])), int(self.samples.labels[i]), i


class JpegBytesDataset(ImageDataset):
    """For batched JPEG decoding on the device: JPEG files (eval transform) come back as their raw
    bytes, anything else (PNG, seeded views, arrays) preprocessed on the CPU as usual."""

    def __getitem__(self, key):
        i = key if not isinstance(key, tuple) else None
        item = self.samples.items[i] if i is not None else None
        if isinstance(item, (str, os.PathLike)) and str(item).lower().endswith((".jpg", ".jpeg")):
            with open(item, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            return ("jpeg", data, int(self.samples.labels[i]), i)
        arr, label, idx = super().__getitem__(key)
        return ("pixels", arr, label, idx)


def _collate_mixed(items):
    return items


class DeviceJpegDecoder:
    """Batched JPEG decoding with torchvision.io.decode_jpeg on `device` (nvJPEG on CUDA), then the
    eval geometry (shorter side to resize_size, antialiased, center crop) in torch. A batch the
    decoder refuses (CMYK, progressive corner cases, a damaged file) is decoded image by image,
    and an image that still fails goes through the CPU reference path, so nothing is dropped.
    Pixels differ slightly from PIL's (another JPEG IDCT and resize): cached under its own key."""

    KEY = "device-jpeg+torch-resize"

    def __init__(self, samples: Samples, transform, norm: Normalization, device: torch.device):
        self.samples, self.transform, self.norm, self.device = samples, transform, norm, device
        self.fallbacks = 0

    def _geometry(self, chw: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as Fn

        (_, out_h, out_w), resize = self.norm.input_size, int(self.norm.resize_size)
        h, w = chw.shape[1:]
        if self.norm.crop_mode == "squash":
            nh, nw = resize, resize
        elif w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        mode = {"bicubic": "bicubic", "nearest": "nearest"}.get(self.norm.interpolation, "bilinear")
        x = chw.unsqueeze(0).float()
        if (nh, nw) != (h, w):
            x = Fn.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest",
                               align_corners=False if mode != "nearest" else None)
        x = x.round_().clamp_(0, 255)
        top, left = int(round((nh - out_h) / 2.0)), int(round((nw - out_w) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: pad like the reference
            x = Fn.pad(x, (max(0, -left), max(0, out_w - nw + max(0, -left)), max(0, -top),
                           max(0, out_h - nh + max(0, -top))))
            top, left = max(0, top), max(0, left)
        return x[0, :, top:top + out_h, left:left + out_w].permute(1, 2, 0).to(torch.uint8)

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        kw = dict(mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+ points to torchcodec
            return self._decode_all(data, decode_jpeg, kw)

    @staticmethod
    def _decode_all(data, decode_jpeg, kw) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(data, **kw))
        except Exception:  # noqa: BLE001 - one bad file spoils the batch call: retry one by one
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, **kw))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def __call__(self, items) -> tuple[torch.Tensor, None, None]:
        jpegs = [j for j, it in enumerate(items) if it[0] == "jpeg"]
        decoded = self._decode([items[j][1] for j in jpegs]) if jpegs else []
        count_decode(sum(d is not None for d in decoded))
        pixels: list[torch.Tensor | None] = [None] * len(items)
        for j, img in zip(jpegs, decoded):
            if img is not None:
                pixels[j] = self._geometry(img)
        for j, it in enumerate(items):
            if pixels[j] is None:
                if it[0] == "pixels":
                    pixels[j] = it[1].to(self.device)
                else:  # the device decoder refused it: the CPU reference path
                    self.fallbacks += 1
                    count_decode()
                    arr = self.transform(self.samples.load(it[3]), None)
                    pixels[j] = torch.from_numpy(np.require(arr, requirements=["C", "W"])).to(self.device)
        return torch.stack(pixels), None, None


_HEAP_BOUNDED = [False]


def bound_heap_growth() -> None:
    """Large buffers (>= 1 MiB) get their own memory mapping, returned to the OS when freed.

    Why: each extraction batch allocates and frees the same few multi-megabyte tensors (the
    uint8 batch, its float32 normalization, the engine's buffers). glibc raises its mmap threshold
    after the first such free, so from then on they come from the heap, interleaved with small
    long-lived objects, and the freed space is not returned: peak RSS grew by ~250 MB per 4,096
    extracted images (bench_scaling.py: 1.1 GB at 10^3 images, 2.4 GB at 10^5). A fixed threshold
    keeps it flat for the cost of a page fault per buffer page (about 1% of a batch's time).
    Once per process; a no-op where the C library is not glibc."""
    if _HEAP_BOUNDED[0]:
        return
    _HEAP_BOUNDED[0] = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _PoolDataset:
    """Every (source, decoding) the run extracts from, in one dataset: the workers get it once and
    serve the train and validation passes (and every view) from it. Key: (source, kind, dataset key),
    kind "plain", "bytes" (device decoding) or ("draft", target size)."""

    def __init__(self, sources: list):
        self.sources = sources
        self._made: dict = {}

    def _dataset(self, s: int, kind):
        ds = self._made.get((s, kind))
        if ds is None:
            samples, transform = self.sources[s]
            ds = (DraftImageDataset(samples, transform, kind[1]) if isinstance(kind, tuple)
                  else JpegBytesDataset(samples, transform) if kind == "bytes" else ImageDataset(samples, transform))
            self._made[(s, kind)] = ds
        return ds

    def __len__(self) -> int:
        return sum(len(samples) for samples, _ in self.sources)

    def __getitem__(self, key):
        s, kind, k = key
        return self._dataset(s, kind)[k]


class _Batches:
    """A persistent loader's batch sampler: the main process iterates it afresh at each pass (workers
    only ever receive keys), so each pass sets its own batches."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items):
    # device decoding gets (kind, data, label, index) tuples as they are; CPU decoding a uint8 batch
    if items and isinstance(items[0], tuple) and isinstance(items[0][0], str):
        return items
    from torch.utils.data import default_collate

    return default_collate(items)


class DecodePool:
    """One set of DataLoader workers for a whole run's extraction: the sources (Samples and their
    transform: the train set with its views, the validation set) are known up front, the workers
    start at the first batch anyone asks for (a warm run, all cached, starts none) and then stay up
    (persistent_workers) for every later pass, prefetching; pinned memory on CUDA. close() (or the
    context manager) stops them."""

    def __init__(self, sources, device: torch.device, num_workers: int):
        self.sources = [(samples, transform) for samples, transform in sources]
        self.device, self.num_workers = device, int(num_workers)
        self._loader = None
        self._sampler = _Batches()

    def source(self, samples: Samples, transform) -> int:
        for s, (sm, tf) in enumerate(self.sources):
            if sm is samples and tf is transform:
                return s
        if self._loader is not None and self.num_workers > 0:
            raise ValueError("DecodePool: every source must be named before the workers start")
        self.sources.append((samples, transform))
        return len(self.sources) - 1

    def _get_loader(self):
        if self._loader is None:
            from torch.utils.data import DataLoader

            extra = {"prefetch_factor": 4, "persistent_workers": True} if self.num_workers > 0 else {}
            self._loader = DataLoader(_PoolDataset(self.sources), batch_sampler=self._sampler,
                                      num_workers=self.num_workers, collate_fn=_collate,
                                      pin_memory=self.device.type == "cuda",
                                      generator=torch.Generator().manual_seed(0), **extra)
        return self._loader

    def batches(self, samples: Samples, transform, keys: Sequence, batch_size: int, kind="plain"):
        """(batches of positions into keys, an iterator of the decoded batches, in that order)."""
        s = self.source(samples, transform)
        positions = [list(range(i, min(i + batch_size, len(keys)))) for i in range(0, len(keys), batch_size)]
        self._sampler.batches = [[(s, kind, keys[j]) for j in b] for b in positions]
        return positions, iter(self._get_loader())

    def close(self) -> None:
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



def _has_device_decoder() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False
