"""Fail-closed validation of exported artifacts against eager PyTorch.

The contract every exporter's `validate(model, path, images, **options)` follows:

* `images` is a uint8 array (N, H, W, 3) of RGB images already resized and cropped to the
  model's input size by the reference preprocessing (`zoo.preprocess.resize_crop`). An artifact
  with baked preprocessing is fed these bytes as they are; one without is fed
  `zoo.preprocess.normalize_uint8(images, norm)` (float32 NCHW). Eager PyTorch always gets the
  latter, so the comparison covers the baked scaling and mean/std too.
* `options["reference"]` holds eager PyTorch's outputs on the same images (`eager_outputs`),
  `options["batch_sizes"]` the batch sizes to run the artifact at (default 1, 3 and 8: the
  images are fed in chunks of each size, so a batch axis frozen to one size is caught), and
  `options["tolerance"]` a `Tolerance`.
* It returns `compare(...)`'s report (a JSON-ready dict whose "passed" is the verdict), with
  anything of its own added. `zoo.export` refuses an artifact whose report did not pass.

Metrics, over every batch size: max (and mean) absolute logit difference, the largest logit
difference between the artifact's own outputs at different batch sizes (`max_batch_size_diff`:
an output must not depend on the rest of its batch), max absolute probability
difference, top-1 agreement with eager PyTorch, minimum embedding cosine similarity, and, when
the validation images come with labels (class-named folders), accuracy and its delta.

Pass criteria:
  fp32 (the default): max |logit diff| <= tolerance.logits (1e-4), embedding cosine >=
    tolerance.cosine (0.9999), and every top-1 disagreement is a near-tie (the reference's top-2
    margin <= 2 x tolerance.logits).
  int8 (lossy by design): with labelled validation images (the run's own validation split),
    accuracy may drop by at most tolerance.int8_accuracy_drop (0.01, one point); without labels,
    top-1 agreement >= tolerance.int8_agreement (0.9). Agreement, logit differences and the
    embedding cosine are always reported; a mean embedding cosine under tolerance.int8_cosine
    (0.9) adds a note that the embedding output is approximate. (With labels, agreement does not
    gate: on a 70%-accurate head, int8 flips near-ties both ways at unchanged accuracy.)

`--preprocess full` artifacts take the decoded images as they are, so they are validated on
`full_validation_images`: the validation photos at their own, different sizes plus synthetic
odd sizes (portrait, landscape, and two of one size run as one batch), each run alone (batch 1)
and every same-size group also as one batch (`run_full`). The reference stays eager PyTorch on
the reference preprocessing (Pillow). The in-graph resize differs from Pillow's by at most one
uint8 level on a few pixels (float vs fixed-point arithmetic), so `compare_full` bounds:
  max |probability diff| <= tolerance.full_probabilities (0.01), embedding cosine >=
  tolerance.full_cosine (0.999), and the top-5 set (top-k for k = min(5, classes)) equal to
  the reference's on every real photo (synthetic images: reported, not required, as their
  predictions are near-uniform); logit differences and top-1 agreement are reported.

This module imports numpy and Pillow at the top; torch only inside `eager_outputs`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import DataError, ExportValidationError
from .preprocess import list_images, load_image, normalize_uint8, resize_crop, to_uint8_hwc

DEFAULT_BATCH_SIZES = (1, 3, 8)
NUM_DEFAULT_IMAGES = 8
MAX_IMAGES = 256
# scikit-image's bundled sample photos (RGB or gray; none needs a download)
SKIMAGE_SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "colorwheel", "camera")


@dataclass(frozen=True)
class Tolerance:
    """When an artifact counts as equal to eager PyTorch (see the module docstring)."""

    logits: float = 1e-4
    cosine: float = 0.9999
    int8_agreement: float = 0.9
    int8_cosine: float = 0.9
    int8_accuracy_drop: float = 0.01
    full_probabilities: float = 0.01
    full_cosine: float = 0.999

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# -- validation images ---------------------------------------------------------------------------
@dataclass
class ValidationImages:
    """Geometry-preprocessed uint8 (N, H, W, 3) images, their names, and labels when known;
    `raw`: the same images decoded at their own sizes (uint8 (H, W, 3) each), when asked for."""

    pixels: np.ndarray
    names: list[str]
    source: str
    targets: list[int | None]
    raw: list[np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"count": int(len(self.names)), "source": self.source, "names": self.names[:16],
                "labelled": sum(t is not None for t in self.targets)}


def synthetic_image(index: int, size: int = 256):
    """A deterministic, non-trivial RGB test image: gradients, rings and seeded noise."""
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.2, 0.8, 2)
    rings = 0.5 + 0.5 * np.sin(2 * math.pi * (3 + index) * np.hypot(xx - cx, yy - cy))
    noise = rng.normal(0.0, 0.08, (size, size, 3)).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, 3).astype(np.float32)
    rgb = np.stack([0.5 + 0.5 * np.sin(2 * math.pi * (xx * (c + 1) + yy * (index % 3)) + phase[c]) for c in range(3)], -1)
    img = 0.55 * rgb + 0.35 * rings[..., None] + noise
    w = size * (3 + index % 3) // 4  # a few aspect ratios, so resize + crop is exercised
    arr = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr).resize((w, size))


def sample_photos(limit: int = NUM_DEFAULT_IMAGES) -> list[tuple[str, Any]]:
    """(name, PIL RGB image) for scikit-image's bundled photos; [] when scikit-image is absent."""
    try:
        import skimage.data as skdata
    except ImportError:
        return []
    from PIL import Image

    from .preprocess import to_rgb

    out = []
    for name in SKIMAGE_SAMPLES[:limit]:
        try:
            arr = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download, or is gone
            continue
        out.append((f"skimage:{name}", to_rgb(Image.fromarray(np.asarray(arr, dtype=np.uint8)))))
    return out


