"""What a run reads and decodes, and what it does when files change under it.

A cold run reads each image's bytes once: for its content hash, and the extraction decodes those
same bytes (the decode is the verification); a warm run reads each file to hash it and decodes
nothing. A file deleted, rewritten or damaged before the run read it, or (its bytes over the held
budget, so read again) after, is skipped with its reason (listed in the run's record), never a
worker traceback, and the split is the one an up-front check would have given. A damaged cache
index is rebuilt from its intact lines, or refused naming the file and --no-cache."""

from __future__ import annotations

import builtins
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from trainhelpers import BACKBONE, make_image_folder, random_weights_file, train_kwargs

import zoo
import zoo.data.sources
from zoo.data import decode_count, read_count
from zoo.errors import ZooError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_weights_file(tmp_path_factory.mktemp("w") / "a.safetensors", seed=0)


def _jpegs(root, per_class=6, size=48):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            arr[:, :, 0 if c == "a" else 2] = 230
            Image.fromarray(arr).save(root / c / f"{c}{i}.jpg", quality=90)
    return root


def _train(tmp_path, data, weights, quiet=True, **kw):
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return zoo.train(BACKBONE, data, weights=str(weights), **train_kwargs(tmp_path, **{"epochs": 1, **kw}))


def _count_opens(monkeypatch, root):
    """Opens of the image files under root, by path (the reads a run makes of each image)."""
    opened: dict[str, int] = {}
    real = builtins.open

    def counting(file, *a, **kw):
        p = os.fspath(file) if isinstance(file, (str, os.PathLike)) else None
        if p is not None and p.startswith(str(root)):
            opened[p] = opened.get(p, 0) + 1
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting)
    return opened


@pytest.mark.parametrize("workers", [0, 1])
def test_cold_run_reads_and_decodes_each_image_once_warm_run_reads_once_decodes_none(tmp_path, weights,
                                                                                      monkeypatch, workers):
    data = _jpegs(tmp_path / "d")
    n = 12
    opened = _count_opens(monkeypatch, data)  # this process's opens (a worker's are its own)
    reads, decodes = read_count(), decode_count()
    cold = _train(tmp_path, data, weights, num_workers=workers)
    assert cold.cache["misses"] == n and cold.cache["read_again"] == 0
    # one read per image: for the content hash; the extraction decodes those bytes (one decode,
    # which is the verification) and never opens the file again
    assert sorted(opened.values()) == [1] * n, opened
    if workers == 0:  # in-process: the counters see the extraction's reads and decodes too
        assert read_count() - reads == n and decode_count() - decodes == n
    opened.clear()
    reads, decodes = read_count(), decode_count()
    warm = _train(tmp_path, data, weights, num_workers=workers)
    assert warm.cache["hits"] == n and decode_count() == decodes  # warm: hashes only
    assert sorted(opened.values()) == [1] * n and read_count() - reads == n
    for k, v in cold.model.head.state_dict().items():  # the same head, cold or warm
        assert torch.equal(v, warm.model.head.state_dict()[k])


def test_the_read_counts_see_a_second_read(tmp_path, weights, monkeypatch):
    """Negative control: with no room to hold bytes the extraction reads every file again (checked
    against its hash), and the counters and the run's record say so."""
    monkeypatch.setattr(zoo.data.sources, "HELD_BYTES_BUDGET", 0)
    data = _jpegs(tmp_path / "d")
    n = 12
    opened = _count_opens(monkeypatch, data)
    reads, decodes = read_count(), decode_count()
    cold = _train(tmp_path, data, weights)
    assert cold.cache["misses"] == n and cold.cache["read_again"] == n
    assert sorted(opened.values()) == [2] * n and read_count() - reads == 2 * n
    assert decode_count() - decodes == n


