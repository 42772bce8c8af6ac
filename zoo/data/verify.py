"""Every file decoded once, up front: unreadable, truncated or oversized images are skipped with a
warning that lists them (strict=True refuses them); the decode and read counts the tests read."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Mapping, Sequence

from ..errors import DataError
from ..preprocess import ImageDecodeError, max_image_pixels, printable

if TYPE_CHECKING:
    from .sources import Samples


class DataWarning(UserWarning):
    """Some files were skipped (listed in the message)."""


_DECODES = [0]
_READS = [0]


def count_decode(n: int = 1) -> None:
    _DECODES[0] += n


def decode_count() -> int:
    """Image files decoded by this process so far (Samples.load and the extraction datasets): the
    warm-path tests and benchmarks count decodes with it, not with timings."""
    return _DECODES[0]


def count_read(n: int = 1) -> None:
    _READS[0] += n


def read_count() -> int:
    """Image files read by this process so far (for a content hash, to decode up front, or by the
    extraction): the one-read-per-image tests count reads with it."""
    return _READS[0]



def _try_decode(samples: Samples, i: int, max_pixels: int | None = None) -> tuple[str | None, int]:
    """(why the image is unusable or None, its pixel count)."""
    try:
        img = samples.load(i, max_pixels)
        return None, img.width * img.height
    except ImageDecodeError as exc:
        return str(exc.__cause__ or exc.reason), 0
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}", 0


def _hash_or_reason(samples: Samples, i: int) -> tuple[str | None, str]:
    """(content hash, "") or (None, why it cannot be read): a file can vanish after the listing."""
    try:
        return samples.content_hash(i), ""
    except FileNotFoundError:
        return None, "file not found (deleted after the run listed it)"
    except OSError as exc:
        return None, f"cannot read ({type(exc).__name__}: {exc.strerror or exc})"


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Sequence, chunk: int = 1024) -> list:
    """pool.map in chunks: Executor.map submits every item at once, a future each (~2 KB per item
    held until the end: 200 MB at 10^5 files); a chunk at a time keeps that bounded."""
    out: list = []
    for i in range(0, len(items), chunk):
        out.extend(pool.map(fn, items[i:i + chunk]))
    return out


def verify_images(samples: Samples, strict: bool = False, workers: int | None = None,
                  already_skipped: Sequence[tuple[str, str]] = (),
                  max_pixels: int | None = None, known_readable=None, decode: bool = True,
                  known_bad: Mapping[str, str] | None = None) -> tuple[Samples, list[tuple[str, str]]]:
    """Decode every file once, up front. Returns (the readable samples, skipped (file, reason)).
    Images over `max_pixels` are skipped before decoding. With strict=True any unreadable or
    skipped file raises DataError instead.
    known_readable: a zoo.features.cache.ReadableSet; files whose content hash it holds decoded before
    (the same bytes cannot fail now) and are only hashed, which is what makes a warm run decode-free;
    one whose recorded pixel count is over `max_pixels` is checked again (and skipped).
    decode=False (a cold run whose extraction decodes every file anyway): files are hashed, not
    decoded; the extraction's own decode verifies them, and a file that fails there is skipped by
    the run with the same words (strict=True always decodes up front, to refuse before any work).
    known_bad: file -> reason, files already known to fail (in this run): skipped as they are."""
    known_bad = dict(known_bad or {})
    bad: dict[int, str] = {i: known_bad[samples.describe(i)] for i in range(len(samples))
                           if samples.describe(i) in known_bad}
    paths = [i for i, it in enumerate(samples.items) if isinstance(it, (str, os.PathLike)) and i not in bad]
    workers = workers or min(8, (os.cpu_count() or 2))
    limit = max_pixels or max_image_pixels()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if (known_readable is not None or (not decode and not strict)) and paths:
            hashes = _bounded_map(pool, lambda i: _hash_or_reason(samples, i), paths)
            bad.update((i, h[1]) for i, h in zip(paths, hashes) if h[0] is None)
            trusted = known_readable.trusted if known_readable is not None else (lambda h, n: False)
            known = known_readable.known() if known_readable is not None else {}
            paths = [i for i, h in zip(paths, hashes) if h[0] is not None and not trusted(h[0], limit)
                     # deferred: only new files wait for the extraction's decode; a file decoded before
                     # but not trusted now (over a lower --max-image-pixels) may be a cache hit, which
                     # the extraction would not decode: it is checked here
                     and (decode or strict or h[0] in known)]
        elif not decode and not strict:
            paths = []  # the extraction decodes (and so verifies) them
        results = _bounded_map(pool, lambda i: _try_decode(samples, i, max_pixels), paths)
    bad.update((i, r) for i, (r, _) in zip(paths, results) if r is not None)
    bad = dict(sorted(bad.items()))
    if known_readable is not None:
        known_readable.add((samples.content_hash(i), px) for i, (r, px) in zip(paths, results) if r is None)
    skipped = list(already_skipped) + [(samples.describe(i), r) for i, r in bad.items()]
    if skipped and strict:
        raise DataError(f"--strict: {len(skipped)} unusable files:\n" + _listing(skipped)
                        + "\nremove or fix them, or drop --strict to skip them with a warning")
    good = samples.subset([i for i in range(len(samples)) if i not in bad]) if bad else samples
    before, counts = samples.class_counts(), good.class_counts()  # classes absent from the start are fine
    lost = [good.classes[c] for c in range(len(good.classes)) if before[c] > 0 and counts[c] == 0]
    if lost:
        raise DataError(f"class(es) {lost} have no readable images left after skipping unreadable files:\n"
                        + _listing(skipped))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unusable files:\n" + _listing(skipped), DataWarning, stacklevel=2)
    return good, skipped


def _listing(skipped: Sequence[tuple[str, str]], limit: int = 20) -> str:
    lines = [f"  {printable(f)}: {printable(r)}" for f, r in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)
