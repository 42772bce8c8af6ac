"""The feature cache: reused by a second run (another head), invalidated by anything that changes
features (weights, preprocessing, image content), and left alone with cache=False."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from trainhelpers import BACKBONE, make_image_folder, random_weights_file, train_kwargs
from zoo.features import FeatureCache, cache_root


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "colors", per_class=6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    return random_weights_file(d / "a.safetensors", seed=0), random_weights_file(d / "b.safetensors", seed=1)


def _run(tmp_path, data, weights, **kw):
    return zoo.train(BACKBONE, data, weights=str(weights), **train_kwargs(tmp_path, **{"epochs": 2, **kw}))


def _feature_dirs(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())


def test_second_run_with_another_head_reuses_the_cache(tmp_path, data, weights):
    first = _run(tmp_path, data, weights[0])
    assert first.cache["hits"] == 0 and first.cache["misses"] == 18
    second = _run(tmp_path, data, weights[0], head="mlp", hidden=(16,))
    assert second.cache["hits"] == 18 and second.cache["misses"] == 0
    assert len(_feature_dirs(tmp_path)) == 1


def test_cached_features_equal_fresh_ones(tmp_path, data, weights):
    a = _run(tmp_path, data, weights[0], epochs=1)
    b = _run(tmp_path, data, weights[0], epochs=1)
    c = _run(tmp_path, data, weights[0], epochs=1, cache=False)
    assert b.cache["hits"] == 18 and c.cache["hits"] == 0
    for k, v in a.model.head.state_dict().items():  # same features in, same head out
        assert torch.equal(v, b.model.head.state_dict()[k]) and torch.equal(v, c.model.head.state_dict()[k])


@pytest.mark.parametrize("change", ["weights", "image_size"])
def test_weights_or_preprocessing_change_invalidates(tmp_path, data, weights, change):
    _run(tmp_path, data, weights[0])
    kw = {"weights": weights[1]} if change == "weights" else {"weights": weights[0], "image_size": 40}
    w = kw.pop("weights")
    run = _run(tmp_path, data, w, **kw)
    assert run.cache["hits"] == 0 and run.cache["misses"] == 18
    assert len(_feature_dirs(tmp_path)) == 2


def test_changed_image_is_the_only_miss(tmp_path, data, weights):
    _run(tmp_path, data, weights[0])
    victim = sorted((data / "red").iterdir())[0]
    arr = np.asarray(Image.open(victim)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(victim)
    run = _run(tmp_path, data, weights[0])
    assert run.cache["hits"] == 17 and run.cache["misses"] == 1


def test_no_cache_writes_nothing_and_env_sets_location(tmp_path, data, weights, monkeypatch):
    kw = train_kwargs(tmp_path, epochs=1)
    kw.pop("cache_dir")
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "envcache"))
    assert cache_root() == tmp_path / "envcache"
    zoo.train(BACKBONE, data, weights=str(weights[0]), cache=False, **kw)
    assert not (tmp_path / "envcache").exists()
    zoo.train(BACKBONE, data, weights=str(weights[0]), **kw)
    assert len(list((tmp_path / "envcache" / "features").glob("*/*.safetensors"))) == 2  # train + val shards


def test_augmented_views_are_cached_and_distinct(tmp_path, data, weights):
    first = _run(tmp_path, data, weights[0], augment=True, views=2)
    assert first.cache["misses"] == 2 * 12 + 6  # two views of the 12 training images, the eval view of 6 val
    again = _run(tmp_path, data, weights[0], augment=True, views=2)
    assert again.cache["hits"] == 30
    (d,) = [p for p in (tmp_path / "cache" / "features").iterdir() if "random_resized_crop" in
            (p / "key.json").read_text()]
    key = {k: v for k, v in json.loads((d / "key.json").read_text()).items() if k != "feature_format"}
    fc = FeatureCache(tmp_path / "cache", key)
    assert fc.dir == d
    some = next(iter(fc.lookup(list(_keys(d)))))
    base = some.rsplit(".v", 1)[0]
    views = fc.lookup([f"{base}.v0", f"{base}.v1"])
    assert not torch.equal(views[f"{base}.v0"], views[f"{base}.v1"])


def _keys(d):
    for line in (d / "index.jsonl").read_text().splitlines():
        yield from json.loads(line)["names"]