def test_strict_still_refuses_a_damaged_file_up_front(tmp_path, weights):
    data = _jpegs(tmp_path / "d")
    (data / "a" / "a0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ZooError, match=r"(?s)--strict: 1 unusable.*a0\.jpg"):
        _train(tmp_path, data, weights, strict=True)
    assert not (tmp_path / "cache" / "features").exists()  # refused before any extraction


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_file_is_skipped_by_the_extraction_with_the_split_of_an_up_front_check(tmp_path, weights,
                                                                                         workers):
    data = _jpegs(tmp_path / "d")
    (data / "b" / "b3.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cold = _train(tmp_path, data, weights, num_workers=workers, out=str(tmp_path / "run"))
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["skipped"]
    assert [os.path.basename(f) for f, _ in skipped] == ["b3.jpg"]
    up_front = _train(tmp_path, data, weights, cache=False)  # decodes up front, as without the cache
    assert cold.cache["hits"] + cold.cache["misses"] == up_front.cache["misses"] == 11
    for k, v in cold.model.head.state_dict().items():
        assert torch.allclose(v, up_front.model.head.state_dict()[k], atol=1e-5)


@pytest.mark.parametrize("change", ["deleted", "rewritten"])
def test_a_file_that_changes_after_it_was_read_is_skipped_and_named_when_read_again(tmp_path, weights, monkeypatch,
                                                                                     change):
    """Bytes over the held budget are read again by the extraction, checked against the hash."""
    from zoo.training import trainer as T

    monkeypatch.setattr(zoo.data.sources, "HELD_BYTES_BUDGET", 0)
    data = _jpegs(tmp_path / "d")
    victim = data / "a" / "a2.jpg"
    real = T._Trainer._build_model

    def build_then_change(self, *args):
        built = real(self, *args)  # the files are listed and hashed by now
        if change == "deleted":
            victim.unlink()
        else:
            Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(victim, quality=90)
        return built

    monkeypatch.setattr(T._Trainer, "_build_model", build_then_change)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = zoo.train(BACKBONE, data, weights=str(weights),
                        **train_kwargs(tmp_path, epochs=1, num_workers=1, out=str(tmp_path / "run")))
    why = "deleted after the run listed it" if change == "deleted" else "changed on disk after the run listed it"
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["skipped"]
    assert [(os.path.basename(f), why in r) for f, r in skipped] == [("a2.jpg", True)]
    assert any("a2.jpg" in str(w.message) and why in str(w.message) for w in caught)
    assert run.cache["hits"] + run.cache["misses"] == 11


def test_jpeg_draft_on_a_damaged_jpeg_skips_it(tmp_path, weights):
    data = _jpegs(tmp_path / "d", size=160)  # large enough for draft decoding at 32 px
    (data / "a" / "a1.jpg").write_bytes((data / "a" / "a0.jpg").read_bytes()[:300])  # truncated JPEG
    run = _train(tmp_path, data, weights, jpeg_draft=True, out=str(tmp_path / "run"))
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["skipped"]
    assert [os.path.basename(f) for f, _ in skipped] == ["a1.jpg"]
    assert run.cache["hits"] + run.cache["misses"] == 11


def _index(tmp_path):
    (index,) = (tmp_path / "cache" / "features").glob("*/index.jsonl")
    return index


def test_a_damaged_index_is_rebuilt_from_its_intact_lines(tmp_path, weights):
    data = make_image_folder(tmp_path / "d", per_class=4)
    first = _train(tmp_path, data, weights)
    index = _index(tmp_path)
    good = index.read_bytes()
    index.write_bytes(b"\xff\xfe garbage \x80\n" + good)  # non-UTF-8 bytes before the intact line
    with pytest.warns(UserWarning, match=rf"(?s)feature cache index {index}.*1 damaged line.*rebuilt"):
        again = _train(tmp_path, data, weights, quiet=False)
    assert again.cache["hits"] == first.cache["misses"]  # the intact line still serves every row
    assert index.read_bytes() == good  # rewritten without the damage
    index.write_bytes(b"\x80\x81 a line that lost its rows\n")
    with pytest.warns(UserWarning, match="rebuilt"):
        third = _train(tmp_path, data, weights, quiet=False)
    assert third.cache["misses"] == first.cache["misses"]  # re-extracted, not wrong


def test_a_damaged_index_that_cannot_be_rebuilt_is_refused_naming_it(tmp_path, weights, monkeypatch):
    import contextlib

    import zoo.io

    data = make_image_folder(tmp_path / "d", per_class=4)
    _train(tmp_path, data, weights)
    index = _index(tmp_path)
    index.write_bytes(b"\xff\xfe\n" + index.read_bytes())

    @contextlib.contextmanager
    def read_only(path):  # what a read-only cache folder does (tests may run as root, who can write anyway)
        raise PermissionError(13, "Permission denied", str(path))
        yield

    monkeypatch.setattr(zoo.io, "atomic_path", read_only)
    with pytest.raises(ZooError, match=rf"(?s){index}.*damaged.*--no-cache"):
        _train(tmp_path, data, weights)


def test_a_file_that_changes_after_it_was_read_is_decoded_as_read(tmp_path, weights, monkeypatch):
    """Held bytes: the run decodes the bytes it hashed (the cache row's name is their hash), so a
    later change to the file cannot make the features disagree with their key; the next run sees
    the new content as a new image."""
    from zoo.training import trainer as T

    data = _jpegs(tmp_path / "d")
    victim = data / "a" / "a2.jpg"
    real = T._Trainer._build_model

    def build_then_change(self, *args):
        built = real(self, *args)  # the files are listed, read and hashed by now
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(victim, quality=90)
        return built

    monkeypatch.setattr(T._Trainer, "_build_model", build_then_change)
    cold = _train(tmp_path, data, weights, num_workers=1, out=str(tmp_path / "run"))
    assert cold.cache["misses"] == 12 and not json.loads((tmp_path / "run" / "metrics.json").read_text())["final"][
        "skipped"]
    monkeypatch.setattr(T._Trainer, "_build_model", real)
    again = _train(tmp_path, data, weights)
    assert (again.cache["hits"], again.cache["misses"]) == (11, 1)  # the rewritten file is new content


def test_held_bytes_keep_within_their_budget_and_never_travel_pickled():
    import pickle

    from zoo.data import HeldBytes

    held = HeldBytes(budget=10)
    held.keep("a", b"123456")
    held.keep("b", b"123456")  # over the budget: not kept (the extraction reads that file again)
    assert (len(held), held.used, held.over_budget) == (1, 6, 1)
    assert held.get("a") == b"123456" and held.get("b") is None
    assert held.get("a", take=True) == b"123456" and (len(held), held.used) == (0, 0)
    held.keep("c", b"xyz")
    assert len(pickle.loads(pickle.dumps(held))) == 0  # a spawned worker never gets a copy
