"""The on-disk feature cache: FeatureCache (shards + index), ReadableSet, cache_root, CacheStats.

See zoo.features (the package docstring) for the key, the layout and the streaming contract.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ZooError
from ..io import save_safetensors, write_json

FEATURE_FORMAT = 2
SHARD_ROWS = 4096
INDEX = "index.jsonl"
MATRIX = "features"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ZOO_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "backbone-zoo"



@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0
    extract_seconds: float = 0.0
    engine: dict = field(default_factory=dict)
    damaged: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # (file, reason): failed the extraction's decode, or changed
    reread: int = 0  # files the extraction read again: bytes not held (over the HeldBytes budget, or hashed
    #                  before holding began: a caller that verified up front)

    def add(self, other: "CacheStats") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.seconds += other.seconds
        self.extract_seconds += other.extract_seconds
        self.engine = self.engine or other.engine
        self.damaged += other.damaged
        self.unreadable += other.unreadable
        self.reread += other.reread


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
        try:
            lines = path.read_bytes().split(b"\n") if path.is_file() else []
        except OSError as exc:
            raise ZooError(f"feature cache index {path} cannot be read ({type(exc).__name__}: {exc}); fix its "
                           f"permissions, delete {self.dir}, or run with --no-cache") from None
        damaged = 0
        last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                if rec.get("dropped"):
                    shards.pop(rec["shard"], None)
                else:
                    shards[rec["shard"]] = {"sha256": str(rec["sha256"]), "names": [str(x) for x in rec["names"]]}
            except (ValueError, KeyError, TypeError, AttributeError):
                # A torn last line (killed mid-append) is normal: its rows are misses. Any other bad
                # line (bytes that are not UTF-8, not JSON: the file was damaged) is dropped below.
                damaged += not (n == last == len(lines) - 1)  # torn: the last line, no newline after it
        if damaged:
            self._rebuild_index(path, shards, damaged)
        self._shards = shards
        self._rows = {nm: (s, r) for s, rec in shards.items() for r, nm in enumerate(rec["names"])}

    def _rebuild_index(self, path: Path, shards: dict[str, dict], damaged: int) -> None:
        """Rewrite a damaged index from its intact entries (whose shards are still checked by
        sha256 when read); the damaged lines' rows are misses, extracted again. A cache that cannot
        be rewritten is refused, naming the file and the way out, rather than re-read every run."""
        from ..io import atomic_path

        body = "".join(json.dumps({"shard": s, "sha256": rec["sha256"], "names": rec["names"]},
                                  separators=(",", ":")) + "\n" for s, rec in shards.items())
        try:
            with atomic_path(path) as tmp:
                Path(tmp).write_text(body, encoding="utf-8")
        except OSError as exc:
            raise ZooError(f"feature cache index {path} is damaged ({damaged} unreadable line(s)) and cannot be "
                           f"rebuilt ({type(exc).__name__}: {exc}); delete {self.dir}, or run with --no-cache"
                           ) from None
        self.damaged.append(f"{path}: {damaged} damaged line(s) dropped; index rebuilt from {len(shards)} "
                            "intact shard entries")
        warnings.warn(f"feature cache index {path} had {damaged} damaged line(s) (not UTF-8 JSON); rebuilt from "
                      f"its {len(shards)} intact shard entries: the damaged lines' features will be extracted again "
                      "(--no-cache skips the cache)", stacklevel=4)

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
