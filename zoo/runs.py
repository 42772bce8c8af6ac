"""Run directories: what one training run leaves behind, and how it resumes.

  config.json        the training configuration (what --resume re-reads)
  checkpoint.pt      written atomically after every epoch: head (+ trained backbone layers),
                     optimizer, schedule, history, best state, RNG state
  model.json, head.safetensors [, backbone.safetensors]
                     the trained model in zoo.model's format (written last: load_model(run_dir),
                     `zoo evaluate RUN` and the exporters read it); model.json's extra["training"]
                     holds the headline metrics
  validation.json    the validation split (files and labels, or "embedded"), which
                     `zoo evaluate RUN` scores when given no --data and `zoo export` validates
                     on; plus a class-balanced sample of the training files ("calibration", at
                     most CALIBRATION_SAMPLE) that static int8 export calibrates on
  metrics.json       per-epoch history, final per-class accuracy and confusion matrix
  metrics.csv        the per-epoch history as a table
  curves.png         loss and top-1 per epoch; confusion.png: the validation confusion matrix

An existing, non-empty run directory is never overwritten: training refuses unless resume=True.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZooError
from .io import atomic_path, write_json, write_text

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
VALIDATION = "validation.json"
CALIBRATION_SAMPLE = 256  # training files recorded for calibrating quantization (bounded: the file stays small)


class RunDirError(ZooError):
    pass


def default_run_dir(backbone: str, root: str | Path = "runs") -> Path:
    stem = backbone.replace("/", "-")
    base = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def prepare(path: str | Path, resume: bool) -> Path:
    """Check the run directory can be used: new (or empty) unless resuming, resumable if resuming."""
    path = Path(path)
    if resume:
        if not (path / CONFIG).is_file():
            raise RunDirError(f"cannot resume {str(path)!r}: it holds no {CONFIG} (not a run directory); "
                              "drop --resume to start a new run there")
        if not (path / CHECKPOINT).is_file():
            raise RunDirError(f"cannot resume {str(path)!r}: no {CHECKPOINT} (the run stopped before its first "
                              "epoch ended); delete the folder and start again")
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"run directory {str(path)!r} already exists and is not empty; pass --resume to continue "
                          "that run, or choose another --out (nothing was overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot resume: {str(file)!r} is unreadable ({type(exc).__name__}: {exc}); start a new "
                          "run with another --out") from None
    if not isinstance(d, dict):
        raise RunDirError(f"cannot resume: {str(file)!r} holds no JSON object; start a new run with another --out")
    return d


def write_config(path: str | Path, config: dict) -> None:
    write_json(Path(path) / CONFIG, config)


def save_checkpoint(path: str | Path, state: dict) -> None:
    import torch

    with atomic_path(Path(path) / CHECKPOINT) as tmp:
        torch.save(state, tmp)


CHECKPOINT_KEYS = ("epoch", "trainable", "optimizer", "scheduler", "rng", "history", "best_epoch", "best_top1",
                   "best_state", "stale")


def load_checkpoint(path: str | Path) -> dict:
    """The last epoch's state, read without executing pickled code. A truncated, foreign or
    tampered file is a RunDirError that says how to restart, never a traceback."""
    import torch

    file = Path(path) / CHECKPOINT
    restart = (f"it cannot be resumed: delete {str(Path(path))!r} (or choose another --out) and train again "
               "without --resume")
    try:
        ck = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncation, garbage and refused pickles all land here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RunDirError(f"{str(file)!r} is damaged or not a zoo checkpoint ({type(exc).__name__}: {reason[:200]}); "
                          f"{restart}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise RunDirError(f"{str(file)!r} is not a zoo checkpoint (missing {', '.join(missing)}); {restart}")
    return ck


def balanced_sample(labels, count: int) -> list[int]:
    """Up to `count` indices, deterministically: round-robin over the classes, each class in its
    order, so a bounded sample keeps every class."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    queues = [list(reversed(v)) for _, v in sorted(by_class.items())]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop())
    return sorted(picked)


def write_validation(path: str | Path, split) -> None:
    """Record the validation split, so `zoo evaluate RUN` can score the model on it later."""
    val = split.val
    if val is None:
        doc: dict[str, Any] = {"kind": "none"}
    elif not all(isinstance(i, (str, os.PathLike)) for i in val.items):
        doc = {"kind": "embedded", "source": split.source}
    else:
        doc = {"kind": "files", "source": split.source, "classes": list(split.classes),
               "items": [[os.path.abspath(p), split.classes[int(y)]] for p, y in zip(val.items, val.labels)]}
    train = split.train
    if train is not None and len(train) and all(isinstance(i, (str, os.PathLike)) for i in train.items):
        picked = balanced_sample(train.labels, CALIBRATION_SAMPLE)
        doc["calibration"] = {"kind": "files", "classes": list(split.classes),
                              "items": [[os.path.abspath(train.items[i]), split.classes[int(train.labels[i])]]
                                        for i in picked]}
    elif train is not None and len(train):
        doc["calibration"] = {"kind": "embedded"}
    write_json(Path(path) / VALIDATION, doc)


