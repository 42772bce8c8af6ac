"""Reading weight files safely: safetensors, or torch.load(weights_only=True). Never pickle code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from .errors import WeightsUnavailableError, ZooError
from .io import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(value: object) -> bool:
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and (value.endswith(WEIGHT_SUFFIXES) or os.sep in value or Path(value).is_file())


def file_digest(path: str | os.PathLike, n: int = 12) -> str:
    return file_sha256(path)[:n]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from a local file without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Mapping = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpicklable object is refused by weights_only, not run
            raise ZooError(
                f"could not read {str(path)!r} as plain tensors ({type(exc).__name__}: {exc}). "
                "The zoo never unpickles code; save the weights with safetensors "
                "(`safetensors.torch.save_file(model.state_dict(), 'w.safetensors')`) or as a plain state_dict"
            ) from exc
    return unwrap_state_dict(sd, path)


def unwrap_state_dict(sd: Mapping, path: object = "") -> dict[str, torch.Tensor]:
    """Accept the common wrappers: {'state_dict': ...}, {'model': ...}, DDP's 'module.' prefix."""
    for key in ("state_dict", "model_state_dict", "model", "ema"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ZooError(f"{str(path)!r} holds no state_dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """Load `sd` into a headless backbone. Keys for the removed classifier are ignored;
    a missing backbone key or a shape mismatch is an error. Returns the ignored keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or mismatched:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if mismatched:
            lines.append(f"{len(mismatched)} shape mismatches (first: {'; '.join(mismatched[:3])})")
        raise ZooError(
            f"{what} does not fit this backbone: " + "; ".join(lines)
            + ". The file must hold this architecture's state_dict (the classifier may be included)"
        )
    module.load_state_dict({k: sd[k] for k in own}, strict=True)
    return sorted(k for k in sd if k not in own)
