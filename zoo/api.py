"""The plugin API, v2: the two provider kinds a plugin registers, and what they exchange with the zoo.

A plugin is a module (found through the `zoo` entry-point group) implementing one or both hooks
of `zoo.hookspecs`:

    @zoo.hookimpl
    def zoo_register_backbones(register):
        register(MyBackbones())        # a zoo.BackboneProvider

    @zoo.hookimpl
    def zoo_register_exporters(register):
        register(MyFormat())           # a zoo.Exporter

Required parts are abstract (`@abstractmethod`): Python refuses to build a provider that lacks
one, and the zoo turns that into a message saying what to write. Optional parts have defaults.
This module is the reference for plugin authors: `zoo plugins --reference` prints it, and
docs/plugins.md carries the same text (a test keeps the two equal).

Nothing here imports torch: listing backbones must stay light.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from .records import BackboneSpec, LayerGroup, Normalization

if TYPE_CHECKING:  # torch stays out of `zoo list`
    import torch.nn as nn

    from .model import ZooModel


# -- backbones ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltBackbone:
    """What `BackboneProvider.build` returns.

    `module` maps a normalized float batch (N, C, H, W) to pooled features (N, feature_dim).
    The zoo runs it once on an input of the record's size and refuses it (naming your plugin)
    when its real output width is not `feature_dim`. `layer_groups`: the parameters split into
    ordered groups, input to output, every parameter in exactly one group; None lets the zoo
    group them itself (`zoo.auto_layer_groups`)."""

    module: "nn.Module"
    feature_dim: int
    layer_groups: Sequence[LayerGroup] | None = None


@dataclass(frozen=True)
class PretrainedHead:
    """The classifier a backbone's pretrained weights came with, and its class names.

    Optional part of a provider (`BackboneProvider.pretrained_head`); `module` maps the pooled
    features (N, feature_dim) to logits (N, len(labels))."""

    labels: tuple[str, ...]
    module: Any


class BackboneProvider(ABC):
    """A family of backbones under one provider name (`name/model[.tag]`).

    Set `name` (class attribute). Every spec you return from `specs()` must carry
    `provider=name`; a plugin can only register under the provider names it declares this way,
    and a name another plugin (or a built-in) already owns marks your plugin broken.
    """

    name: ClassVar[str] = ""
    #: "model.tag" of a backbone whose weights load offline, offered as the zoo's default
    #: (`zoo train` without --backbone). Leave None; the built-in timm provider sets it.
    default_backbone: ClassVar[str | None] = None

    @abstractmethod
    def specs(self) -> Iterable[BackboneSpec]:
        """Every backbone you provide, described without building any (cheap: no models, no
        downloads). Called once per set of installed plugins; the result is cached on disk."""

    @abstractmethod
    def normalization(self, spec: BackboneSpec, weights: str | None) -> Normalization:
        """The preprocessing the backbone expects with weights tag `weights` (one of
        `spec.weight_tags`), or, for None (random init), what the architecture was designed for
        (normally its default weights' stats). Validated by the zoo."""

    @abstractmethod
    def build(self, spec: BackboneSpec, weights: str | None) -> BuiltBackbone:
        """Build the headless backbone, with weights tag `weights` loaded (None: random init).

        Offline and the weights are missing: raise `zoo.backbones.offline_weights_error(...)`.
        Never execute pickled code (read .safetensors, or torch.load(..., weights_only=True))."""

    def feature_dim(self, spec: BackboneSpec) -> int | None:
        """The pooled feature width if known without building (a constant, a shipped table), for
        `zoo list`; None if unknown. Checked against the built module whenever one is built."""
        return None

    def pretrained_head(self, spec: BackboneSpec, weights: str | None) -> PretrainedHead | None:
        """The classifier that came with weights `weights`, if you can provide it; None for
        `weights=None` (random init). Default: not available."""
        return None

    def offline_weights(self) -> Iterable[str]:
        """"model.tag" of each backbone whose pretrained weights `build` can load on this machine
        now, with no network (a file in a local cache, an installed weights package), found
        cheaply: no model built, nothing downloaded. `zoo select` compares these by default.
        Default: none."""
        return ()


# -- exporters ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportOption:
    """One option an exporter accepts (`zoo export -O name=value`, `zoo.export(..., name=value)`)."""

    name: str
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] = ()
    type: type = str  # how a command-line string is parsed: str, int, float or bool

    def parse(self, value: Any) -> Any:
        """`value` (possibly a command-line string) as this option's type, checked against choices."""
        if isinstance(value, str) and self.type is not str:
            if self.type is bool:
                value = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                value = self.type(value)
        if self.choices and value not in self.choices:
            raise ValueError(f"option {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class ExportOptions:
    """What an exporter's `export` and `validate` receive.

    preprocess: "normalize" (the artifact takes uint8 NHWC RGB at the input size, scaling and
        mean/std inside), "none" (float32 NCHW, already normalized) or, for exporters that declare
        it in `Exporter.preprocess_modes`, "full" (uint8 NHWC RGB at any size, one image or N of
        one size; the resize and center crop inside too: `zoo.export.deploy_module` builds it).
    embedding: also output the pooled features as "embedding".
    artifacts: format name -> path of the artifacts already exported and validated in this run
        (e.g. an int8 exporter quantizes the fp32 file when its `builds_on` format is there).
    options: your own options, by name: exactly those in `Exporter.options`, defaults filled in.
    calibration: for exporters that declare `quantization`: the user's images, uint8 (N, H, W, 3)
        at the input size after the reference resize/crop (a sample of the run's training images
        when the export comes from a run, else the validation images); None otherwise.
    """

    preprocess: str = "normalize"
    embedding: bool = True
    artifacts: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    calibration: Any = None

    def __getitem__(self, name: str) -> Any:
        return self.options[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    def as_kwargs(self) -> dict[str, Any]:
        """Everything as keyword arguments (for exporters written as plain functions)."""
        return {"preprocess": self.preprocess, "embedding": self.embedding, "artifacts": dict(self.artifacts),
                "calibration": self.calibration, **self.options}


@dataclass
class ValidationResult:
    """The verdict of `Exporter.validate`: `passed` is required; `problems` says why not.

    metrics: numbers for the report (e.g. `zoo.validation.compare`'s max_abs_logit_diff,
    top1_agreement, min_embedding_cosine, per_batch_size). runtime: what ran the artifact."""

    passed: bool
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime: str = ""

    @classmethod
    def from_report(cls, report: Mapping[str, Any], runtime: str = "") -> "ValidationResult":
        """From `zoo.validation.compare(...)`'s dict (its "passed" and "problems"; the rest as metrics)."""
        rest = {k: v for k, v in report.items() if k not in ("passed", "problems", "runtime")}
        return cls(passed=report.get("passed") is True, problems=list(report.get("problems") or []), metrics=rest,
                   runtime=runtime or str(report.get("runtime") or ""))

    def fail(self, *problems: str) -> "ValidationResult":
        """Add problems; the result no longer passes."""
        self.problems.extend(problems)
        self.passed = False
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "problems": list(self.problems), **self.metrics,
                **({"runtime": self.runtime} if self.runtime else {})}


class Exporter(ABC):
    """An export format. Set `name` (the format users type) and `suffix` (the artifact's file
    ending, e.g. ".onnx"); implement `export`, and `validate` so `zoo export` can check the file
    against eager PyTorch (without it, artifacts are marked unvalidated)."""

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: distributions the format needs at export time, e.g. ("onnx", "onnxruntime"); a missing one
    #: is reported by name (with the pip command) before anything is written.
    requires: ClassVar[tuple[str, ...]] = ()
    #: the options this exporter accepts; nothing else reaches it.
    options: ClassVar[tuple[ExportOption, ...]] = ()
    #: exported by `--format all` (the default format list)
    in_all: ClassVar[bool] = False
    #: the format this one is derived from (an int8 ONNX builds on "onnx"): when both are
    #: exported it runs after it and receives its validated path in `ExportOptions.artifacts`.
    builds_on: ClassVar[str | None] = None
    #: `zoo export --quantize Q` adds, for each chosen format F, the exporter with
    #: builds_on=F and quantization=Q.
    quantization: ClassVar[str | None] = None
    #: the `ExportOptions.preprocess` modes this format writes; "full" (the decoded image at any
    #: size in, resize and crop inside) only where declared, else `zoo export` refuses it.
    preprocess_modes: ClassVar[tuple[str, ...]] = ("normalize", "none")

    @abstractmethod
    def export(self, model: "ZooModel", path: str, options: ExportOptions) -> Mapping[str, Any]:
        """Write the whole model (`model.backbone`, `model.head`) as one artifact at `path`.

        `model.meta` holds the backbone, weights, `Normalization` and class labels: write them
        into the artifact so it describes itself (`zoo.export.artifact_metadata(model, ...)`
        gives all of it). Return a small JSON-ready report; "metadata" in it goes to the sidecar."""

    def validate(self, model: "ZooModel", path: str, images: Any, options: ExportOptions,
                 reference: Mapping[str, Any], tolerance: Any, batch_sizes: Sequence[int],
                 targets: Sequence[int | None] | None) -> ValidationResult | None:
        """Run the artifact at `path` and compare it with eager PyTorch.

        images: uint8 array (N, H, W, 3), RGB, already resized/cropped to the input size; an
            artifact with baked preprocessing gets them as they are, one without gets
            `zoo.validation.model_inputs(images, model.meta.normalization, options.preprocess)`.
            With preprocess "full": a list of uint8 (H, W, 3) images at their own, different
            sizes (run them with `zoo.validation.run_full`, judge with `compare_full`); the
            reference is eager PyTorch on their reference preprocessing, in the same order.
        reference: eager PyTorch's "logits", "probabilities", "embedding" on those images.
        tolerance: a `zoo.validation.Tolerance`. batch_sizes: run the images in chunks of each.
        targets: class indices where the images are labelled (else None entries).
        Return a ValidationResult (`ValidationResult.from_report(zoo.validation.compare(...))`).
        Default: None, i.e. this format is not validated."""
        return None

    def read_metadata(self, artifact: Any) -> Mapping[str, Any] | None:
        """The zoo metadata an artifact of this format carries; `artifact` is a path, or the object
        this format's runtime loaded it into (an onnxruntime session for ONNX). Default: None."""
        return None

    def export_module(self, module: "nn.Module", example: Any, path: str,
                      options: ExportOptions) -> Mapping[str, Any]:
        """Export a bare module (one float NCHW tensor "input" in, "output" out, dynamic batch),
        for `zoo bench`. Optional: raise NotImplementedError if the format cannot."""
        raise NotImplementedError(f"exporter {self.name!r} cannot export a bare module")


# -- checks the registry applies to what a plugin hands it -----------------------------------------------
PROVIDER_KINDS = {"backbones": BackboneProvider, "exporters": Exporter}


def _public_api(base: type) -> set[str]:
    return {n for n in dir(base) if not n.startswith("_")}


def check_provider(obj: Any, kind: str) -> Any:
    """The provider instance `obj` (a class is instantiated), or a TypeError saying what to write."""
    base = PROVIDER_KINDS[kind]
    what = f"zoo.{base.__name__}"
    if isinstance(obj, type):
        if not issubclass(obj, base):
            raise TypeError(f"register() expects a {what}, got the class {obj.__name__}: subclass {what}")
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"{obj.__name__} does not implement the required "
                            + ", ".join(_signature(base, m) for m in missing)
                            + f": write {'them' if len(missing) > 1 else 'it'} in {obj.__name__} (see {what})")
        obj = obj()
    if not isinstance(obj, base):
        raise TypeError(f"register() expects a {what} instance, got {type(obj).__name__}: subclass {what} "
                        f"and implement {', '.join(_signature(base, m) for m in sorted(base.__abstractmethods__))}")
    cls = type(obj)
    api = _public_api(base)
    for attr in sorted(vars(cls)):
        if attr.startswith("_") or attr in api:
            continue
        close = difflib.get_close_matches(attr, sorted(api), n=1, cutoff=0.8)
        if close:  # a misspelt optional part would be silently ignored
            raise TypeError(f"{cls.__name__}.{attr} is not part of {what}; did you mean {close[0]!r}? "
                            "(rename it, or start it with '_' if it is your own)")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name or "/" in obj.name or obj.name != obj.name.strip():
        raise TypeError(f"{cls.__name__}.name must be a non-empty name without '/': set it as a class attribute, "
                        f"e.g. name = \"myprovider\" (got {getattr(obj, 'name', None)!r})")
    if kind == "exporters" and (not isinstance(obj.suffix, str) or not obj.suffix.startswith(".")):
        raise TypeError(f"{cls.__name__}.suffix must be the artifact's file ending, e.g. \".onnx\", got {obj.suffix!r}")
    return obj


