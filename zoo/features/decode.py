"""Decoding for extraction: the run's DecodePool (persistent DataLoader workers over every source),
JPEG draft decoding, raw JPEG bytes for batched decoding on the device (DeviceJpegDecoder).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch

from ..data import ImageDataset, Samples, count_decode, count_read
from ..records import Normalization


def default_workers(samples: Samples, device: torch.device | None = None) -> int:
    """DataLoader workers for decoding: every core but the one running the model (on CUDA all
    cores decode: the GPU does the math), none for in-memory arrays (nothing to decode)."""
    if not any(isinstance(i, (str, os.PathLike)) for i in samples.items[:1]):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(64, cores if device is not None and device.type == "cuda" else cores - 1))



def read_checked(path, expected: str | None) -> bytes:
    """The file's bytes, read once: hashed here when `expected` (the content hash the run planned
    with: the cache key) is given, and decoded from these same bytes. A file deleted, replaced or
    rewritten since it was listed raises ImageDecodeError naming it (the run skips it and says so)."""
    import hashlib

    from ..preprocess import ImageDecodeError

    count_read()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found (deleted after the run listed it)") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read ({type(exc).__name__}: {exc.strerror or exc})") from None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ImageDecodeError(path, "changed on disk after the run listed it (its content hash differs)")
    return data


def decode_item(samples: Samples, i: int, expected: str | None = None, max_pixels: int | None = None,
                draft: int | None = None, data: bytes | None = None):
    """(PIL RGB image, pixel count) of sample i, decoded by the reference decoder
    (zoo.preprocess.load_image) from `data` (the bytes the run read for the content hash, so the
    file is not opened again) or else from the file read once here (read_checked against
    `expected`); raises ImageDecodeError."""
    from ..preprocess import load_image

    item = samples.items[i]
    if not isinstance(item, (str, os.PathLike)):
        img = samples.load(i)
        return img, img.width * img.height
    if data is None:
        data = read_checked(item, expected)
    count_decode()
    img = load_image(item, max_pixels, data=data, draft=draft)
    return img, img.width * img.height


def _failure_reason(exc) -> str:
    """The reason verify_images lists for a file that does not decode (the same words either way)."""
    return str(exc.__cause__ or getattr(exc, "reason", exc))


class DraftImageDataset(ImageDataset):
    """ImageDataset whose JPEG files are decoded at reduced size (libjpeg DCT scaling) when they are
    at least twice the resize target on each side; see the module docstring for the numerics."""

    def __init__(self, samples: Samples, transform, target: int):
        super().__init__(samples, transform)
        self.target = int(target)

    def __getitem__(self, key):
        import random

        i, seed = (key if isinstance(key, tuple) else (key, None))
        img, _ = decode_item(self.samples, i, draft=self.target)
        arr = self.transform(img, random.Random(seed) if seed is not None else None)
        return torch.from_numpy(np.require(arr, requirements=["C", "W"])), int(self.samples.labels[i]), i


class JpegBytesDataset(ImageDataset):
    """For batched JPEG decoding on the device: JPEG files (eval transform) come back as their raw
    bytes, anything else (PNG, seeded views, arrays) preprocessed on the CPU as usual."""

    def __getitem__(self, key):
        i = key if not isinstance(key, tuple) else None
        item = self.samples.items[i] if i is not None else None
        if isinstance(item, (str, os.PathLike)) and str(item).lower().endswith((".jpg", ".jpeg")):
            held = getattr(self, "data", None)
            data = torch.frombuffer(bytearray(held if held is not None else
                                              read_checked(item, getattr(self, "expected", None))), dtype=torch.uint8)
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

    def __call__(self, items) -> tuple[torch.Tensor, list[str], list[int]]:
        """(uint8 NHWC batch on the device, failure reason per row ("" ok), pixel counts: 0 unknown)."""
        from ..preprocess import ImageDecodeError

        reasons = [it[1] if it[0] == "failed" else "" for it in items]
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
                elif it[0] == "failed":
                    pixels[j] = _placeholder(self.transform).to(self.device)
                else:  # the device decoder refused it: the CPU reference path
                    self.fallbacks += 1
                    try:
                        img, _ = decode_item(self.samples, it[3])
                        arr = self.transform(img, None)
                        pixels[j] = torch.from_numpy(np.require(arr, requirements=["C", "W"])).to(self.device)
                    except ImageDecodeError as exc:
                        reasons[j] = _failure_reason(exc)
                        pixels[j] = _placeholder(self.transform).to(self.device)
        return torch.stack(pixels), reasons, [0] * len(items)


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


def _placeholder(transform) -> torch.Tensor:
    """A black image of the transform's output size: the row of a file that failed (never used)."""
    _, h, w = transform.norm.input_size
    return torch.zeros((h, w, 3), dtype=torch.uint8)