def load_validation_images(images: Any, norm, labels: Sequence[str] = (), count: int = NUM_DEFAULT_IMAGES,
                           raw: bool = False) -> ValidationImages:
    """Resolve what the user passed into reference-preprocessed validation images.

    images: None (scikit-image's sample photos, topped up with deterministic synthetic images to
    `count`), a directory or image file, a list of image files, or a uint8 (N, H, W, 3) array
    already at the input size. Images in a folder named like a class label are labelled.
    raw=True also keeps the decoded images at their own sizes (`.raw`), for `--preprocess full`."""
    c, h, w = tuple(norm.input_size)
    if isinstance(images, np.ndarray):
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (h, w, 3):
            raise DataError(f"validation images given as an array must be uint8 (N, {h}, {w}, 3), "
                            f"got {arr.dtype} {arr.shape}")
        return ValidationImages(arr, [f"array[{i}]" for i in range(len(arr))], "array", [None] * len(arr),
                                list(arr) if raw else None)
    if images is None:
        named = sample_photos(count)
        source = "scikit-image sample photos" if named else ""
        n_synth = max(0, count - len(named))
        named += [(f"synthetic:{i}", synthetic_image(i)) for i in range(n_synth)]
        source = " + ".join(s for s in (source, f"{n_synth} synthetic" if n_synth else "") if s)
        pixels = np.stack([to_uint8_hwc(resize_crop(img, norm)) for _, img in named])
        return ValidationImages(pixels, [n for n, _ in named], source, [None] * len(named),
                                [to_uint8_hwc(img) for _, img in named] if raw else None)
    paths: list[str] = []
    for item in ([images] if isinstance(images, (str, os.PathLike)) else list(images)):
        found = list_images(item)
        if not found and not os.path.exists(item):
            raise DataError(f"validation images: {os.fspath(item)!r} does not exist")
        paths.extend(found)
    if not paths:
        raise DataError(f"validation images: no image files found in {images!r}")
    if len(paths) > MAX_IMAGES:
        paths = paths[:: math.ceil(len(paths) / MAX_IMAGES)]
    index = {name: i for i, name in enumerate(labels)}
    if raw:  # decoded once, kept at their own sizes
        if len(paths) > MAX_FULL_IMAGES:  # each runs alone through the artifact
            paths = paths[:: math.ceil(len(paths) / MAX_FULL_IMAGES)]
        decoded = [load_image(p) for p in paths]
    pixels = np.stack([to_uint8_hwc(resize_crop(decoded[i] if raw else load_image(p), norm))
                       for i, p in enumerate(paths)])
    targets = [index.get(Path(p).parent.name) for p in paths]
    return ValidationImages(pixels, [str(p) for p in paths], f"{len(paths)} files", targets,
                            [to_uint8_hwc(img) for img in decoded] if raw else None)


# -- images at their own sizes, for --preprocess full ------------------------------------------------
class SizedImages(list):
    """uint8 (H, W, 3) images of different sizes (a list), with their names: what a `full`
    artifact's validate() receives; "synthetic:" names are not photos."""

    def __init__(self, images: Iterable[np.ndarray], names: Sequence[str]):
        super().__init__(images)
        self.names = list(names)


