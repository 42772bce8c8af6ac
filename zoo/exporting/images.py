"""The images an export validates and calibrates on, taken from the run: a spread of its own
validation split (labelled, so the report has accuracy) and of its training sample (for static
quantization), with the fallbacks said out loud."""

from __future__ import annotations

import dataclasses
import os

RUN_VALIDATION_IMAGES = 64  # enough to see accuracy move, few enough to export in seconds
CALIBRATION_IMAGES = 128


def _spread(n: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(n) (every class of a sorted split gets some)."""
    return list(range(n)) if n <= limit else [int(i * n / limit) for i in range(limit)]


def _pixels(samples, indices, norm, raw: list | None = None):
    """Reference-preprocessed uint8 NHWC pixels of `samples` at `indices`; with a `raw` list, the
    decoded images at their own sizes are appended to it too (decoded once)."""
    import numpy as np

    from ..preprocess import resize_crop, to_uint8_hwc

    out = []
    for i in indices:
        img = samples.load(i)
        if raw is not None:
            raw.append(to_uint8_hwc(img))
        out.append(to_uint8_hwc(resize_crop(img, norm)))
    return np.stack(out)


def _validation_images(images, model, run_dir, say, raw: bool = False):
    """The images every artifact is checked on: those given; else the run's own validation split
    (labelled, so the report has accuracy); else scikit-image's photos. A run whose split cannot
    be read is said, never passed over quietly. raw=True keeps them at their own sizes too
    (`ValidationImages.raw`, for --preprocess full)."""
    from ..errors import DataError
    from ..runs import RunDirError, recorded_validation
    from ..validation import ValidationImages, load_validation_images

    norm, labels = model.meta.normalization, model.meta.labels
    if images is not None or run_dir is None:
        return load_validation_images(images, norm, labels, raw=raw)
    decoded: list | None = [] if raw else None
    try:
        samples, described = recorded_validation(run_dir, labels)
        picked = _spread(len(samples), RUN_VALIDATION_IMAGES)
        if not picked:
            raise RunDirError("its validation split is empty")
        pixels = _pixels(samples, picked, norm, decoded)
    except (RunDirError, DataError, OSError) as exc:
        fallback = load_validation_images(None, norm, labels, raw=raw)
        reason = str(exc).split(";")[0]
        say(f"validation images: the run's own split is not usable ({reason}); using {fallback.source}")
        return dataclasses.replace(fallback, source=f"{fallback.source} (the run's validation split is not usable: {reason})")
    return ValidationImages(pixels, [samples.describe(i) for i in picked],
                            f"{len(picked)} of {len(samples)} images of {described}",
                            [int(samples.labels[i]) for i in picked], decoded)


def _calibration_images(model, run_dir, vimages, say):
    """(uint8 NHWC pixels, source) for static quantization: a spread of the run's training images
    (the training sample it recorded in validation.json; for older runs its data folder, less the
    validation files; the embedded sample's training half), else the validation images. Only
    pixels are used, never labels."""
    from ..data import embedded_samples
    from ..errors import DataError
    from ..preprocess import ImageDecodeError
    from ..runs import RunDirError, read_config, recorded_calibration, recorded_validation

    norm = model.meta.normalization
    if run_dir is not None:
        try:  # the training sample the run recorded (works for --csv runs and moved data folders too)
            samples, described = recorded_calibration(run_dir, model.meta.labels)
            picked = _spread(len(samples), CALIBRATION_IMAGES)
            return _pixels(samples, picked, norm), f"{len(picked)} of {described} ({len(samples)} recorded)"
        except RunDirError:
            pass  # recorded by an older zoo, or not at all: the data folder below
        except (DataError, ImageDecodeError, OSError) as exc:  # files moved or damaged since training
            say(f"calibration images: the run's recorded training sample is not usable ({str(exc).split(';')[0]})")
        try:
            cfg = read_config(run_dir)
        except Exception:  # noqa: BLE001 - an older run without config.json: calibrate on validation images
            cfg = {}
        data = cfg.get("data")
        if data and os.path.isdir(data):
            from ..data import Samples
            from ..preprocess import list_images

            try:  # every validation file the run recorded, not just the ones sampled for validation here
                held_out = {os.path.abspath(p) for p in recorded_validation(run_dir, model.meta.labels)[0].items
                            if isinstance(p, (str, os.PathLike))}
            except RunDirError:
                held_out = set()
            held_out |= {os.path.abspath(p) for p in vimages.names if os.path.exists(p)}
            files = [p for p in list_images(data) if os.path.abspath(p) not in held_out]
            if files:
                samples = Samples(files, [0] * len(files), ("?",))
                picked = _spread(len(files), CALIBRATION_IMAGES)
                return _pixels(samples, picked, norm), f"{len(picked)} training images from {data}"
        elif not data and not cfg.get("csv") and cfg:
            train = embedded_samples()[0]
            picked = _spread(len(train), CALIBRATION_IMAGES)
            return _pixels(train, picked, norm), f"{len(picked)} images of the embedded sample's training half"
    return vimages.pixels, f"the {len(vimages.pixels)} validation images ({vimages.source})"
