"""Reference preprocessing: image decoding and the eval resize/crop/normalize, in PIL + numpy.

One implementation serves training, export validation and the torch-free predictor, so they
cannot drift apart. It matches torchvision's `Resize(int)` + `CenterCrop` on PIL images (the
pipeline torchvision's and timm's eval transforms build), since both end in `PIL.Image.resize`.
No torch import here: `zoo predict` runs on onnxruntime, numpy and Pillow only.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageDecodeError(ValueError):
    """A file that is not a readable image (corrupt, truncated, or not an image at all)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{printable(path)}: {reason}")
        self.reason = reason


# Images with more pixels are refused before decoding (decompression bombs). PIL's own default;
# $ZOO_MAX_IMAGE_PIXELS or the commands' --max-image-pixels change it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def max_image_pixels() -> int:
    env = os.environ.get("ZOO_MAX_IMAGE_PIXELS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else DEFAULT_MAX_IMAGE_PIXELS


def special_file_reason(path: str | os.PathLike) -> str | None:
    """Why a path must not be opened as an image (FIFO, socket, device, missing), else None.
    Only stat()s it: opening a FIFO would block forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot stat ({type(exc).__name__}: {exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode) else
            "not a regular file")
    return f"{kind}, not a regular file (skipped without opening)"


def printable(text: object) -> str:
    """A file name for one line of a listing: control characters (newlines...) escaped."""
    s = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: grayscale, palette (with transparency), RGBA/LA (composited
    on white, not blackened), CMYK, and 16/32-bit integer or float images (rescaled, not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            hi = 1.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode fully (so truncation is caught here, not mid-epoch), apply EXIF orientation, RGB.
    Special files are refused without being opened; images over `max_pixels` (default
    max_image_pixels()) before they are decoded."""
    special = special_file_reason(path)
    if special is not None:
        raise ImageDecodeError(path, special)
    limit = max_pixels or max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit, with a reason
            img_ctx = Image.open(path)
        with img_ctx as img:
            if img.width * img.height > limit:
                raise ImageDecodeError(path, f"{img.width}x{img.height} = {img.width * img.height} pixels, over "
                                             f"the limit of {limit} (a decompression bomb?); raise "
                                             "--max-image-pixels (or $ZOO_MAX_IMAGE_PIXELS) if it is genuine")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(path, f"not a readable image ({type(exc).__name__}: {exc})") from exc


def _norm_fields(norm) -> tuple:
    if isinstance(norm, Mapping):
        return (tuple(norm["mean"]), tuple(norm["std"]), tuple(norm["input_size"]), int(norm["resize_size"]),
                norm.get("interpolation", "bilinear"), norm.get("crop_mode", "center"))
    return norm.mean, norm.std, tuple(norm.input_size), norm.resize_size, norm.interpolation, norm.crop_mode


def resize_crop(img: Image.Image, norm) -> Image.Image:
    """Eval geometry: resize (shorter side, or both sides for "squash") then center crop."""
    _, _, (_, out_h, out_w), resize, interp, mode = _norm_fields(norm)
    resample = _RESAMPLE[interp]
    w, h = img.size
    if mode == "squash":
        img = img.resize((resize, resize), resample)
    elif mode == "border":  # keep ratio, longer side to `resize`; the crop below pads if needed
        scale = resize / max(w, h)
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), resample)
    else:  # torchvision Resize(int): shorter side to `resize`, longer side truncated like it does
        if w <= h:
            new_w, new_h = resize, int(resize * h / w)
        else:
            new_w, new_h = int(resize * w / h), resize
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
    return center_crop(img, out_h, out_w)


def center_crop(img: Image.Image, out_h: int, out_w: int) -> Image.Image:
    w, h = img.size
    if w < out_w or h < out_h:  # pad with black like torchvision's CenterCrop
        canvas = Image.new(img.mode, (max(w, out_w), max(h, out_h)))
        canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))


def to_uint8_hwc(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def normalize_uint8(batch_hwc: np.ndarray, norm) -> np.ndarray:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W) normalized with the record's stats."""
    mean, std, *_ = _norm_fields(norm)
    arr = np.asarray(batch_hwc, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def preprocess(img: Image.Image, norm, normalize: bool = True) -> np.ndarray:
    """One decoded RGB image -> (1, 3, H, W) float32 normalized, or (1, H, W, 3) uint8."""
    arr = to_uint8_hwc(resize_crop(to_rgb(img), norm))
    return normalize_uint8(arr, norm) if normalize else arr[None]


def preprocess_files(paths: Sequence[str | os.PathLike], norm, normalize: bool = True) -> np.ndarray:
    return np.concatenate([preprocess(load_image(p), norm, normalize) for p in paths])


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under `root` (a file is returned as is), sorted for determinism."""
    root = os.fspath(root)
    if os.path.isfile(root):
        return [root]
    out = []
    for dirpath, _, files in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    return sorted(out)  # special files among them are reported per file by load_image, never opened
