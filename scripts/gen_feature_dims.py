"""Regenerate the feature-dimension tables the built-in plugins ship, so `zoo list` can show
feature widths without building any model. Models are built on the meta device (no memory,
no weights); the conformance tests check a sample of the tables against real outputs.

    python scripts/gen_feature_dims.py [--provider torchvision|timm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def torchvision_dims() -> dict[str, int]:
    import torchvision.models as tvm
    from torchvision.models import get_model

    sys.path.insert(0, str(ROOT / "plugins"))
    from zoo_torchvision import _build_kwargs, strip_classifier

    out = {}
    for name in tvm.list_models(module=tvm):
        try:
            with torch.device("meta"):
                model = get_model(name, weights=None, **_build_kwargs(name, None))
        except NotImplementedError:  # a few initialisers read tensor values; build for real
            model = get_model(name, weights=None, **_build_kwargs(name, None))
        out[name] = strip_classifier(model)
    return out


def timm_dims() -> dict[str, int]:
    import timm

    out = {}
    for arch in timm.list_models():
        try:
            model = timm.create_model(arch, num_classes=0, device="meta")
        except Exception as exc:  # noqa: BLE001 - a few models cannot be built on meta; listed as unknown
            print(f"skip {arch}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        out[arch] = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--provider", choices=["torchvision", "timm"], action="append")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    for provider in args.provider or ["torchvision", "timm"]:
        t0 = time.time()
        dims = torchvision_dims() if provider == "torchvision" else timm_dims()
        path = ROOT / "plugins" / f"zoo_{provider}" / "feature_dims.json"
        path.write_text(json.dumps(dict(sorted(dims.items())), indent=0) + "\n")
        print(f"{provider}: {len(dims)} models in {time.time() - t0:.0f}s -> {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
