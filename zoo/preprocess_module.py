"""The reference eval preprocessing (`zoo.preprocess.resize_crop` + `normalize_uint8`) as a torch
module, for artifacts that take the decoded image as it is (`zoo export --preprocess full`).

It is TorchScript-scripted (not traced), so the size arithmetic stays arithmetic on the input's
shape: any height and width work in the saved file. The rules are `zoo.preprocess`'s, restated
on integers:

* size (crop_mode "center", the only one accepted): the shorter side to resize_size, the
  longer to int(resize_size * longer / shorter) (truncated).
* resampling: Pillow resizes 8-bit images horizontally, rounds to uint8, then vertically and
  rounds again; here the same two passes of `interpolate(..., antialias=True)` (Pillow's
  antialiased triangle filter; bicubic with a = -0.5 like Pillow), each followed by
  floor(x + 0.5) and a clamp to 0..255 (Pillow rounds halves up). An image already at the size
  is not resampled, as in the reference. (Both axes scale alike here; Pillow's pass order is
  not fixed when they do not, which is why "squash" is refused.)
* crop offsets: round((size - crop) / 2) with halves to even, computed on integers:
  q + (d % 2) * (q % 2) for d = size - crop, q = d // 2.

What remains different from Pillow is float vs fixed-point arithmetic: measured on
scikit-image's photos and odd sizes, at most 1 uint8 level on under 0.2% of the pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .preprocess import in_graph_problem


class ReferencePreprocess(nn.Module):
    """uint8 (N, H, W, 3) RGB at any size -> float32 (N, 3, crop_h, crop_w), normalized."""

    def __init__(self, norm):
        super().__init__()
        problem = in_graph_problem(norm)
        if problem is not None:
            raise ValueError(f"this backbone's preprocessing cannot run inside the graph: {problem}")
        self.resize = int(norm.resize_size)
        self.out_h = int(norm.input_size[1])
        self.out_w = int(norm.input_size[2])
        self.mode = norm.interpolation  # "bilinear" or "bicubic", interpolate's names too
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1))

    def _pass(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = F.interpolate(x, size=[h, w], mode=self.mode, align_corners=False, antialias=True)
        return torch.clamp(torch.floor(x + 0.5), 0.0, 255.0)

    def _offset(self, size: int, out: int) -> int:
        d = size - out
        q = d // 2
        return q + (d % 2) * (q % 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        h, w = x.shape[2], x.shape[3]
        if w <= h:
            new_h, new_w = int(self.resize * h / w), self.resize
        else:
            new_h, new_w = self.resize, int(self.resize * w / h)
        if new_h != h or new_w != w:
            x = self._pass(x, h, new_w)  # horizontal first, like Pillow
            x = self._pass(x, new_h, new_w)
        top = self._offset(new_h, self.out_h)
        left = self._offset(new_w, self.out_w)
        x = x[:, :, top:top + self.out_h, left:left + self.out_w]
        x = x / 255.0  # same float ops, same order as zoo.preprocess.normalize_uint8
        return (x - self.mean) / self.std


def scripted(norm) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        return torch.jit.script(ReferencePreprocess(norm).eval())
