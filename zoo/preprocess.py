"""Reference preprocessing: image decoding and the eval resize/crop/normalize, in PIL + numpy.

One implementation serves training, export validation and the torch-free predictor, so they
cannot drift apart. It matches torchvision's `Resize(int)` + `CenterCrop` on PIL images (the
pipeline torchvision's and timm's eval transforms build), since both end in `PIL.Image.resize`.
No torch import here: `zoo predict` runs on onnxruntime, numpy and Pillow only.
"""

from __future__ import annotations

import io
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


def load_image(path: str | os.PathLike, max_pixels: int | None = None, *, data: bytes | None = None,
               draft: int | None = None) -> Image.Image:
    """Decode fully (so truncation is caught here, not mid-epoch), apply EXIF orientation, RGB.
    Special files are refused without being opened; images over `max_pixels` (default
    max_image_pixels()) before they are decoded. data: the file's bytes, already read (then `path`
    only names it in errors). draft: a JPEG at least 4x this on each side is decoded by libjpeg at
    reduced scale keeping at least 2x it (opt-in, changes pixels: zoo.features' --jpeg-draft)."""
    if data is None:
        special = special_file_reason(path)
        if special is not None:
            raise ImageDecodeError(path, special)
    limit = max_pixels or max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit, with a reason
            img_ctx = Image.open(io.BytesIO(data) if data is not None else path)
        with img_ctx as img:
            if img.width * img.height > limit:
                raise ImageDecodeError(path, f"{img.width}x{img.height} = {img.width * img.height} pixels, over "
                                             f"the limit of {limit} (a decompression bomb?); raise "
                                             "--max-image-pixels (or $ZOO_MAX_IMAGE_PIXELS) if it is genuine")
            if draft and img.format == "JPEG" and min(img.size) >= 4 * draft:
                img.draft("RGB", (2 * draft, 2 * draft))
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


def resized_size(w: int, h: int, norm) -> tuple[int, int]:
    """(new_w, new_h) of the eval resize, before the crop. The one statement of the size rule
    (the graphs of `--preprocess full` and the metadata's "resize" recipe spell out the same):
    "center": shorter side to resize_size, longer side resize_size * long / short truncated
    (int(), like torchvision's Resize(int)); "squash": both sides to resize_size; "border":
    longer side to resize_size, shorter truncated."""
    _, _, _, resize, _, mode = _norm_fields(norm)
    if mode == "squash":
        return resize, resize
    if mode == "border":  # keep ratio, longer side to `resize`; the crop pads if needed
        scale = resize / max(w, h)
        return max(1, int(w * scale)), max(1, int(h * scale))
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def crop_offset(size: int, out: int) -> int:
    """Where a center crop of `out` starts in `size`: round((size - out) / 2) with Python's
    round, i.e. halves to even (an odd margin of 1 starts at 0, of 3 at 2, of 5 at 2), like
    torchvision's CenterCrop."""
    return int(round((size - out) / 2.0))


def resize_crop(img: Image.Image, norm) -> Image.Image:
    """Eval geometry: resize (shorter side, or both sides for "squash") then center crop."""
    _, _, (_, out_h, out_w), _, interp, mode = _norm_fields(norm)
    w, h = img.size
    new_w, new_h = resized_size(w, h, norm)
    if mode == "squash" or (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[interp])
    return center_crop(img, out_h, out_w)


_PIL_FILTER_NAMES = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS",
                     "box": "BOX", "hamming": "HAMMING"}
_SIZE_RULES = {
    "center": ("shorter_side", "the shorter side becomes resize_size; the longer side is int(resize_size * longer / "
               "shorter): the float quotient truncated toward zero (Python int(), torchvision Resize(int)), not "
               "rounded; an image already at that size is not resampled"),
    "squash": ("both_sides", "both sides become resize_size (the aspect ratio is not kept)"),
    "border": ("longer_side", "the longer side becomes resize_size; the shorter is int(shorter * resize_size / "
               "longer), at least 1 (truncated toward zero)"),
}


# What `--preprocess full` resizes with inside a graph: the filters ONNX Resize and torch's
# interpolate can antialias the way Pillow does (triangle, and cubic with a = -0.5).
IN_GRAPH_FILTERS = ("bilinear", "bicubic")


def in_graph_problem(norm) -> str | None:
    """Why this eval preprocessing cannot run inside a graph exactly as `resize_crop` does it
    (then `--preprocess full` is refused), or None."""
    _, _, (_, out_h, out_w), resize, interp, mode = _norm_fields(norm)
    if interp not in IN_GRAPH_FILTERS:
        return (f"its interpolation is {interp!r}, and only {' and '.join(IN_GRAPH_FILTERS)} resize inside a graph the "
                "way Pillow does")
    if mode != "center":
        # "squash" scales the two axes differently, and then Pillow's two 8-bit passes do not
        # follow one fixed order (measured: width first for some sizes, height first for
        # others), so a graph could differ by a level on a fifth of the pixels; "border" pads
        return f"its crop mode is {mode!r}, and only 'center' (shorter side, then center crop) runs inside a graph"
    if resize < max(out_h, out_w):
        return (f"its resize_size {resize} is smaller than the crop {out_h}x{out_w} (the crop would pad), which does "
                "not run inside a graph")
    return None


def resize_recipe(norm, in_graph: bool = False) -> dict:
    """The exact eval resize and crop as data, for an artifact's metadata: what a consumer must do
    to give a "normalize" or "none" artifact the pixels it was validated on (`in_graph`: the
    "full" artifact does it itself, by this recipe). Everything here restates `resize_crop`."""
    _, _, (_, out_h, out_w), resize, interp, mode = _norm_fields(norm)
    side, rule = _SIZE_RULES[mode]
    return {
        "reference": "zoo.preprocess.resize_crop",
        "in_graph": bool(in_graph),
        "input": "decoded 8-bit RGB (EXIF orientation applied, alpha composited on white)",
        "library": "Pillow",
        "call": f"PIL.Image.Image.resize((new_w, new_h), PIL.Image.Resampling.{_PIL_FILTER_NAMES[interp]})",
        "filter": interp,
        # Pillow widens the filter's support by the scale factor when it reduces: antialiasing
        "antialias": interp != "nearest",
        **({"cubic_coefficient": -0.5} if interp == "bicubic" else {}),
        "passes": "horizontal then vertical, each rounded to uint8 (Pillow's 8-bit resampling)",
        "mode": mode,
        side: resize,
        "size_rounding": rule,
        "crop": "center",
        "crop_size": [out_h, out_w],
        "crop_rounding": "top = round((new_h - crop_h) / 2), left = round((new_w - crop_w) / 2) with Python's "
                         "round(), halves to even (margin 1 -> 0, 3 -> 2, 5 -> 2), like torchvision's CenterCrop",
        "crop_padding": "an image smaller than the crop is first padded with black to the crop size, placed at "
                        "((crop - size) // 2)",
        "not_equivalent": ("OpenCV cv2.resize with INTER_LINEAR/INTER_CUBIC, torch.nn.functional.interpolate or "
                           "torchvision tensor resize without antialias=True do not antialias when reducing; their "
                           "pixels differ from Pillow's by many levels and can change the prediction"),
    }


def center_crop(img: Image.Image, out_h: int, out_w: int) -> Image.Image:
    w, h = img.size
    if w < out_w or h < out_h:  # pad with black like torchvision's CenterCrop
        canvas = Image.new(img.mode, (max(w, out_w), max(h, out_h)))
        canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = crop_offset(h, out_h), crop_offset(w, out_w)
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
