"""zoo.data: folders and CSVs, odd and broken images, the stratified split, and transforms that
match the reference preprocessing exactly."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
from PIL import Image

from trainhelpers import make_image_folder
from zoo.data import (DataWarning, EvalTransform, ImageDataset, TrainTransform, load_data, normalize_batch, read_csv,
                      scan_folder, stratified_split, with_image_size)
from zoo.errors import DataError
from zoo.preprocess import preprocess
from zoo.records import Normalization

NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, 32, 32), 36, "bicubic")


def _odd_images(d):
    """One file per awkward mode: grayscale, palette with transparency, RGBA, CMYK, 16-bit."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(d / "gray.png")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)))
    rgba.save(d / "rgba.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(d / "deep16.png")
    return ["gray.png", "palette.png", "rgba.png", "cmyk.jpg", "deep16.png"]


def _broken(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    good = d / "full.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good)
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    good.unlink()
    (d / "notes.txt").write_text("a note someone left")


def test_odd_modes_convert_to_rgb(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2, classes=("a", "b"))
    names = _odd_images(root / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # nothing may be skipped
        split = load_data(root, val_split=0.5)
    every = list(split.train.items) + list(split.val.items)
    assert all(any(str(p).endswith(n) for p in every) for n in names)
    ds = ImageDataset(split.train, EvalTransform(NORM))
    for i in range(len(split.train)):
        x, label, _ = ds[i]
        assert x.shape == (32, 32, 3) and x.dtype.is_floating_point is False


def test_corrupt_truncated_and_non_images_are_skipped_and_listed(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4, classes=("a", "b"))
    _broken(root / "b")
    with pytest.warns(DataWarning) as rec:
        split = load_data(root, val_split=0.25)
    msg = str(rec[0].message)
    for name in ("garbage.jpg", "truncated.png", "notes.txt"):
        assert name in msg
    assert "skipped 3" in msg
    kept = [str(p).rsplit("/", 1)[-1] for p in list(split.train.items) + list(split.val.items)]
    assert len(kept) == 8 and not any("garbage" in p or "truncated" in p for p in kept)
    assert [s[0].rsplit("/", 1)[-1] for s in split.skipped] == ["notes.txt", "garbage.jpg", "truncated.png"]


def test_strict_refuses_up_front(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4, classes=("a", "b"))
    _broken(root / "a")
    with pytest.raises(DataError, match=r"--strict: 3 unusable files(.|\n)*garbage\.jpg(.|\n)*drop --strict"):
        load_data(root, strict=True)


def test_empty_class_single_class_and_missing_folder_are_clear_errors(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2, classes=("a", "b"))
    (root / "empty_one").mkdir()
    with pytest.raises(DataError, match="'empty_one'.*hold no images"):
        scan_folder(root)
    one = make_image_folder(tmp_path / "one", per_class=3, classes=("only",))
    with pytest.raises(DataError, match="single class.*at least two"):
        scan_folder(one)
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(DataError, match="no class subfolders.*loose files"):
        scan_folder(flat)
    # a class whose only files are unreadable is empty too, and said so
    broken = make_image_folder(tmp_path / "broken", per_class=2, classes=("a",))
    (broken / "b").mkdir()
    (broken / "b" / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"\['b'\] have no readable images"):
        load_data(broken)


def test_csv_with_header_relative_paths_and_missing_files(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3, classes=("a", "b"))
    rows = ["path,label"] + [f"{c}/{c}_{i:03d}.png,{c}" for c in "ab" for i in range(3)] + ["a/missing.png,a"]
    csv_file = root / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    samples, skipped = read_csv(csv_file)
    assert samples.classes == ("a", "b") and len(samples) == 6
    assert skipped == [(str(root / "a/missing.png"), "file not found")]
    with pytest.warns(DataWarning, match="missing.png"):
        split = load_data(csv_file=csv_file, val_split=0.34)
    assert len(split.train) + len(split.val) == 6
    one = tmp_path / "one.csv"
    one.write_text("a/a_000.png,a\n")
    with pytest.raises(DataError, match="single class"):
        read_csv(one, root=root)


def test_stratified_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == len(labels)
    assert np.bincount(labels[va]).tolist() == [2, 4, 1]
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(labels, 0.2, seed=4)[1])
    with pytest.raises(DataError, match="between 0 and 1"):
        stratified_split(labels, 1.5)


def test_eval_transform_matches_reference_preprocessing(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    ours = normalize_batch(torch.from_numpy(EvalTransform(NORM)(img).copy())[None], NORM)
    ref = preprocess(img, NORM)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert np.array_equal(ours.numpy(), ref)  # bit-identical: same pixels, same arithmetic
    cl = normalize_batch(torch.from_numpy(EvalTransform(NORM)(img).copy())[None], NORM, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ours)


def test_train_transform_is_seeded_and_sized():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    tf = TrainTransform(NORM)
    a, b = tf(img, random.Random(7)), tf(img, random.Random(7))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert any(not np.array_equal(a, tf(img, random.Random(s))) for s in range(8, 12))
    no_aug = TrainTransform(NORM, scale=(1.0, 1.0), ratio=(80 / 60, 80 / 60), hflip=False)(img, random.Random(0))
    assert np.array_equal(no_aug, np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)))


def test_with_image_size_keeps_crop_ratio():
    big = Normalization((0.5,) * 3, (0.5,) * 3, (3, 224, 224), 256)
    small = with_image_size(big, 64)
    assert small.input_size == (3, 64, 64) and small.resize_size == 73
    assert with_image_size(big, None) is big


def test_embedded_default_split():
    split = load_data()
    assert len(split.train) == 400 and len(split.val) == 200 and len(split.classes) == 10
    assert np.array_equal(split.train.class_counts(), [40] * 10)
