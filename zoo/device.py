"""The one device selection, mixed-precision settings and seeding: training, evaluation, bench and
doctor use these."""

from __future__ import annotations

import random

import numpy as np

from .errors import ZooError


def select_device(preference: str = "auto", allow_mps: bool = True):
    """The one device selection: auto = CUDA, then MPS (when allowed), then CPU; an explicit
    device that is not there is an error naming the fix."""
    import torch

    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if allow_mps and mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ZooError(f"--device {preference}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                       "use --device auto or --device cpu")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ZooError("--device mps: Apple MPS is not available here; use --device auto or --device cpu")
    if pref == "mps" and not allow_mps:
        raise ZooError("--device mps is not supported here; use --device auto, cpu or cuda")
    if pref not in ("cpu", "mps") and not pref.startswith("cuda"):
        raise ZooError(f"--device must be auto, cpu, cuda[:N] or mps, got {preference!r}")
    return torch.device(pref)


def amp_settings(device, amp: str):
    """-> (autocast dtype or None, use GradScaler)."""
    import torch

    amp = (amp or "auto").lower()
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "auto":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, device.type == "cuda"
    raise ZooError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
