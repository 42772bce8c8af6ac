"""Where the labelled images come from: an image folder (one subfolder per class), a CSV of
path,label, or the embedded Fashion-MNIST sample; a stratified seeded split; validation images
that repeat a training image are dropped.

Everything that can be wrong with the data is found before any training work starts: a missing
folder, an empty class folder, a single class (`DataError`); corrupt, truncated or non-image files
are decoded once up front (zoo.data.verify) and skipped with a warning that lists them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from ..io import file_sha256
from ..preprocess import IMAGE_SUFFIXES, load_image, printable, special_file_reason, to_rgb
from .verify import DataWarning, _listing, count_decode, count_read, verify_images

# The bytes a run read to hash its files, kept for the extraction to decode (one read per image on
# a cold run) up to this many bytes in all; files beyond it are read again by the extraction.
HELD_BYTES_BUDGET = 256 << 20


class HeldBytes:
    """Files' bytes by content hash, read once for the hash and kept (at most `budget` bytes in all)
    until the extraction decodes them or finds their rows cached. Bytes with one hash are the same
    bytes, so a key is its own check: decoding them decodes exactly what was hashed, and a file
    changed on disk since is not looked at again. Thread-safe (files are hashed by a thread pool);
    pickled empty, so a DataLoader worker started by spawn does not get a copy."""

    def __init__(self, budget: int | None = None):
        self.budget = int(HELD_BYTES_BUDGET if budget is None else budget)
        self.used, self.over_budget = 0, 0  # over_budget: files hashed whose bytes were not kept
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def fits(self, size: int) -> bool:
        if self.used + size <= self.budget:
            return True
        with self._lock:
            self.over_budget += 1
        return False

    def keep(self, h: str, data: bytes) -> None:
        with self._lock:
            if h in self._data:
                return
            if self.used + len(data) > self.budget:
                self.over_budget += 1
                return
            self._data[h] = data
            self.used += len(data)

    def get(self, h: str | None, take: bool = False) -> bytes | None:
        """The bytes whose sha256 is h (None when not held); take: and let them go."""
        if h is None:
            return None
        with self._lock:
            data = self._data.pop(h, None) if take else self._data.get(h)
            if take and data is not None:
                self.used -= len(data)
            return data

    def drop(self, hashes) -> None:
        for h in hashes:
            self.get(h, take=True)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.used = 0

    def __len__(self) -> int:
        return len(self._data)

    def __reduce__(self):
        return (HeldBytes, (0,))


@dataclass
class Samples:
    """Labelled images: file paths or in-memory uint8 arrays (H, W[, C]). With `held` (hold_bytes),
    the bytes of a file read for its content hash are kept there for the extraction to decode."""

    items: list
    labels: np.ndarray
    classes: tuple[str, ...]
    _hashes: list | None = field(default=None, repr=False)
    held: HeldBytes | None = field(default=None, repr=False)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise ValueError("items and labels differ in length")

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        item = self.items[i]
        return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<array #{i}>"

    def load(self, i: int, max_pixels: int | None = None) -> Image.Image:
        item = self.items[i]
        if isinstance(item, (str, os.PathLike)):
            count_read()
            count_decode()
            return load_image(item, max_pixels)
        return to_rgb(Image.fromarray(np.asarray(item)))

    def content_hash(self, i: int) -> str:
        """sha256 of the file's bytes (or the array's), the image part of the feature-cache key."""
        if self._hashes is None:
            self._hashes = [None] * len(self.items)
        h = self._hashes[i]
        if h is None:
            item = self.items[i]
            if isinstance(item, (str, os.PathLike)):
                h = _hash_file(item, self.held)
            else:
                arr = np.ascontiguousarray(item)
                d = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
                d.update(arr.tobytes())
                h = d.hexdigest()
            self._hashes[i] = h
        return h

    def hold_bytes(self, budget: int | None = None) -> HeldBytes:
        """Keep the bytes of files hashed from now on (see HeldBytes); the store, made if needed."""
        if self.held is None:
            self.held = HeldBytes(budget)
        return self.held

    def subset(self, indices: Sequence[int]) -> "Samples":
        indices = list(indices)
        hashes = [self._hashes[i] for i in indices] if self._hashes is not None else None
        return Samples([self.items[i] for i in indices], self.labels[indices], self.classes, hashes, self.held)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


def _hash_file(path: str | os.PathLike, held: HeldBytes | None) -> str:
    """sha256 of the file's bytes, read once: whole, and kept in `held`, when they fit its budget;
    streamed in chunks otherwise (then the extraction reads the file again, checked against it)."""
    count_read()
    if held is not None and held.fits(os.stat(path).st_size):
        with open(path, "rb") as f:
            data = f.read()
        h = hashlib.sha256(data).hexdigest()
        held.keep(h, data)
        return h
    return file_sha256(path)


@dataclass
class DataSplit:
    train: Samples
    val: Samples | None
    classes: tuple[str, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    source: str = ""


def _visible(name: str) -> bool:
    return not name.startswith((".", "_", "~")) and name not in ("Thumbs.db", "desktop.ini")


def scan_folder(root: str | os.PathLike, flag: str = "--data",
                min_classes: int = 2) -> tuple[Samples, list[tuple[str, str]]]:
    """One subfolder per class (nested folders inside a class are included). Files without an
    image suffix, and special files (FIFOs, sockets, devices), are returned as skipped; their
    bytes are not read. `flag` names the option in errors; evaluation accepts one class."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{flag} folder {str(root)!r} does not exist; pass {flag} DIR with one subfolder per class")
    if not root.is_dir():
        raise DataError(f"{flag} {str(root)!r} is a file; pass a folder with one subfolder per class "
                        "(or a CSV of path,label with --csv)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d.name))
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and _visible(p.name)]
        hint = f" (found {len(loose)} loose files)" if loose else ""
        raise DataError(f"{str(root)!r} has no class subfolders{hint}: put each class's images in "
                        f"{root}/<class name>/, or list them in a CSV with --csv")
    items, labels, skipped, empty = [], [], [], []
    for label, d in enumerate(class_dirs):
        n = 0
        for dirpath, dirnames, files in os.walk(d):
            dirnames[:] = sorted(x for x in dirnames if _visible(x))
            for f in sorted(files):
                if not _visible(f):
                    continue
                path = os.path.join(dirpath, f)
                special = special_file_reason(path)
                if special is not None:
                    skipped.append((path, special))
                elif f.lower().endswith(IMAGE_SUFFIXES):
                    items.append(path)
                    labels.append(label)
                    n += 1
                else:
                    skipped.append((path, "not an image file (suffix)"))
        if n == 0:
            empty.append(d.name)
    if empty:
        raise DataError(f"class folder(s) {', '.join(repr(e) for e in empty)} in {str(root)!r} hold no images; "
                        "add images or remove the folder")
    classes = tuple(d.name for d in class_dirs)
    _check_classes(classes, str(root), min_classes)
    return Samples(items, np.array(labels), classes), skipped


