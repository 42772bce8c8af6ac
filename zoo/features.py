"""Feature extraction and the on-disk feature cache.

With the backbone fully frozen and a deterministic transform, an image's features never change, so
the trainer extracts them once and trains the head on cached tensors. The cache lives under
``$ZOO_CACHE_DIR`` (default ``~/.cache/backbone-zoo``) in ``features/<model key>/``, where the model
key hashes everything that determines a feature vector except the image:

  backbone name, weights id, a digest of the backbone's actual state dict (so random init, local
  files and plugin changes are covered too), the preprocessing (normalization record and transform:
  eval, or the augmentation parameters and seed of a view; JPEG draft decoding), the engine's
  numerics (fp32, or bf16: zoo.engines), a format version.

Layout (format 2). Shards are safetensors files holding one float32 matrix "features" (rows x D);
``index.jsonl`` has one line per shard: its file name, sha256 and the row names, where a row name
is ``<sha256 of the image bytes>[.v<view>]``. So a second run with another head, or on a superset
of the images, reuses what is there; any change to the key is a different directory (never a
stale hit). A lookup reads the index once, not every shard.

Streaming: rows are written to a shard every SHARD_ROWS extracted images (atomically, then the
index line is appended), so memory does not grow with the data and an interrupted run keeps what
it extracted. Reading: shards are memory-mapped and only the wanted rows copied; each shard's
sha256 is verified the first time it is read in a process, and a shard that fails (damaged,
missing) is reported once, its rows are misses (re-extracted), and a tombstone line in the index
keeps it from being reported again. The returned feature matrix of a single-process run lives in
an unlinked temporary file, memory-mapped, so training on 10^5+ images reads features from the
page cache instead of holding them all in RAM.

Determinism: extraction runs with the global RNG state saved and restored, so a head trained on a
cold run (features just extracted) is identical to one trained on a warm run (features read from
the cache), dropout included: a DataLoader draws its base seed from the global generator.

Warm path: `readable_hashes` remembers the content hashes of images that decoded successfully, so
`zoo.data.verify_images` skips decoding them; with every feature cached a warm run hashes the
files and reads the cache, and decodes nothing.

JPEG draft decoding (``jpeg_draft=True``, opt-in): a JPEG at least twice the resize target on
each side is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (keeping at least twice the target), then
resized as usual. It changes pixel values slightly compared with the reference full decode that
zoo.preprocess (and so `zoo predict`) uses, so it is part of the cache key and off by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from . import distributed as D
from .data import ImageDataset, Samples, count_decode, normalize_batch, sample_seed
from .engines import NonFiniteFeatures
from .errors import ZooError
from .io import save_safetensors, write_json
from .records import Normalization

FEATURE_FORMAT = 2
SHARD_ROWS = 4096
INDEX = "index.jsonl"
MATRIX = "features"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ZOO_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "backbone-zoo"


_DIGESTS: dict[int, tuple] = {}  # id(module) -> (weak ref, stamp, digest)


def _stamp(state: dict) -> tuple | None:
    """What identifies the tensors' current contents without reading them: storage address and
    version counter (bumped by every in-place write). None where a tensor has no counter."""
    try:
        return tuple((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), str(t.device))
                     for name, t in state.items())
    except RuntimeError:  # inference-mode tensors carry no version counter
        return None


def state_digest(module: nn.Module) -> str:
    """sha256 of the module's state dict (names, dtypes, shapes, bytes). A run asks for it several
    times (the cache key, the engine choice, the ONNX file name): hashing ResNet-18's 45 MB costs
    about 0.3 s each, so the digest is remembered until a tensor is replaced or written in place."""
    import weakref

    state = module.state_dict()
    stamp = _stamp(state)
    memo = _DIGESTS.get(id(module))
    if stamp is not None and memo is not None and memo[0]() is module and memo[1] == stamp:
        return memo[2]
    d = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        d.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        d.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = d.hexdigest()
    if stamp is not None:
        for k in [k for k, v in _DIGESTS.items() if v[0]() is None]:
            del _DIGESTS[k]
        _DIGESTS[id(module)] = (weakref.ref(module), stamp, digest)
    return digest


def model_key(model, amp_dtype: torch.dtype | None = None) -> dict:
    """The model part of a feature-cache key (see the module docstring): what determines a
    feature vector apart from the image and its transform. The caller adds `transform` and
    `view_seed`; FeatureCache adds the format version."""
    return {"backbone": model.meta.backbone, "weights": model.meta.weights, "state": state_digest(model.backbone),
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"}


def default_workers(samples: Samples, device: torch.device | None = None) -> int:
    """DataLoader workers for decoding: every core but the one running the model (on CUDA all
    cores decode: the GPU does the math), none for in-memory arrays (nothing to decode)."""
    if not any(isinstance(i, (str, os.PathLike)) for i in samples.items[:1]):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(64, cores if device is not None and device.type == "cuda" else cores - 1))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0
    extract_seconds: float = 0.0
    engine: dict = field(default_factory=dict)
    damaged: list = field(default_factory=list)

    def add(self, other: "CacheStats") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.seconds += other.seconds
        self.extract_seconds += other.extract_seconds
        self.engine = self.engine or other.engine
        self.damaged += other.damaged


# ------------------------------------------------------------------------------------------ cache
def _sha256_file(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            d.update(chunk)
    return d.hexdigest()


def _mmap_matrix(path: Path) -> np.ndarray:
    """The "features" matrix of a shard, memory-mapped (safetensors: u64 header size, JSON header,
    raw little-endian data), without reading the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    info = header[MATRIX]
    if info["dtype"] != "F32" or len(info["shape"]) != 2:
        raise ValueError(f"unexpected {MATRIX} tensor {info['dtype']} {info['shape']}")
    start, end = info["data_offsets"]
    rows, dim = info["shape"]
    if end - start != rows * dim * 4:
        raise ValueError("data size does not match the shape")
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + n + start, shape=(rows, dim))


