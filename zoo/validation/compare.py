"""Comparing an artifact's outputs with eager PyTorch: `Tolerance`, `compare` (fixed-size inputs at
several batch sizes), `compare_full` (`--preprocess full`, images at their own sizes), and the
helpers that run artifacts (`run_in_batches`, `run_full`) and the reference (`eager_outputs`).
The pass criteria are stated in `zoo.validation`'s docstring.

numpy at the top; torch only inside `eager_outputs`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataError
from ..preprocess import normalize_uint8

DEFAULT_BATCH_SIZES = (1, 3, 8)


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
