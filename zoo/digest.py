"""State digests: what identifies a module's weights, for cache keys and engine choices.

The feature cache (zoo.features.cache), the extraction engines' choice memo and their ONNX export
cache (the onnxruntime engine) all key on a backbone's actual state, not its name: random init,
local weight files and plugin changes are covered too. Kept here, below both, so neither imports
the other for it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

_DIGESTS: dict[int, tuple] = {}  # id(module) -> (weak ref, stamp, digest)


def _stamp(state: dict) -> tuple | None:
    """What identifies the tensors' current contents without reading them: storage address and
    version counter (bumped by every in-place write). None where a tensor has no counter."""
    try:
        return tuple((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), str(t.device))
                     for name, t in state.items())
    except RuntimeError:  # inference-mode tensors carry no version counter
        return None


def state_digest(module: nn.Module) -> str:
    """sha256 of the module's state dict (names, dtypes, shapes, bytes). A run asks for it several
    times (the cache key, the engine choice, the ONNX file name): hashing ResNet-18's 45 MB costs
    about 0.3 s each, so the digest is remembered until a tensor is replaced or written in place."""
    import weakref

    state = module.state_dict()
    stamp = _stamp(state)
    memo = _DIGESTS.get(id(module))
    if stamp is not None and memo is not None and memo[0]() is module and memo[1] == stamp:
        return memo[2]
    d = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        d.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        d.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = d.hexdigest()
    if stamp is not None:
        for k in [k for k, v in _DIGESTS.items() if v[0]() is None]:
            del _DIGESTS[k]
        _DIGESTS[id(module)] = (weakref.ref(module), stamp, digest)
    return digest


def model_key(model, amp_dtype: torch.dtype | None = None) -> dict:
    """The model part of a feature-cache key (see the module docstring): what determines a
    feature vector apart from the image and its transform. The caller adds `transform` and
    `view_seed`; FeatureCache adds the format version."""
    return {"backbone": model.meta.backbone, "weights": model.meta.weights, "state": state_digest(model.backbone),
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"}