class FeatureCache:
    def __init__(self, root: str | os.PathLike, key_fields: dict):
        self.key_fields = dict(key_fields, feature_format=FEATURE_FORMAT)
        blob = json.dumps(self.key_fields, sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:32]
        self.dir = Path(root) / "features" / self.key
        self._shards: dict[str, dict] | None = None  # shard file -> {"sha256", "names"}
        self._rows: dict[str, tuple[str, int]] = {}  # row name -> (shard, row)
        self._verified: set[str] = set()
        self.damaged: list[str] = []  # reasons, one per damaged shard met in this process

    # index -------------------------------------------------------------------------------------
    def _load_index(self) -> None:
        if self._shards is not None:
            return
        shards: dict[str, dict] = {}
        path = self.dir / INDEX
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        if rec.get("dropped"):
                            shards.pop(rec["shard"], None)
                        else:
                            shards[rec["shard"]] = {"sha256": rec["sha256"], "names": list(rec["names"])}
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line (killed mid-append): those rows are misses
        self._shards = shards
        self._rows = {nm: (s, r) for s, rec in shards.items() for r, nm in enumerate(rec["names"])}

    def _append_index(self, rec: dict) -> None:
        # One write() with O_APPEND: lines from concurrent writers (ranks, runs) do not interleave.
        data = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.dir / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _drop(self, shard: str, reason: str) -> None:
        self.damaged.append(f"{self.dir / shard}: {reason}")
        warnings.warn(f"feature cache shard {self.dir / shard} is unusable ({reason}); its "
                      f"{len(self._shards[shard]['names'])} features will be extracted again", stacklevel=3)
        names = self._shards.pop(shard)["names"]
        for nm in names:
            if self._rows.get(nm, (None,))[0] == shard:
                del self._rows[nm]
        with contextlib.suppress(OSError):
            self._append_index({"shard": shard, "dropped": reason})

    def _usable(self, shard: str) -> bool:
        if shard in self._verified:
            return True
        path = self.dir / shard
        if not path.is_file():
            self._drop(shard, "file missing")
            return False
        if _sha256_file(path) != self._shards[shard]["sha256"]:
            self._drop(shard, "checksum mismatch: damaged on disk")
            return False
        self._verified.add(shard)
        return True

    # reading -----------------------------------------------------------------------------------
    def dim(self) -> int | None:
        self._load_index()
        for shard in list(self._shards):
            if self._usable(shard):
                return int(_mmap_matrix(self.dir / shard).shape[1])
        return None

    def locate(self, names: Sequence[str]) -> list[tuple[str, int] | None]:
        """Where each name's row is (shard, row), None for a miss; damaged shards count as misses."""
        self._load_index()
        where = [self._rows.get(nm) for nm in names]
        for shard in {w[0] for w in where if w is not None}:
            self._usable(shard)
        return [self._rows.get(nm) if w is not None else None for nm, w in zip(names, where)]

    def read_into(self, out, positions: Sequence[int], where: Sequence[tuple[str, int]]) -> None:
        """out[positions[j]] = the cached row at where[j]; one memory map per shard."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for p, (shard, row) in zip(positions, where):
            by_shard.setdefault(shard, []).append((p, row))
        for shard, pairs in by_shard.items():
            m = _mmap_matrix(self.dir / shard)
            pos = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
            rows = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
            for i in range(0, len(pairs), SHARD_ROWS):  # bounded temporary copies
                out[torch.from_numpy(pos[i:i + SHARD_ROWS])] = torch.from_numpy(np.asarray(m[rows[i:i + SHARD_ROWS]]))
            del m

    def lookup(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """name -> feature vector for the cached names (small sets; the trainer uses locate/read_into)."""
        keys = list(keys)
        where = self.locate(keys)
        hits = [(k, w) for k, w in zip(keys, where) if w is not None]
        if not hits:
            return {}
        out = torch.empty((len(hits), self.dim() or 0))
        self.read_into(out, range(len(hits)), [w for _, w in hits])
        return {k: out[j] for j, (k, _) in enumerate(hits)}

    # writing -----------------------------------------------------------------------------------
    def store(self, items: dict[str, torch.Tensor]) -> None:
        if items:
            names = list(items)
            self.write_shard(names, torch.stack([items[k].float().flatten() for k in names]))

    def write_shard(self, names: Sequence[str], matrix: torch.Tensor) -> None:
        """One shard, atomically, then its index line (a shard without a line is simply unused)."""
        if not len(names):
            return
        self._load_index()
        if not (self.dir / "key.json").exists():
            write_json(self.dir / "key.json", self.key_fields)
        names = list(names)
        shard = hashlib.sha256("\n".join(names).encode()).hexdigest()[:24] + ".safetensors"
        save_safetensors({MATRIX: matrix.float().contiguous()}, self.dir / shard)
        rec = {"shard": shard, "sha256": _sha256_file(self.dir / shard), "names": names}
        self._append_index(rec)
        self._shards[shard] = {"sha256": rec["sha256"], "names": names}
        self._verified.add(shard)
        for r, nm in enumerate(names):
            self._rows[nm] = (shard, r)


# --------------------------------------------------------------------------------- readable images
class ReadableSet:
    """Content hashes of image files that decoded successfully (decoding the same bytes again
    cannot fail), with their pixel counts, so a warm run need not decode to verify and a later,
    lower --max-image-pixels still applies. ``<cache>/readable/hashes.txt``: lines "<sha256> <pixels>"
    ("<sha256>" alone: decoded, size not recorded; such an entry is verified again once)."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "readable" / "hashes.txt"
        self._known: dict[str, int | None] | None = None

    def known(self) -> dict[str, int | None]:
        """sha256 -> pixel count (None: not recorded); a later line for a hash wins."""
        if self._known is None:
            self._known = {}
            with contextlib.suppress(OSError):
                with open(self.path, encoding="ascii", errors="replace") as f:
                    for ln in f:
                        h, _, px = ln.strip().partition(" ")
                        if len(h) == 64:
                            self._known[h] = int(px) if px.isdigit() else None
        return self._known

    def trusted(self, h: str, max_pixels: int) -> bool:
        """Decoded before, and within `max_pixels`: need not be decoded again."""
        px = self.known().get(h)
        return px is not None and px <= max_pixels

    def add(self, entries) -> None:
        """entries: sha256 strings, or (sha256, pixel count) pairs."""
        known = self.known()
        new: dict[str, int | None] = {}
        for e in entries:
            h, px = (e, None) if isinstance(e, str) else (e[0], int(e[1]))
            if h not in known or (known[h] is None and px is not None):
                new[h] = px
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, "".join(f"{h} {px}\n" if px is not None else f"{h}\n" for h, px in sorted(new.items())
                                 ).encode())
        finally:
            os.close(fd)
        known.update(new)