def _check_classes(classes: Sequence[str], where: str, min_classes: int = 2) -> None:
    if len(classes) < min_classes:
        raise DataError(f"{where}: found a single class {tuple(classes)!r}; a classifier needs at least two "
                        "(one subfolder per class)")


CSV_PATH_HEADERS = ("path", "file", "filename", "image")
CSV_LABEL_HEADERS = ("label", "class", "target")


def read_csv(csv_file: str | os.PathLike, root: str | os.PathLike | None = None,
             classes: Sequence[str] | None = None, allow_outside_root: bool = False,
             min_classes: int = 2) -> tuple[Samples, list[tuple[str, str]]]:
    """Rows of path,label (a header row `path,label` is optional). Relative paths are resolved
    against `root`, else the CSV's folder; a path that leaves that folder (absolute, or through
    ..) needs allow_outside_root=True (--csv-outside-root). A repeated row counts once; the same
    file with two labels is an error. Missing and special files are returned as skipped."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise DataError(f"CSV file {str(csv_file)!r} does not exist")
    base = Path(root) if root is not None else csv_file.parent
    base_real = os.path.realpath(base)
    rows: dict[str, str] = {}  # real path -> label, in first-seen order
    where: dict[str, int] = {}
    conflicts, outside = [], []
    raw = csv_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{csv_file}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save the CSV as UTF-8") from None
    first = True
    for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise DataError(f"{csv_file}:{n}: expected 'path,label', got {row!r}")
        path, label = row[0].strip(), row[1].strip()
        if first:
            first = False
            if path.lower() in CSV_PATH_HEADERS and label.lower() in CSV_LABEL_HEADERS:
                continue
            resolved = path if os.path.isabs(path) else base / path
            if (path.lower() in CSV_PATH_HEADERS or label.lower() in CSV_LABEL_HEADERS
                    or (not path.lower().endswith(IMAGE_SUFFIXES) and not os.path.lexists(resolved))):
                raise DataError(f"{csv_file}:{n}: unrecognized header {','.join(row)!r}: a header must be "
                                f"{'|'.join(CSV_PATH_HEADERS)} then {'|'.join(CSV_LABEL_HEADERS)} (or no header, "
                                "rows of path,label only)")
        if not label:
            raise DataError(f"{csv_file}:{n}: empty label for {path!r}")
        full = os.path.realpath(path if os.path.isabs(path) else base / path)
        if os.path.commonpath([full, base_real]) != base_real:
            outside.append(printable(path))
        if full in rows and rows[full] != label:
            conflicts.append(f"{printable(path)} ({rows[full]!r} on line {where[full]}, {label!r} on line {n})")
        elif full not in rows:
            rows[full], where[full] = label, n
    if conflicts:
        raise DataError(f"{csv_file}: {len(conflicts)} file(s) listed with two labels: {'; '.join(conflicts[:5])}"
                        f"{' ...' if len(conflicts) > 5 else ''}; give each file one label")
    if outside and not allow_outside_root:
        raise DataError(f"{csv_file}: {len(outside)} path(s) point outside {str(base)!r} (first: {outside[0]}); "
                        "pass --csv-outside-root if that is intended, or --data ROOT to resolve them against")
    if not rows:
        raise DataError(f"CSV file {str(csv_file)!r} lists no images")
    names = tuple(classes) if classes is not None else tuple(sorted(set(rows.values())))
    _check_classes(names, str(csv_file), min_classes)
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted({lab for lab in rows.values() if lab not in index})
    if unknown:
        raise DataError(f"{csv_file}: labels {unknown} are not among the model's classes {list(names)}")
    items, labels, skipped = [], [], []
    for path, label in rows.items():
        if not os.path.lexists(path):
            skipped.append((path, "file not found"))
            continue
        special = special_file_reason(path)
        if special is not None:
            skipped.append((path, special))
        else:
            items.append(path)
            labels.append(index[label])
    return Samples(items, np.array(labels, dtype=np.int64), names), skipped


def align_labels(samples: Samples, labels: Sequence[str], where: str, hint: str = "") -> Samples:
    """`samples` relabelled to index `labels` (holding only some of them is fine); class names
    that are not among `labels` are an error that lists them."""
    labels = list(labels)
    unknown = [c for c in samples.classes if c not in labels]
    if unknown:
        raise DataError(f"{where} has classes {unknown} that {hint or 'the model does not know'}; "
                        f"the known classes are {labels}")
    remap = np.array([labels.index(c) for c in samples.classes], dtype=np.int64)
    return Samples(samples.items, remap[samples.labels] if len(samples) else samples.labels, tuple(labels),
                   held=samples.held)


def embedded_samples() -> tuple[Samples, Samples]:
    from ..embedded import load_embedded_dataset

    ds = load_embedded_dataset()
    return (Samples(list(ds.train_images), ds.train_labels, ds.classes),
            Samples(list(ds.val_images), ds.val_labels, ds.classes))

def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class: shuffle with `seed`, send round(n * fraction) (at least 1 when the class has two
    or more images) to validation. Returns sorted (train_idx, val_idx)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-split must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * val_fraction)))) if len(idx) > 1 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def load_data(data: str | os.PathLike | None = None, csv_file: str | os.PathLike | None = None,
              val_data: str | os.PathLike | None = None, val_split: float = 0.2, seed: int = 0,
              strict: bool = False, *, csv_outside_root: bool = False,
              max_pixels: int | None = None, known_readable=None, allow_duplicates: bool = False,
              defer_decode: bool = False, known_bad=None) -> DataSplit:
    """Everything up front: scan, verify (decode each file once), refuse a class left without
    images and the same content under two labels (allow_duplicates: keep them, with a warning),
    split, and drop from validation any image whose content is also in training. Raises DataError
    early. defer_decode: hash only; the caller's extraction decodes (and so verifies) every new
    file, and reloads with known_bad (file -> reason) if some fail (see verify_images)."""
    if data is None and csv_file is None:
        if val_data is not None:
            raise DataError("--val-data needs --data (or --csv) for the training images")
        train, val = embedded_samples()
        return DataSplit(train, val, train.classes, [], "embedded Fashion-MNIST sample (400 train / 200 val)")
    if csv_file is not None:
        samples, skipped = read_csv(csv_file, root=data, allow_outside_root=csv_outside_root)
        source = str(csv_file)
    else:
        samples, skipped = scan_folder(data)
        source = str(data)
    val_samples, val_skipped = None, []
    if val_data is not None:
        val_samples, val_skipped = scan_folder(val_data, flag="--val-data", min_classes=1)
        val_samples = align_labels(val_samples, samples.classes, f"--val-data {str(val_data)!r}",
                                   "the training data lacks")
    if defer_decode:  # the extraction decodes the bytes read here for the hash: one read per image
        held = samples.hold_bytes()
        if val_samples is not None:
            val_samples.held = held
    samples, skipped = verify_images(samples, strict, already_skipped=skipped, max_pixels=max_pixels,
                                   known_readable=known_readable, decode=not defer_decode, known_bad=known_bad)
    _check_no_empty_class(samples, skipped, source)
    _check_duplicates(samples, allow_duplicates)
    if val_samples is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            val_samples, val_skipped = verify_images(val_samples, strict, already_skipped=val_skipped,
                                                     max_pixels=max_pixels, known_readable=known_readable,
                                                     decode=not defer_decode, known_bad=known_bad)
        if val_skipped:
            warnings.warn(f"skipped {len(val_skipped)} unusable validation files:\n" + _listing(val_skipped),
                          DataWarning, stacklevel=2)
        train, val = samples, val_samples
    elif val_split and val_split > 0:
        tr, va = stratified_split(samples.labels, val_split, seed)
        train, val = samples.subset(tr), (samples.subset(va) if len(va) else None)
    else:
        train, val = samples, None
    if val is not None:
        val, leaked = drop_leaked(train, val)
        skipped = skipped + leaked
    return DataSplit(train, val, samples.classes, skipped + val_skipped, source)


def _check_no_empty_class(samples: Samples, skipped: Sequence[tuple[str, str]], source: str) -> None:
    """A class named by the data (a CSV label) whose every file is missing or unusable would stay a
    label with no images: an error naming it."""
    counts = samples.class_counts()
    empty = [samples.classes[c] for c in range(len(samples.classes)) if counts[c] == 0]
    if empty:
        raise DataError(f"{source}: class(es) {empty} have no usable images (their files are missing or unreadable"
                        f"{': ' + printable(skipped[0][0]) + ' ' + skipped[0][1] if skipped else ''}); "
                        "fix the paths or remove those rows")


def _check_duplicates(samples: Samples, allow: bool) -> None:
    """The same content (sha256 of the bytes) under two labels in the training data teaches both
    answers for one image: an error naming both files, or with allow=True a warning."""
    first: dict[str, int] = {}
    clashes = []
    for i in range(len(samples)):
        h = samples.content_hash(i)
        j = first.setdefault(h, i)
        if j != i and samples.labels[j] != samples.labels[i]:
            clashes.append(f"{printable(samples.describe(j))} ({samples.classes[samples.labels[j]]!r}) and "
                           f"{printable(samples.describe(i))} ({samples.classes[samples.labels[i]]!r})")
    if not clashes:
        return
    listed = "; ".join(clashes[:3]) + (f" ... and {len(clashes) - 3} more" if len(clashes) > 3 else "")
    if not allow:
        raise DataError(f"{len(clashes)} training image(s) have identical content under two labels: {listed}; "
                        "remove or relabel one of each pair, or pass --allow-duplicates to keep them")
    warnings.warn(f"--allow-duplicates: keeping {len(clashes)} image(s) with identical content under two labels: "
                  f"{listed}", DataWarning, stacklevel=3)


def drop_leaked(train: Samples, val: Samples) -> tuple[Samples | None, list[tuple[str, str]]]:
    """Validation images whose content (sha256 of the bytes) is also a training image are
    dropped, with a warning that lists them: they would score memory, not generalization."""
    seen = {train.content_hash(i) for i in range(len(train))}
    leaked = [i for i in range(len(val)) if val.content_hash(i) in seen]
    if not leaked:
        return val, []
    listed = [(val.describe(i), "same content as a training image (dropped from validation)") for i in leaked]
    warnings.warn(f"dropped {len(leaked)} of {len(val)} validation images whose content is also in training:\n"
                  + _listing(listed), DataWarning, stacklevel=3)
    dropped = set(leaked)
    keep = [i for i in range(len(val)) if i not in dropped]
    return (val.subset(keep) if keep else None), listed