MAX_FULL_IMAGES = 64
# (height, width) of the synthetic images added for `full`: portrait and landscape at odd sizes,
# one smaller than a typical crop (the resize enlarges it), and a pair of one size (a batch of N > 1)
FULL_SYNTHETIC_SIZES = ((517, 301), (301, 517), (150, 200), (360, 480), (360, 480))


def full_validation_images(vimages: ValidationImages, norm) -> ValidationImages:
    """`vimages` (loaded with raw=True) plus synthetic images at FULL_SYNTHETIC_SIZES, with their
    reference-preprocessed pixels: what a `--preprocess full` artifact is validated on."""
    from PIL import Image

    raw = list(vimages.raw if vimages.raw is not None else vimages.pixels)
    names, targets = list(vimages.names), list(vimages.targets)
    for i, (h, w) in enumerate(FULL_SYNTHETIC_SIZES):
        img = synthetic_image(100 + i, size=max(h, w)).resize((w, h), Image.Resampling.BICUBIC)
        raw.append(to_uint8_hwc(img))
        names.append(f"synthetic:{h}x{w}#{i}")
        targets.append(None)
    pixels = np.stack([to_uint8_hwc(resize_crop(Image.fromarray(r), norm)) for r in raw])
    sizes = sorted({f"{r.shape[0]}x{r.shape[1]}" for r in raw})
    return ValidationImages(pixels, names, f"{vimages.source} at their own sizes + {len(FULL_SYNTHETIC_SIZES)} "
                                           f"synthetic ({len(sizes)} sizes)", targets, SizedImages(raw, names))