def readable_hashes(cache_dir=None) -> ReadableSet:
    return ReadableSet(cache_root(cache_dir))


# ------------------------------------------------------------------------------------- extraction
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


class DraftImageDataset(ImageDataset):
    """ImageDataset whose JPEG files are decoded at reduced size (libjpeg DCT scaling) when they are
    at least twice the resize target on each side; see the module docstring for the numerics."""

    def __init__(self, samples: Samples, transform, target: int):
        super().__init__(samples, transform)
        self.target = int(target)

    def __getitem__(self, key):
        import random

        from PIL import Image, ImageOps

        from .data import count_decode
        from .preprocess import ImageDecodeError, to_rgb

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


_SELECTIONS: dict = {}  # (id(backbone), ...) -> Selection: train and val extraction share one choice


def _engine_for(backbone, x, device, engine: str, allow_reduced: bool, total: int, cache_dir, batch_size: int,
                say):
    from . import engines as E

    key = (id(backbone), str(device), batch_size, engine, allow_reduced)
    sel = _SELECTIONS.get(key)
    if sel is not None and sel[0]() is backbone:
        return sel[1], False
    import weakref

    choice_key = f"{E.machine_id(device)}|{state_digest(backbone)[:16]}|{type(backbone).__qualname__}|" \
                 f"b{batch_size}|{tuple(x.shape[1:])}|{'reduced' if allow_reduced else 'fp32'}"
    s = E.select(engine, backbone, x, device, allow_reduced=allow_reduced, total=total,
                 cache_root=None if cache_dir is False else cache_root(cache_dir), choice_key=choice_key, say=say,
                 may_probe=D.context().is_main)
    _SELECTIONS.clear()
    _SELECTIONS[key] = (weakref.ref(backbone), s)
    return s, True


