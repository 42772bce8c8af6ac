"""The options of every command, in one place, validated on construction.

Each config dataclass (TrainConfig, EvaluateConfig, ExportConfig, PredictConfig; BenchConfig in
zoo.bench.runner uses the same checks) declares its fields with their default and their check.
Building one with a bad value raises OptionError naming the command-line flag, the value and what
is accepted, so the Python API and the CLI refuse the same things with the same message, before
any work is done or any file written. The CLI takes its defaults from these classes (a default is
written once; tests/test_options.py holds the parsers to that).

Kept free of torch and numpy imports: `zoo --help` builds its parsers from these classes.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from .errors import ZooError

DEFAULT_BACKBONE = "default"  # the backbone (and offline weights) a plugin declares: zoo.plugin.registry.default_backbone
MIN_IMAGE_SIZE = 16  # below this every backbone's stride-16/32 stages see less than one pixel
MAX_IMAGE_SIZE = 4096
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class OptionError(ZooError, ValueError):
    """An option's value is out of range, not finite, or inconsistent with another option."""


# --------------------------------------------------------------------------- checks
# A check takes the value and returns None when it is fine, else what is accepted.
Check = Callable[[Any], "str | None"]


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False, optional: bool = False) -> Check:
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "") + (" (or unset)" if optional else "")

    def check(v: Any) -> str | None:
        if v is None:
            return None if optional else expected
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
            return expected
        if not math.isfinite(v):
            return expected
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return expected
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return expected
        return None
    return check


def choice(*values: Any, optional: bool = False) -> Check:
    expected = "one of " + ", ".join(str(v) for v in values) + (" (or unset)" if optional else "")
    return lambda v: None if (v is None and optional) or v in values else expected


def text(optional: bool = True) -> Check:
    return lambda v: None if (v is None and optional) or (isinstance(v, str) and v.strip()) else \
        "a non-empty string" + (" (or unset)" if optional else "")


def engine_name(v: Any) -> str | None:
    """auto or a registered extraction engine: the list comes from the engine registry (plugins)."""
    from .plugin import registry

    names = registry.engines().choices()
    return None if v in names else "one of " + ", ".join(names) + " (`zoo plugins` lists engine plugins)"


def device_name(v: Any) -> str | None:
    return None if isinstance(v, str) and DEVICE_PATTERN.match(v.lower()) else "auto, cpu, cuda, cuda:N or mps"


def int_list(lo: int = 1, allow_empty: bool = False) -> Check:
    expected = f"a list of integers >= {lo}" + ("" if allow_empty else " (at least one)")

    def check(v: Any) -> str | None:
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            return expected
        items = list(v)
        if not items and not allow_empty:
            return expected
        return None if all(number(lo, integer=True)(x) is None for x in items) else expected
    return check


def opt(default: Any = MISSING, check: Check | None = None, flag: str | None = None, *,
        default_factory: Any = MISSING) -> Any:
    """A config field: its default, its check, and its command-line flag (default --field-name)."""
    meta = {"check": check, "flag": flag}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(cls: Any, name: str) -> str:
    f = next(f for f in fields(cls) if f.name == name)
    return str(f.metadata.get("flag") or "--" + name.replace("_", "-"))