def _signature(base: type, method: str) -> str:
    fn = getattr(base, method)
    return f"{method}{inspect.signature(fn)}"


# -- the reference, generated from the definitions above -------------------------------------------------
def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _class_section(cls: type) -> list[str]:
    out = [f"### `zoo.{cls.__name__}`", "", _doc(cls), ""]
    abstract = getattr(cls, "__abstractmethods__", frozenset())
    attrs = [(n, v) for n, v in vars(cls).items() if not n.startswith("_") and not callable(v)
             and not isinstance(v, (classmethod, staticmethod, property))]
    if attrs:
        out += ["| attribute | default |", "| --- | --- |"]
        out += [f"| `{n}` | `{v!r}` |" for n, v in attrs]
        out.append("")
    for n, v in vars(cls).items():
        if n.startswith("_") or not inspect.isfunction(v):
            continue
        tag = "**required**" if n in abstract else "optional"
        sig = str(inspect.signature(v)).replace("'", "")
        out += [f"- `{n}{sig}` ({tag})", ""]
        out += ["  " + line if line else "" for line in _doc(v).splitlines()] + [""]
    return out


def _dataclass_section(cls: type) -> list[str]:
    out = [f"### `zoo.{cls.__name__}`", "", _doc(cls), "", "| field | type | default |", "| --- | --- | --- |"]
    for f in fields(cls):
        if f.default is not MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f"`{f.default_factory()!r}`"  # type: ignore[misc]
        else:
            default = "**required**"
        out.append(f"| `{f.name}` | `{str(f.type).replace('|', 'or')}` | {default} |")
    return out + [""]


def reference_markdown() -> str:
    """The plugin reference (hooks, providers, records) as Markdown, from the live definitions."""
    from . import hookspecs, records

    lines = ["## Reference (generated from the code: `zoo plugins --reference`)", "", "### Hooks", ""]
    for name in hookspecs.HOOKS:
        fn = getattr(hookspecs, name)
        lines += [f"- `{name}{inspect.signature(fn)}`".replace("'", ""), ""]
        lines += ["  " + line if line else "" for line in _doc(fn).splitlines()] + [""]
    for cls in (BackboneProvider, Exporter):
        lines += _class_section(cls)
    for cls in (BuiltBackbone, PretrainedHead, ExportOptions, ExportOption, ValidationResult, records.BackboneSpec,
                records.WeightsInfo, records.Normalization, records.LayerGroup):
        lines += _dataclass_section(cls)
    return "\n".join(lines).rstrip() + "\n"