def _has_device_decoder() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


class NonFiniteFeaturesError(ZooError):
    """The backbone gave NaN/inf features for some images: nothing of them was cached."""


def _non_finite(backbone: str, engine: str, samples: Samples, keys: Sequence, rows: Sequence[int]):
    files = [samples.describe(k[0] if isinstance(k, tuple) else int(k)) for k in (keys[r] for r in rows)]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return NonFiniteFeaturesError(
        f"backbone {backbone} (engine {engine}) gave NaN/inf features for {len(files)} image(s): {shown}; nothing "
        "of them was cached. Check those files (remove or re-save them) and the backbone's weights "
        "(--weights default), then run again")


def engine_numerics(engine: str, device: torch.device, allow_reduced: bool) -> str:
    """The numerics an extraction will have, known before any image is read (for the cache key):
    `auto` chooses among fp32 engines unless reduced precision is allowed (--amp bf16, or CUDA's
    default autocast) and native bf16 exists, then it uses bf16."""
    from . import engines as E

    if engine == "auto":
        return "bf16" if allow_reduced and E.bf16_supported(device) else "fp32"
    return E.numerics_of(engine)


def extract_into(backbone: nn.Module, samples: Samples, keys: Sequence, transform, norm: Normalization,
                 device: torch.device, out, positions: Sequence[int], *, batch_size: int = 64,
                 num_workers: int = 0, engine: str = "auto", allow_reduced: bool = False, total: int | None = None,
                 cache_dir=None, on_batch=None, progress: bool = False, desc: str = "features",
                 draft_target: int | None = None, device_decode: bool = False, say=None,
                 pool: DecodePool | None = None, name: str | None = None):
    """Extract keys[j] into out[positions[j]] (out: a (rows, D) tensor, or a callable(D) -> tensor
    allocating it once D is known); on_batch(js, feats) sees every batch (for streaming shards).
    pool: the run's DecodePool (its workers, persistent); None: one for this call (num_workers).
    name: the backbone's name, for errors. A batch with NaN/inf features raises NonFiniteFeaturesError
    naming the files (earlier batches' rows stay valid; the bad batch reaches neither out nor on_batch)
    Returns (out, engine Selection or None)."""
    keys = list(keys)
    if not keys:
        return out, None
    if pool is None:
        with DecodePool([(samples, transform)], device, num_workers) as pool:
            return extract_into(backbone, samples, keys, transform, norm, device, out, positions,
                                batch_size=batch_size, engine=engine, allow_reduced=allow_reduced, total=total,
                                cache_dir=cache_dir, on_batch=on_batch, progress=progress, desc=desc,
                                draft_target=draft_target, device_decode=device_decode, say=say, pool=pool,
                                name=name)
    bound_heap_growth()
    backbone.eval()
    kind = "bytes" if device_decode else ("draft", int(draft_target)) if draft_target else "plain"
    batches, loader = pool.batches(samples, transform, keys, batch_size, kind)
    if device_decode:
        decoder = DeviceJpegDecoder(samples, transform, norm, device)
        loader = map(decoder, loader)
    sel = None
    with _progress(len(keys), desc, progress) as bar:
        for js, (images, _, _) in zip(batches, loader):
            x = normalize_batch(images, norm, device, channels_last=False)
            fresh = False
            if sel is None:
                try:
                    sel, fresh = _engine_for(backbone, x, device, engine, allow_reduced, total or len(keys),
                                             cache_dir, batch_size, say)
                except NonFiniteFeatures as exc:  # in the eager reference rows of the first batch
                    raise _non_finite(name or type(backbone).__name__, exc.engine, samples,
                                      [keys[j] for j in js], exc.rows) from None
            if fresh:
                f = sel.features  # the check batch, already computed by the chosen engine
            else:
                with torch.inference_mode():
                    f = sel.engine.run(x).float().cpu()
            if not bool(torch.isfinite(f).all()):  # never into the cache, never into a head
                raise _non_finite(name or type(backbone).__name__, sel.engine.name, samples,
                                  [keys[j] for j in js], torch.nonzero(~torch.isfinite(f).all(1)).flatten().tolist())
            if callable(out):
                out = out(f.shape[1])
            out[torch.as_tensor([positions[j] for j in js])] = f
            if on_batch is not None:
                on_batch(js, f)
            bar.update(len(images))
    return out, sel