# -- running things --------------------------------------------------------------------------------
def run_full(fn, raw: Sequence[np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A `--preprocess full` artifact on images of different sizes: {"alone": each image run by
    itself (batch 1), "batched": every group of >= 2 same-size images run as one batch, with
    "index" saying which rows they are}."""
    alone = [fn(np.ascontiguousarray(img[None], dtype=np.uint8)) for img in raw]
    out = {"alone": {k: np.concatenate([a[k] for a in alone]) for k in alone[0]}} if alone else {}
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(raw):
        groups.setdefault(img.shape, []).append(i)
    parts, index = [], []
    for rows in groups.values():
        if len(rows) > 1:
            parts.append(fn(np.ascontiguousarray(np.stack([raw[i] for i in rows]), dtype=np.uint8)))
            index.extend(rows)
    if parts:
        out["batched"] = {**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, "index": np.asarray(index),
                          "batch_sizes": np.asarray([len(r) for r in groups.values() if len(r) > 1])}
    return out


def compare_full(reference: Mapping[str, np.ndarray], runs: Mapping[str, Mapping[str, np.ndarray]],
                 tolerance: Tolerance | None = None, targets: Sequence[int | None] | None = None,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """A `--preprocess full` artifact's outputs (`run_full`) against eager PyTorch on the reference
    preprocessing of the same images; the verdict follows the `full` criteria in the module
    docstring. `names` (SizedImages.names): "synthetic:" ones are not photos (default: all are).
    Returns a JSON-ready report like `compare`'s."""
    tol = tolerance or Tolerance()
    ref_logits, ref_probs = reference["logits"], reference["probabilities"]
    names = list(names) if names is not None else [f"image[{i}]" for i in range(len(ref_logits))]
    k = min(5, ref_logits.shape[1])
    photo = np.array([not n.startswith("synthetic:") for n in names])
    problems: list[str] = []
    per_run: dict[str, Any] = {}
    for run_name, out in runs.items():
        rows = np.asarray(out["index"]) if "index" in out else np.arange(len(ref_logits))
        logits = np.asarray(out["logits"], np.float64)
        if logits.shape != (len(rows), ref_logits.shape[1]):
            problems.append(f"{run_name}: logits shape {logits.shape} != eager {(len(rows), ref_logits.shape[1])}")
            continue
        probs = np.asarray(out.get("probabilities", _softmax(logits)), np.float64)
        pdiff = np.abs(probs - ref_probs[rows]).max(1)
        ldiff = np.abs(logits - ref_logits[rows]).max(1)
        top1 = logits.argmax(1) == ref_logits[rows].argmax(1)
        topk = np.array([set(np.argsort(-a)[:k]) == set(np.argsort(-b)[:k]) for a, b in zip(logits, ref_logits[rows])])
        cos = (_cosine(np.asarray(out["embedding"]), reference["embedding"][rows])
               if "embedding" in out and "embedding" in reference else None)
        per_run[run_name] = {
            "images": int(len(rows)), "max_abs_logit_diff": float(ldiff.max(initial=0.0)),
            "max_abs_prob_diff": float(pdiff.max(initial=0.0)), "top1_agreement": float(top1.mean()) if len(rows) else 1.0,
            f"top{k}_agreement": float(topk.mean()) if len(rows) else 1.0,
            f"top{k}_agreement_photos": float(topk[photo[rows]].mean()) if photo[rows].any() else None,
            "min_embedding_cosine": None if cos is None else float(cos.min(initial=1.0)),
        }
        if not np.all(np.isfinite(logits)):
            problems.append(f"{run_name}: non-finite logits")
        if not pdiff.max(initial=0.0) <= tol.full_probabilities:
            worst = int(np.argmax(pdiff))
            problems.append(f"{run_name}: max |probability diff| {pdiff.max():.3g} > {tol.full_probabilities:g} "
                            f"(on {names[rows[worst]]})")
        if cos is not None and not cos.min(initial=1.0) >= tol.full_cosine:
            problems.append(f"{run_name}: embedding cosine {cos.min():.5f} < {tol.full_cosine}")
        missed = [names[r] for r, ok, p in zip(rows, topk, photo[rows]) if p and not ok]
        if missed:
            problems.append(f"{run_name}: top-{k} classes differ from the reference preprocessing's on "
                            f"{', '.join(missed[:4])}")
    if "alone" not in runs:
        problems.append("the artifact was not run on any image")
    alone = per_run.get("alone", {})
    report: dict[str, Any] = {
        "passed": not problems,
        "kind": "full",
        **{key: alone.get(key) for key in ("max_abs_logit_diff", "max_abs_prob_diff", "top1_agreement",
                                            f"top{k}_agreement", f"top{k}_agreement_photos", "min_embedding_cosine")},
        "batch_sizes": sorted({1, *(int(b) for b in runs.get("batched", {}).get("batch_sizes", []))}),
        "per_run": per_run,
        "images": int(len(names)),
        "tolerance": tol.to_dict(),
        "problems": problems,
    }
    if targets is not None and any(t is not None for t in targets) and "alone" in runs:
        idx = np.array([i for i, t in enumerate(targets) if t is not None])
        y = np.array([targets[i] for i in idx])
        acc_ref = float((ref_logits.argmax(1)[idx] == y).mean())
        acc_art = float((np.asarray(runs["alone"]["logits"]).argmax(1)[idx] == y).mean())
        report["accuracy"] = {"eager": acc_ref, "artifact": acc_art, "delta": acc_art - acc_ref, "images": int(len(idx))}
    return report


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def model_inputs(pixels: np.ndarray, norm, preprocess: str) -> np.ndarray:
    """What an artifact is fed: the uint8 NHWC bytes (baked preprocessing) or normalized NCHW."""
    if preprocess == "normalize":
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    if preprocess == "none":
        return normalize_uint8(pixels, norm)
    raise DataError(f"preprocess must be 'normalize' or 'none', got {preprocess!r}")


def eager_outputs(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Eager PyTorch on the reference preprocessing: logits, probabilities, embedding (float32)."""
    import torch

    x = torch.from_numpy(normalize_uint8(pixels, model.meta.normalization))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            emb = model.forward_features(x)
            logits = model.forward_head(emb)
            probs = torch.softmax(logits, dim=-1)
    finally:
        model.train(was_training)
    return {"logits": logits.float().numpy(), "probabilities": probs.float().numpy(), "embedding": emb.float().numpy()}


def run_in_batches(fn, inputs: np.ndarray, batch_sizes: Iterable[int]) -> dict[int, dict[str, np.ndarray]]:
    """Feed `inputs` to `fn(batch) -> {name: array}` in chunks of each batch size; concatenate."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for bs in batch_sizes:
        parts = [fn(inputs[i:i + bs]) for i in range(0, len(inputs), bs)]
        out[int(bs)] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return out


# -- comparing -------------------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    return np.where(both_zero, np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0), num / np.where(both_zero, 1, den))


def _f(x) -> float | None:
    return None if x is None else float(x)


def compare(reference: Mapping[str, np.ndarray], runs: Mapping[int, Mapping[str, np.ndarray]],
            tolerance: Tolerance | None = None, kind: str = "fp32",
            targets: Sequence[int | None] | None = None) -> dict[str, Any]:
    """Compare an artifact's outputs (one dict per batch size) with eager PyTorch's; the verdict
    follows the pass criteria in the module docstring. Returns a JSON-ready report."""
    tol = tolerance or Tolerance()
    ref_logits = reference["logits"]
    ref_top1 = ref_logits.argmax(1)
    top2 = np.sort(ref_logits, axis=1)[:, -2:] if ref_logits.shape[1] > 1 else np.zeros((len(ref_logits), 2))
    margin = top2[:, 1] - top2[:, 0]
    per_batch: dict[str, Any] = {}
    worst = {"max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0, "max_abs_prob_diff": 0.0, "top1_agreement": 1.0,
             "min_embedding_cosine": None, "mean_embedding_cosine": None, "unexplained_top1_flips": 0}
    problems: list[str] = []
    for bs, out in sorted(runs.items()):
        logits = np.asarray(out["logits"], dtype=np.float32)
        if logits.shape != ref_logits.shape:
            problems.append(f"batch {bs}: logits shape {logits.shape} != eager {ref_logits.shape}")
            continue
        if not np.all(np.isfinite(logits)):
            problems.append(f"batch {bs}: non-finite logits")
        absdiff = np.abs(logits.astype(np.float64) - ref_logits)
        diff = float(absdiff.max()) if logits.size else 0.0
        worst["mean_abs_logit_diff"] = max(worst["mean_abs_logit_diff"], float(absdiff.mean()) if logits.size else 0.0)
        pdiff = (float(np.abs(np.asarray(out["probabilities"], np.float64) - reference["probabilities"]).max())
                 if "probabilities" in out else None)
        top1 = logits.argmax(1)
        agree = float((top1 == ref_top1).mean()) if len(top1) else 1.0
        flips = int(((top1 != ref_top1) & (margin > 2 * tol.logits)).sum())
        cos = None
        if "embedding" in out and "embedding" in reference:
            emb = np.asarray(out["embedding"])
            if emb.shape != reference["embedding"].shape:
                problems.append(f"batch {bs}: embedding shape {emb.shape} != eager {reference['embedding'].shape}")
            else:
                cosines = _cosine(emb, reference["embedding"])
                cos = float(cosines.min())
                mean_cos = float(cosines.mean())
                worst["mean_embedding_cosine"] = (mean_cos if worst["mean_embedding_cosine"] is None
                                                  else min(worst["mean_embedding_cosine"], mean_cos))
        per_batch[str(bs)] = {"max_abs_logit_diff": diff, "max_abs_prob_diff": pdiff, "top1_agreement": agree,
                              "min_embedding_cosine": cos, "unexplained_top1_flips": flips}
        worst["max_abs_logit_diff"] = max(worst["max_abs_logit_diff"], diff)
        if pdiff is not None:
            worst["max_abs_prob_diff"] = max(worst["max_abs_prob_diff"], pdiff)
        worst["top1_agreement"] = min(worst["top1_agreement"], agree)
        worst["unexplained_top1_flips"] += flips
        if cos is not None:
            worst["min_embedding_cosine"] = cos if worst["min_embedding_cosine"] is None else min(worst["min_embedding_cosine"], cos)
        if math.isnan(diff):
            worst["max_abs_logit_diff"] = float("nan")
    if not runs:
        problems.append("the artifact was not run at any batch size")
    cos = worst["min_embedding_cosine"]
    notes: list[str] = []
    labelled = targets is not None and any(t is not None for t in targets)
    if kind == "int8":
        if not labelled and worst["top1_agreement"] < tol.int8_agreement:
            problems.append(f"top-1 agreement {worst['top1_agreement']:.3f} < {tol.int8_agreement} (int8 tolerance; "
                            "unlabelled validation images)")
        mean_cos = worst["mean_embedding_cosine"]
        if mean_cos is not None and mean_cos < tol.int8_cosine:
            notes.append(f"the embedding output is approximate in int8 (mean cosine {mean_cos:.3f} to fp32)")
    else:
        d = worst["max_abs_logit_diff"]
        if not d <= tol.logits:  # NaN fails too
            problems.append(f"max |logit diff| {d:.3g} > tolerance {tol.logits:g}")
        if cos is not None and not cos >= tol.cosine:
            problems.append(f"embedding cosine {cos:.6f} < {tol.cosine}")
        if worst["unexplained_top1_flips"]:
            problems.append(f"{worst['unexplained_top1_flips']} top-1 disagreements that are not near-ties")
    report: dict[str, Any] = {
        "passed": not problems,
        "kind": kind,
        **{k: _f(v) if k != "unexplained_top1_flips" else v for k, v in worst.items()},
        "batch_sizes": sorted(int(b) for b in runs),
        "max_batch_size_diff": _batch_size_diff(runs),
        "per_batch_size": per_batch,
        "tolerance": tol.to_dict(),
        "problems": problems,
        "notes": notes,
    }
    if labelled:
        idx = np.array([i for i, t in enumerate(targets) if t is not None])
        y = np.array([targets[i] for i in idx])
        first = runs[min(runs)]["logits"]
        acc_ref = float((ref_top1[idx] == y).mean())
        acc_art = float((np.asarray(first).argmax(1)[idx] == y).mean())
        report["accuracy"] = {"eager": acc_ref, "artifact": acc_art, "delta": acc_art - acc_ref, "images": int(len(idx))}
        if kind == "int8" and acc_art - acc_ref < -tol.int8_accuracy_drop:
            problems.append(f"int8 accuracy {acc_art:.3f} is {acc_ref - acc_art:.3f} below fp32's {acc_ref:.3f} on "
                            f"{len(idx)} labelled validation images (allowed drop {tol.int8_accuracy_drop})")
            report["passed"] = False
    return report


def _batch_size_diff(runs: Mapping[int, Mapping[str, np.ndarray]]) -> float | None:
    """Largest |logit| difference between the artifact's own outputs at its batch sizes: the same
    image must give the same answer whatever else is in its batch (dynamic int8 does not)."""
    shapes = {np.asarray(out["logits"]).shape for out in runs.values()}
    if len(runs) < 2 or len(shapes) != 1:
        return None
    stacked = np.stack([np.asarray(out["logits"], np.float64) for out in runs.values()])
    return float((stacked.max(0) - stacked.min(0)).max()) if stacked.size else 0.0


def validate_torch_module(module, meta: Mapping[str, Any], model, images, *, preprocess: str = "normalize",
                          reference=None, tolerance=None, batch_sizes=(1, 3, 8), targets=None,
                          runtime: str = "") -> dict[str, Any]:
    """The check every torch-loaded artifact gets (TorchScript, .pt2, a plugin's own): run the
    reloaded `module` at each batch size (or, for preprocess="full", on the images at their own
    sizes), compare with eager PyTorch, and check the metadata it carries."""
    import torch

    names = meta.get("outputs") or ["logits", "probabilities", "embedding"]

    def run(batch):
        with torch.inference_mode():
            out = module(torch.from_numpy(batch))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().numpy() for n, o in zip(names, out)}

    if preprocess == "full":  # images at their own sizes, one at a time and in same-size batches
        report = compare_full(reference, run_full(run, images), tolerance, targets, getattr(images, "names", None))
    else:
        reference = reference if reference is not None else eager_outputs(model, images)
        x = model_inputs(images, model.meta.normalization, preprocess)
        report = compare(reference, run_in_batches(run, x, batch_sizes), tolerance, targets=targets)
    problems = metadata_problems(meta, model, preprocess)
    if problems:
        report["problems"] = list(report["problems"]) + problems
        report["passed"] = False
    report["runtime"] = runtime
    return report


def metadata_problems(meta: dict[str, Any], model, preprocess: str) -> list[str]:
    """What in the artifact's self-description disagrees with the model it claims to be."""
    norm = model.meta.normalization
    want = {"labels": list(model.meta.labels), "mean": list(norm.mean), "std": list(norm.std),
            "input_size": list(norm.input_size), "resize_size": norm.resize_size,
            "interpolation": norm.interpolation, "crop_mode": norm.crop_mode, "preprocess": preprocess,
            "backbone": model.meta.backbone, "weights": model.meta.weights}
    if not meta:
        return ["the artifact carries no zoo metadata"]
    return [f"metadata {k}={meta.get(k)!r} but the model has {v!r}" for k, v in want.items() if meta.get(k) != v]


def require_passed(report: Mapping[str, Any], what: str) -> None:
    """Raise ExportValidationError (exit code 3) unless the report passed."""
    if not report.get("passed"):
        err = ExportValidationError(f"{what} failed validation against eager PyTorch: "
                                    + "; ".join(report.get("problems") or ["no verdict"]))
        err.report = dict(report)
        raise err
