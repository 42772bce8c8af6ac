"""The dataclass records that describe a backbone: what plugins register and what users read.

Kept free of torch imports so `zoo list` can describe backbones without building any.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from .errors import InvalidRecordError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class Normalization:
    """How a backbone must be fed, as its weights were trained.

    Eval preprocessing: resize so the shorter side is `resize_size` (crop_mode "center"), or
    both sides to `resize_size` ("squash"), with `interpolation`; center-crop to `input_size`;
    scale to [0, 1]; subtract `mean` and divide by `std` per channel (RGB order).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]  # (channels, height, width)
    resize_size: int
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    @property
    def crop_pct(self) -> float:
        """timm's name for input/resize: 0.875 means resize to 256 and crop 224."""
        return self.input_size[-1] / self.resize_size

    @classmethod
    def from_crop_pct(cls, mean: Sequence[float], std: Sequence[float], input_size: Sequence[int], crop_pct: float,
                      **kw: Any) -> "Normalization":
        # timm computes the resize the same way (transforms_factory: floor(size / crop_pct)).
        c, h, w = (int(v) for v in input_size)
        return cls(tuple(mean), tuple(std), (c, h, w), int(math.floor(w / crop_pct)), **kw)

    def validate(self, where: str = "") -> "Normalization":
        """Raise InvalidRecordError naming `where` unless every field is usable."""
        pre = f"{where}: " if where else ""
        c = self.input_size[0] if len(self.input_size) == 3 else None
        if len(self.input_size) != 3 or any(int(v) <= 0 for v in self.input_size):
            raise InvalidRecordError(f"{pre}input_size must be (C, H, W) of positive ints, got {self.input_size!r}")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != c:
                raise InvalidRecordError(
                    f"{pre}{label} must have one value per input channel ({c}), got {len(values)}: {values!r}"
                )
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise InvalidRecordError(f"{pre}{label} must be finite numbers, got {values!r}")
        if any(v <= 0 for v in self.std):
            raise InvalidRecordError(f"{pre}std must be > 0 for every channel, got {self.std!r}")
        if int(self.resize_size) <= 0:  # smaller than the crop is legal: timm's crop_pct > 1 pads
            raise InvalidRecordError(f"{pre}resize_size must be positive, got {self.resize_size!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidRecordError(f"{pre}interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise InvalidRecordError(f"{pre}crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_pct"] = round(self.crop_pct, 4)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalization":
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            input_size=tuple(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=d.get("interpolation", "bilinear"),
            crop_mode=d.get("crop_mode", "center"),
        )


@dataclass(frozen=True)
class WeightsInfo:
    """One set of pretrained weights a plugin can load for a backbone."""

    tag: str
    source: str = ""  # URL, hub id or package the file comes from
    file_name: str = ""  # what to place where, when offline
    num_classes: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    license: str = ""


@dataclass(frozen=True)
class LayerGroup:
    """A named run of parameters, ordered from input to output. Groups never overlap."""

    name: str
    parameters: tuple[str, ...]


@dataclass(frozen=True)
class BackboneSpec:
    """What a plugin registers: a backbone it can build, by name, without building it.

    `provider/model` is the qualified name users type; a weights tag is appended with a dot
    (`timm/resnet18.a1_in1k`). `extra` is the plugin's own (e.g. the real constructor name).
    """

    provider: str
    model: str
    family: str = ""
    weights: tuple[WeightsInfo, ...] = ()
    default_weights: str | None = None
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.model}"

    @property
    def weight_tags(self) -> tuple[str, ...]:
        return tuple(w.tag for w in self.weights)

    def weights_info(self, tag: str) -> WeightsInfo | None:
        return next((w for w in self.weights if w.tag == tag), None)

    def validate(self) -> "BackboneSpec":
        for label, value in (("provider", self.provider), ("model", self.model)):
            if not value or not isinstance(value, str) or "/" in value or value != value.strip():
                raise InvalidRecordError(f"backbone {label} must be a non-empty name without '/', got {value!r}")
        if len(set(self.weight_tags)) != len(self.weights):
            raise InvalidRecordError(f"{self.name}: duplicate weights tags {self.weight_tags}")
        if self.default_weights is not None and self.default_weights not in self.weight_tags:
            raise InvalidRecordError(
                f"{self.name}: default_weights {self.default_weights!r} is not among its tags {self.weight_tags}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the listing index stores specs this way); `extra` must be JSON-able to survive."""
        return {"provider": self.provider, "model": self.model, "family": self.family,
                "weights": [asdict(w) | {"metrics": dict(w.metrics)} for w in self.weights],
                "default_weights": self.default_weights, "description": self.description, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneSpec":
        return cls(provider=d["provider"], model=d["model"], family=d.get("family", ""),
                   weights=tuple(WeightsInfo(**w) for w in d.get("weights", ())),
                   default_weights=d.get("default_weights"), description=d.get("description", ""),
                   extra=d.get("extra") or {})