def extract(backbone: nn.Module, samples: Samples, keys: Sequence, transform, norm: Normalization,
            device: torch.device, batch_size: int = 64, num_workers: int = 0, engine: str = "eager",
            progress: bool = False, desc: str = "features", **kw) -> torch.Tensor:
    """Features (len(keys), D) float32 on CPU, in RAM. keys: dataset keys (index, or (index, seed))."""
    keys = list(keys)
    if not keys:
        return torch.empty(0)
    out, _ = extract_into(backbone, samples, keys, transform, norm, device, lambda d: torch.empty((len(keys), d)),
                          range(len(keys)), batch_size=batch_size, num_workers=num_workers, engine=engine,
                          progress=progress, desc=desc, **kw)
    return out


def _memmapped(shape: tuple[int, ...], where: Path | None) -> torch.Tensor:
    """A zero-filled float32 tensor backed by an unlinked temporary file (the page cache holds it,
    not the heap): training on it reads features memory-mapped."""
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    f = tempfile.TemporaryFile(dir=where, prefix="zoo-features-")
    nbytes = int(np.prod(shape)) * 4
    if nbytes == 0:
        return torch.empty(shape)
    f.truncate(nbytes)
    m = np.memmap(f, dtype=np.float32, mode="r+", shape=shape)
    f.close()  # the mapping keeps the (unlinked) file alive
    return torch.from_numpy(m)