class _PoolDataset:
    """Every (source, decoding) the run extracts from, in one dataset: the workers get it once and
    serve the train and validation passes (and every view) from it. Key: (source, kind, dataset key,
    expected content hash or None, the file's bytes or None), kind "plain", "bytes" (device
    decoding) or ("draft", target size). With the bytes (those the run hashed: HeldBytes) the file
    is not opened again; without, it is read and checked against the expected hash.

    An item is (uint8 HWC, label, index, failure reason ("" when it decoded), pixel count). The
    extraction's decode is the run's verification: a file that does not decode, or that changed
    or vanished since it was listed, comes back as a placeholder with its reason, never as an
    exception in a worker (which would abort the run with a worker traceback)."""

    def __init__(self, sources: list, max_pixels: int | None = None):
        self.sources = sources
        self.max_pixels = max_pixels
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
        import random

        from ..preprocess import ImageDecodeError

        s, kind, k, expected, data = key
        samples, transform = self.sources[s]
        i, seed = (k if isinstance(k, tuple) else (k, None))
        label = int(samples.labels[i])
        if kind == "bytes":
            ds = self._dataset(s, kind)
            ds.expected, ds.data = expected, data
            try:
                return ds[k]
            except ImageDecodeError as exc:
                return ("failed", _failure_reason(exc), label, i)
        try:
            img, px = decode_item(samples, i, expected, self.max_pixels, kind[1] if isinstance(kind, tuple) else None,
                                  data)
        except ImageDecodeError as exc:
            return _placeholder(transform), label, i, _failure_reason(exc), 0
        arr = transform(img, random.Random(seed) if seed is not None else None)
        return torch.from_numpy(np.require(arr, requirements=["C", "W"])), label, i, "", px


class _Batches:
    """A persistent loader's batch sampler: the main process iterates it afresh at each pass (workers
    only ever receive keys), so each pass sets its own batches. A batch is let go once handed out:
    its keys carry files' bytes, which need not outlive their trip to a worker."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        for b in range(len(self.batches)):
            batch, self.batches[b] = self.batches[b], None
            yield batch

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
    context manager) stops them. max_pixels: the run's --max-image-pixels (the extraction's decode
    is its verification)."""

    def __init__(self, sources, device: torch.device, num_workers: int, max_pixels: int | None = None):
        self.sources = [(samples, transform) for samples, transform in sources]
        self.device, self.num_workers, self.max_pixels = device, int(num_workers), max_pixels
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
            self._loader = DataLoader(_PoolDataset(self.sources, self.max_pixels), batch_sampler=self._sampler,
                                      num_workers=self.num_workers, collate_fn=_collate,
                                      pin_memory=self.device.type == "cuda",
                                      generator=torch.Generator().manual_seed(0), **extra)
        return self._loader

    def batches(self, samples: Samples, transform, keys: Sequence, batch_size: int, kind="plain",
                hashes: Sequence[str | None] | None = None, data: Sequence[bytes | None] | None = None):
        """(batches of positions into keys, an iterator of the decoded batches, in that order).
        hashes[j]: the content hash keys[j]'s file must still have (None: not checked); data[j]: its
        bytes, already read (None: the worker reads the file)."""
        s = self.source(samples, transform)
        positions = [list(range(i, min(i + batch_size, len(keys)))) for i in range(0, len(keys), batch_size)]
        self._sampler.batches = [[(s, kind, keys[j], hashes[j] if hashes is not None else None,
                                   data[j] if data is not None else None) for j in b] for b in positions]
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