def recorded_validation(path: str | Path, labels) -> tuple[Any, str]:
    """(Samples, description) of the validation split a run recorded, for `zoo evaluate RUN`
    with no --data; a clear error when the run has none."""
    from .data import Samples, embedded_samples

    file = Path(path) / VALIDATION
    give_data = "pass --data DIR or --csv FILE to evaluate it"
    if not file.is_file():
        raise RunDirError(f"{str(Path(path))!r} records no validation split (no {VALIDATION}: not a run directory, "
                          f"or written by an older zoo); {give_data}")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        kind = doc["kind"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{str(file)!r} is damaged ({type(exc).__name__}: {exc}); {give_data}") from None
    if kind == "none":
        raise RunDirError(f"{str(Path(path))!r} was trained without a validation split (--val-split 0); {give_data}")
    if kind == "embedded":
        val = embedded_samples()[1]
        if list(val.classes) != list(labels):
            raise RunDirError(f"{str(file)!r} names the embedded sample, but the model's labels differ; {give_data}")
        return val, doc.get("source", "embedded sample")
    if kind != "files":
        raise RunDirError(f"{str(file)!r} has an unknown kind {kind!r}; {give_data}")
    index = {c: i for i, c in enumerate(labels)}
    items = doc.get("items") or []
    unknown = sorted({lab for _, lab in items if lab not in index})
    if unknown:
        raise RunDirError(f"{str(file)!r} has labels {unknown} the model does not know; {give_data}")
    return (Samples([p for p, _ in items], [index[lab] for _, lab in items], tuple(labels)),
            f"the run's validation split ({doc.get('source', '?')})")


def recorded_calibration(path: str | Path, labels) -> tuple[Any, str]:
    """(Samples, description) of the training sample a run recorded for calibrating
    quantization; RunDirError when it records none (trained by an older zoo, or in memory)."""
    from .data import Samples, embedded_samples

    file = Path(path) / VALIDATION
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))["calibration"]
        kind = doc["kind"]
    except FileNotFoundError:
        raise RunDirError(f"{str(Path(path))!r} records no training sample (no {VALIDATION})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{str(file)!r} records no usable training sample ({type(exc).__name__}: {exc})") from None
    if kind == "embedded":
        train = embedded_samples()[0]
        if list(train.classes) != list(labels):
            raise RunDirError(f"{str(file)!r} names the embedded sample, but the model's labels differ")
        return train, "the run's training images (embedded sample)"
    index = {c: i for i, c in enumerate(labels)}
    items = [(p, lab) for p, lab in doc.get("items") or [] if lab in index]
    if kind != "files" or not items:
        raise RunDirError(f"{str(file)!r} records no usable training sample (kind {kind!r})")
    return Samples([p for p, _ in items], [index[lab] for _, lab in items], tuple(labels)), "the run's training images"


class RunSaveError(ZooError):
    """Writing a finished run's files failed (disk full, permissions): names the path."""


def write_run(path: str | Path, run: Run, split, selection: dict) -> None:
    """The finished run's files: metrics.json/.csv (with the selection: CV estimate, interval),
    validation.json, the plots, the weights and model.json, last (its presence means complete).
    An OSError (or safetensors' write error) while writing any of them names the path and
    removes every file this call wrote, keeping config.json and checkpoint.pt: the run is left
    resumable (`--resume` writes them again), never half-written."""
    from safetensors import SafetensorError

    from .model import save_model

    path = Path(path)
    before = set(os.listdir(path))
    current = [path]

    def at(name: str) -> Path:
        current[0] = path / name
        return path

    try:
        write_history(at("metrics.json"), run.history, dict(run.final)
                      | {"best_epoch": run.best_epoch, "labels": list(split.classes),
                         "skipped": [list(s) for s in split.skipped], "selection": selection})
        write_validation(at(VALIDATION), split)
        plot_curves(at("curves.png"), run.history)
        if run.final:
            plot_confusion(at("confusion.png"), run.final["confusion"], split.classes)
        save_model(run.model, at("model files (model.json, *.safetensors)"))
    except (OSError, SafetensorError) as exc:
        for name in set(os.listdir(path)) - before - {CHECKPOINT, CONFIG}:
            with contextlib.suppress(OSError):
                (path / name).unlink()
        where = getattr(exc, "filename", None) or current[0]
        why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200] or type(exc).__name__
        resumable = (path / CHECKPOINT).is_file()
        raise RunSaveError(f"could not write {str(where)!r}: {why}; " + (
            f"nothing half-written was left: {str(path)!r} keeps its checkpoint, so after freeing space (or fixing "
            f"permissions) `zoo train --out {path} --resume` finishes the run" if resumable else
            f"the files of this run were removed from {str(path)!r}; fix the cause and train again")) from None