def defaults(cls: Any) -> dict[str, Any]:
    """{field: default} of a config class (what the CLI shows and falls back to)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def validate_fields(cfg: Any) -> None:
    """Run every field's check; raise OptionError for the first that fails."""
    for f in fields(cfg):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(cfg, f.name)
        expected = check(value)
        if expected is not None:
            raise OptionError(f"{flag_of(type(cfg), f.name)} must be {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def fail(cls: Any, name: str, message: str) -> OptionError:
    return OptionError(f"{flag_of(cls, name)} {message}")


# --------------------------------------------------------------------------- train
def _freeze(v: Any) -> str | None:
    if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return "'all' or a number of layer groups >= 0"


@dataclass
class TrainConfig:
    backbone: str = opt(DEFAULT_BACKBONE, text(optional=False))
    weights: Any = opt("default")
    data: str | None = opt(None, text())
    csv: str | None = opt(None, text())
    csv_outside_root: bool = opt(False)  # CSV rows may point outside the data root
    val_data: str | None = opt(None, text())
    val_split: float = opt(0.2, number(0, 1, hi_open=True))  # 0: no validation split
    freeze: Any = opt("all", _freeze)  # "all" or K layer groups
    bn_adapt: bool = opt(False)
    head: str = opt("linear", choice("linear", "mlp"))
    hidden: tuple[int, ...] = opt((512,), int_list(1))
    dropout: float = opt(0.0, number(0, 1, hi_open=True))
    head_norm: str | None = opt(None, choice("batchnorm", "layernorm", optional=True))
    epochs: int = opt(20, number(1, integer=True))
    lr: float = opt(1e-3, number(0, lo_open=True))
    weight_decay: float = opt(1e-4, number(0))
    label_smoothing: float = opt(0.0, number(0, 1, hi_open=True))
    batch_size: int = opt(64, number(1, integer=True))
    patience: int = opt(0, number(0, integer=True))  # early stopping: epochs without holdout improvement; 0 = off
    # The epoch and the weight decay (see `tune`) are chosen by stratified k-fold cross-validation
    # over the training images on cached features (fewer folds when a class has fewer images), then
    # the head is refit on all of them; never on the reported validation split. 0: no CV.
    folds: int = opt(5, lambda v: None if isinstance(v, int) and not isinstance(v, bool) and (v == 0 or v >= 2)
                     else "0 (off) or an integer >= 2")
    # Instead of CV: choose on this stratified fraction of the training images (then refit on all);
    # 0 (default): cross-validation as above, or the last epoch where it cannot run.
    holdout: float = opt(0.0, number(0, 0.5, hi_open=True))
    # the weight decay from TUNE_WEIGHT_DECAYS, chosen by CV (or on the holdout): auto = for a linear
    # head wherever the features are cached (seconds of head training); on = required (MLP too);
    # off = --weight-decay as given
    tune: str = opt("auto", choice("auto", "on", "off"))
    # the same image content under two labels in the training data: an error unless this is set
    allow_duplicates: bool = opt(False)
    # staged unfreezing (with --freeze N): the head alone on the frozen backbone's features for E
    # epochs, then the unfrozen groups too for the rest; 0: off
    unfreeze_after: int = opt(0, number(0, integer=True))
    # learning-rate multipliers of the trained layer groups, the last group first (the head: 1); groups
    # beyond the list take its last value; empty: 1 for all
    lr_mult: tuple[float, ...] = opt((), lambda v: None if isinstance(v, (tuple, list)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)
        else "a list of positive numbers, e.g. 1,0.3,0.1")
    standardize: bool = opt(True, flag="--no-standardize")  # per-feature standardization, folded into the head
    device: str = opt("auto", device_name)
    amp: str = opt("auto", choice("auto", "bf16", "fp16", "off"))  # auto | bf16 | fp16 | off
    seed: int = opt(0, number(0, 2 ** 63 - 1, integer=True))
    strict: bool = opt(False)
    max_image_pixels: int = opt(89_478_485, number(1, integer=True))  # PIL's decompression-bomb limit
    cache: bool = opt(True, flag="--no-cache")
    cache_dir: str | None = opt(None, text())
    augment: bool = opt(False)
    views: int = opt(0, number(0, integer=True))
    image_size: int | None = opt(None, number(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, integer=True, optional=True))
    num_workers: int | None = opt(None, number(0, integer=True, optional=True), flag="--workers")
    progress: bool = opt(True, flag="--no-progress")
    # feature extraction (zoo.features: engines, decoding): the engine, and decoders that change pixels
    # slightly (each cached under its own key)
    engine: str = opt("auto", engine_name)
    jpeg_draft: bool = opt(False)
    gpu_decode: bool = opt(False)

    def __post_init__(self) -> None:
        if isinstance(self.hidden, list):
            self.hidden = tuple(self.hidden)
        validate_fields(self)
        if self.views and not self.augment:
            raise fail(TrainConfig, "views", "N pre-draws N augmented views per image; it needs --augment")
        if self.csv is None and self.csv_outside_root:
            raise fail(TrainConfig, "csv_outside_root", "only applies with --csv")
        if self.tune == "on" and not self.holdout and not self.folds:
            raise fail(TrainConfig, "tune", "chooses the weight decay by cross-validation or on a holdout; it needs "
                       "--folds >= 2 or --holdout > 0")
        if isinstance(self.lr_mult, list):
            self.lr_mult = tuple(self.lr_mult)
        if self.unfreeze_after and (str(self.freeze) == "all" or self.augment):
            raise fail(TrainConfig, "unfreeze_after", "needs --freeze N (a partial freeze) and no --augment")
        if self.unfreeze_after and self.unfreeze_after >= self.epochs:
            raise fail(TrainConfig, "unfreeze_after", f"must be below --epochs ({self.epochs})")
        if self.val_data is not None and self.data is None and self.csv is None:
            raise fail(TrainConfig, "val_data", "needs --data (or --csv) for the training images")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["lr_mult"] = list(self.lr_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        if "lr_mult" in d:
            d["lr_mult"] = tuple(d["lr_mult"])
        return cls(**d)


# Settings that may differ when resuming (they do not change what is computed, or extend it).
RESUMABLE_OVERRIDES = ("epochs", "device", "num_workers", "progress", "cache_dir", "cache", "patience")


# --------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateConfig:
    run: str = opt(MISSING, text(optional=False))
    data: str | None = opt(None, text())
    csv: str | None = opt(None, text())
    batch_size: int = opt(64, number(1, integer=True))
    device: str = opt("auto", device_name)
    num_workers: int | None = opt(None, number(0, integer=True, optional=True), flag="--workers")
    strict: bool = opt(False)
    max_image_pixels: int = opt(89_478_485, number(1, integer=True))

    def __post_init__(self) -> None:
        validate_fields(self)


# --------------------------------------------------------------------------- export
@dataclass
class ExportConfig:
    """The options every format shares; each exporter declares and checks its own
    (`Exporter.options`, which also become `zoo export` flags)."""

    formats: Any = opt("all")
    out: str | None = opt(None, text())
    preprocess: str = opt("normalize", choice("normalize", "none", "full"))
    quantize: str | None = opt(None, text())
    tolerance: float | None = opt(None, number(0, lo_open=True, optional=True))
    int8_agreement: float | None = opt(None, number(0, 1, lo_open=True, optional=True))
    images: Any = opt(None)
    embedding: bool = opt(True, flag="--no-embedding")
    strict: bool = opt(False)
    step_budget: float | None = opt(None, number(0, lo_open=True, optional=True))

    def __post_init__(self) -> None:
        validate_fields(self)


# --------------------------------------------------------------------------- predict
@dataclass
class PredictConfig:
    model: str = opt(MISSING, text(optional=False))
    inputs: tuple[str, ...] = opt((), None)
    top_k: int = opt(5, number(1, integer=True))

    def __post_init__(self) -> None:
        validate_fields(self)
        if not self.inputs:
            raise fail(PredictConfig, "inputs", "needs at least one image file or folder")


# --------------------------------------------------------------------------- select
def _names(v: Any) -> str | None:
    ok = isinstance(v, (tuple, list)) and all(isinstance(s, str) and s.strip() for s in v)
    return None if ok else "a list of backbone names (provider/model[.tag]); empty: every backbone with offline weights"


@dataclass
class SelectConfig:
    """`zoo select`: the backbones compared on the user's images. The extraction settings that
    enter the feature-cache key (device, amp, engine, batch size) mean what they mean for
    `zoo train`, and default the same, so a later `zoo train` with the chosen backbone is warm."""

    data: str | None = opt(None, text())
    csv: str | None = opt(None, text())
    backbones: tuple[str, ...] = opt((), _names, flag="BACKBONE")
    budget_ms: float | None = opt(None, number(0, lo_open=True, optional=True))  # keep backbones at most this fast
    folds: int = opt(5, number(2, integer=True))
    seed: int = opt(0, number(0, 2 ** 63 - 1, integer=True))
    device: str = opt("auto", device_name)
    amp: str = opt("auto", choice("auto", "bf16", "fp16", "off"))
    engine: str = opt("auto", engine_name)
    batch_size: int = opt(64, number(1, integer=True))
    timing_batch: int = opt(8, number(1, integer=True))  # the batch the forward pass is timed at
    strict: bool = opt(False)
    max_image_pixels: int = opt(89_478_485, number(1, integer=True))
    cache: bool = opt(True, flag="--no-cache")
    cache_dir: str | None = opt(None, text())
    num_workers: int | None = opt(None, number(0, integer=True, optional=True), flag="--workers")
    progress: bool = opt(True, flag="--no-progress")

    def __post_init__(self) -> None:
        if isinstance(self.backbones, (list, str)):
            self.backbones = (self.backbones,) if isinstance(self.backbones, str) else tuple(self.backbones)
        validate_fields(self)
        if self.data is None and self.csv is None:
            raise fail(SelectConfig, "data", "is required: the image folder to choose a backbone for (one "
                                             "subfolder per class), e.g. zoo select --data photos/")