@contextlib.contextmanager
def _rng_untouched():
    """Extraction must not move the global RNG (a DataLoader draws its base seed from it): the head
    trains the same whether features were extracted (cold) or read from the cache (warm)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def cached_features(backbone: nn.Module, samples: Samples, transform, norm: Normalization, *,
                    key_fields: dict, device: torch.device, views: Sequence[int | None] = (None,),
                    view_seed: int = 0, cache: bool = True, cache_dir=None, batch_size: int = 64,
                    num_workers: int | None = None, engine: str = "auto", allow_reduced: bool = False,
                    amp_dtype=None, channels_last: bool = True, jpeg_draft: bool = False, gpu_decode: bool = False,
                    progress: bool = False, desc: str = "features",
                    pool: DecodePool | None = None) -> tuple[torch.Tensor, CacheStats]:
    """(len(views), N, D) features, from the cache where possible; extraction sharded over ranks.

    views: None = the deterministic (eval) transform; an int v = augmented view v, seeded by
    (view_seed, v, image content) so it is the same whoever computes it. gpu_decode: JPEGs of the eval
    view decoded in batches by torchvision on a CUDA device (DeviceJpegDecoder); elsewhere the CPU
    path is used and said so ("any": torchvision's decoder on whatever device, for tests). engine: zoo.engines name
    or "auto" (amp_dtype not None also allows reduced precision). The cache key gets the engine's
    numerics and the decoding; key_fields' own "precision" is replaced by them. pool: the run's
    DecodePool, whose workers also serve its other passes; None: one for this call (num_workers,
    default_workers when None), closed at the end.
    """
    with _rng_untouched(), contextlib.ExitStack() as stack:
        if pool is None:
            workers = default_workers(samples, device) if num_workers is None else num_workers
            pool = stack.enter_context(DecodePool([(samples, transform)], device, workers))
        return _cached_features(backbone, samples, transform, norm, key_fields, device, list(views), view_seed,
                                cache, cache_dir, batch_size, pool, engine,
                                allow_reduced or amp_dtype is not None, jpeg_draft, gpu_decode, progress, desc)


def _cached_features(backbone, samples, transform, norm, key_fields, device, views, view_seed, cache, cache_dir,
                     batch_size, pool, engine, allow_reduced, jpeg_draft, gpu_decode, progress, desc):
    t0 = time.perf_counter()
    ctx = D.context()
    n = len(samples)
    numerics = engine_numerics(engine, device, allow_reduced)
    # auto with reduced precision allowed is the bf16 engine; otherwise auto picks among fp32 engines
    asked = "bf16" if engine == "auto" and numerics == "bf16" else engine
    draft_target = int(norm.resize_size) if jpeg_draft else None
    device_decode = bool(gpu_decode) and (device.type == "cuda" or gpu_decode == "any") and _has_device_decoder()
    if gpu_decode and not device_decode and progress and ctx.is_main:
        print(f"gpu decode: not available on {device} (torchvision.io.decode_jpeg on CUDA); decoding on the CPU",
              file=sys.stderr)
    key = {k: v for k, v in key_fields.items() if k != "precision"} | {"numerics": numerics}
    if device_decode:
        key["decode"], draft_target = DeviceJpegDecoder.KEY, None
    elif draft_target:
        key["decode"] = "jpeg-draft-2x"
    fc = FeatureCache(cache_root(cache_dir), key) if cache else None
    mine = D.shard_indices(n, ctx)
    single = not ctx.enabled
    stats = CacheStats()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress and ctx.is_main else (lambda msg: None)
    readable = ReadableSet(cache_root(cache_dir)) if cache else None

    # 1. Where each row comes from: the cache (one index read) or extraction.
    plan = []
    for v in views:
        names = [samples.content_hash(int(i)) if v is None else f"{samples.content_hash(int(i))}.v{v}" for i in mine]
        where = fc.locate(names) if fc is not None else [None] * len(names)
        plan.append((v, names, where))
    missing_total = sum(w is None for _, _, where in plan for w in where)

    # 2. The output: (views, rows, D), memory-mapped when this process holds all rows.
    dim = fc.dim() if fc is not None and missing_total < len(views) * len(mine) else None
    shape_rows = n if single else len(mine)
    out: torch.Tensor | None = None

    def allocate(d: int) -> torch.Tensor:
        nonlocal out
        if out is None:
            out = (_memmapped((len(views), shape_rows, d), fc.dir.parent.parent / "tmp" if fc else None)
                   if single else torch.empty((len(views), shape_rows, d)))
        return out

    if dim is not None:
        allocate(dim)

    # 3. Extract the misses, streaming shards to disk as they fill.
    sel = None
    for vi, (v, names, where) in enumerate(plan):
        miss = [j for j, w in enumerate(where) if w is None]
        stats.misses += len(miss)
        stats.hits += len(where) - len(miss)
        if miss:
            buf_names: list[str] = []
            buf: list[torch.Tensor] = []

            def flush():
                if fc is not None and buf_names:
                    fc.write_shard(buf_names, torch.cat(buf))
                if readable is not None and v is None:
                    readable.add(nm for nm in buf_names)
                buf_names.clear()
                buf.clear()

            def on_batch(js, f, miss=miss, names=names):
                buf_names.extend(names[miss[j]] for j in js)
                buf.append(f)
                if len(buf_names) >= SHARD_ROWS:
                    flush()

            def key_of(i: int, v=v):
                return int(i) if v is None else (int(i), sample_seed(view_seed, v, samples.content_hash(int(i))))

            te = time.perf_counter()
            target = (lambda d, vi=vi: allocate(d)[vi]) if out is None else out[vi]
            _, s = extract_into(backbone, samples, [key_of(mine[j]) for j in miss], transform, norm, device,
                                target, miss, batch_size=batch_size, pool=pool, engine=asked,
                                allow_reduced=False, total=missing_total,
                                cache_dir=cache_dir if cache else False,  # False: write nothing (no choice memo)
                                on_batch=on_batch, progress=progress and ctx.is_main,
                                desc=desc if v is None else f"{desc} (view {v})", draft_target=draft_target,
                                device_decode=device_decode and v is None, say=say,
                                name=key_fields.get("backbone"))
            flush()
            stats.extract_seconds += time.perf_counter() - te
            sel = sel or s
        hits = [j for j, w in enumerate(where) if w is not None]
        if hits:
            fc.read_into(out[vi], hits, [where[j] for j in hits])
    if out is None:  # nothing at all (no rows on this rank)
        out = torch.empty((len(views), shape_rows, 0))

    # 4. Every rank gets every row.
    if not single:
        dims = [d for d in D.all_gather_object(out.shape[2]) if d]
        if dims and out.shape[2] != dims[0]:
            out = torch.empty((len(views), len(mine), dims[0]))
        out = torch.stack([D.gather_rows(out[vi], mine, n) for vi in range(len(views))])
        counts = D.all_gather_object((stats.hits, stats.misses))
        stats.hits, stats.misses = sum(h for h, _ in counts), sum(m for _, m in counts)
    if sel is not None:
        stats.engine = {"name": sel.engine.name, "numerics": sel.engine.numerics, "how": sel.how,
                        "check_cosine_min": round(sel.cosine_min, 7), "note": sel.engine.note,
                        "rejected": dict(sel.rejected)}
        stats._selection = sel  # the check batch, for the head-predictions check
    else:
        stats.engine = {"name": None, "numerics": numerics, "how": "all cached"}
    if fc is not None:
        stats.damaged = list(fc.damaged)
    stats.seconds = time.perf_counter() - t0
    return out, stats


def head_predictions_agree(head: nn.Module, stats: CacheStats) -> tuple[int, int] | None:
    """(agreeing, total) predictions of `head` on the engine's check-batch features vs eager fp32
    ones; None when nothing was extracted in this process."""
    sel = getattr(stats, "_selection", None)
    if sel is None:
        return None
    p = next(head.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = head.training
    head.eval()
    with torch.inference_mode():
        a = head(sel.features[:len(sel.reference)].to(dev)).argmax(1)
        b = head(sel.reference.to(dev)).argmax(1)
    head.train(was)
    return int((a == b).sum()), len(a)