def write_history(path: str | Path, history: list[dict], final: dict) -> None:
    path = Path(path)
    write_json(path / "metrics.json", {"history": history, "final": final})
    cols = [k for k in history[0] if not isinstance(history[0][k], (list, dict))] if history else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k) for k in cols})
    write_text(path / "metrics.csv", buf.getvalue())


def plot_curves(path: str | Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax1.plot(epochs, [h.get("val_loss") for h in history], "o-", label="val")
    ax1.set_xlabel("epoch"); ax1.set_ylabel("loss"); ax1.legend(); ax1.grid(alpha=0.3)  # noqa: E702
    ax2.plot(epochs, [100 * h["train_top1"] for h in history], "o-", label="train")
    if any(h.get("val_top1") is not None for h in history):
        ax2.plot(epochs, [100 * h["val_top1"] for h in history], "o-", label="val")
    ax2.set_xlabel("epoch"); ax2.set_ylabel("top-1 (%)"); ax2.legend(); ax2.grid(alpha=0.3)  # noqa: E702
    fig.tight_layout()
    with atomic_path(Path(path) / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_confusion(path: str | Path, confusion, labels, title: str = "validation confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion)
    n = len(labels)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title(title)  # noqa: E702
    if n <= 30:
        hi = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > hi / 2 else "black")
    fig.tight_layout()
    with atomic_path(Path(path) / "confusion.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@dataclass
class Run:
    """What zoo.train returns: the trained model, where it was written, and how it did."""

    dir: Path | None
    model: Any  # ZooModel
    history: list[dict]
    best_epoch: int
    best_val_top1: float | None
    final: dict  # val metrics of the kept model: top1, loss, per_class, confusion
    config: dict
    freeze_report: Any = None
    device: str = "cpu"
    cache: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def val_top1(self) -> float | None:
        return self.final.get("top1")

    def summary(self) -> str:
        lines = []
        if self.val_top1 is not None:
            ci = self.final.get("top1_ci95")
            lines.append(f"validation top-1: {100 * self.val_top1:.1f}%"
                         + (f" (95% interval {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%, Wilson)" if ci else "")
                         + f" on {self.final.get('count', 0)} images, epoch {self.best_epoch}/{len(self.history)}")
            recall = self.final.get("per_class") or []
            labels = list(self.model.labels) if self.model is not None else []
            if recall and len(labels) == len(recall):
                lines.append("per-class recall: " + ", ".join(
                    f"{c} {100 * r:.0f}%" if r is not None else f"{c} -" for c, r in zip(labels, recall)))
        else:
            lines.append(f"no validation set; trained {len(self.history)} epochs")
        sel = (self.model.meta.extra.get("training") or {}).get("selection") if self.model is not None else None
        if sel:
            cv = sel.get("cv")
            if sel["on"] == "cross-validation" and cv:
                how = (f"chosen by {cv['folds']}-fold cross-validation on the {cv['images']} training images "
                       f"(CV top-1 {100 * cv['cv_top1']:.1f}% +/- {100 * cv['cv_sd']:.1f}, sd over folds), "
                       "then refit on all of them")
            elif sel["on"] == "holdout" and sel.get("refit"):
                how = (f"chosen on {sel['holdout_images']} held-out training images "
                       f"(top-1 {100 * sel['holdout_top1']:.1f}%), then refit on all {sel['refit']['images']}")
            else:
                how = sel["on"]
            lines.append(f"epoch {self.best_epoch}: {how}; weight decay {sel['weight_decay']:g}"
                         + (" (tuned)" if sel.get("tune") else "")
                         + ("; features standardized" if sel.get("standardized") else ""))
            if sel.get("note"):
                lines.append(f"note: {sel['note']}")
        lines.append(f"time: {self.seconds:.1f}s on {self.device}"
                     + (f"; features cached: {self.cache.get('hits', 0)} hits, {self.cache.get('misses', 0)} "
                        f"extracted" if self.cache else ""))
        if self.dir is not None:
            lines.append(f"run saved to {self.dir}")
        return "\n".join(lines)
