"""The feature cache at scale: shards stream to disk as features are extracted (an interrupted run
keeps them), lookups read the index instead of every shard, a damaged shard is a reported miss
(once), a warm run decodes no image, and a head trained cold equals one trained warm."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoo
import zoo.features as F
import zoo.features.cache as FC
from test_engines import NORM, tiny_backbone, tiny_samples
from trainhelpers import BACKBONE, make_image_folder, random_weights_file, train_kwargs
from zoo.data import EvalTransform, decode_count
from zoo.errors import DataError


def _run(tmp_path, samples=None, backbone=None, **kw):
    return F.cached_features(backbone or tiny_backbone(), samples or tiny_samples(), EvalTransform(NORM), NORM,
                             key_fields={"backbone": "tiny"}, device=torch.device("cpu"),
                             cache_dir=tmp_path / "cache", batch_size=4, num_workers=0, engine="eager", **kw)


def _dir(tmp_path):
    (d,) = (tmp_path / "cache" / "features").iterdir()
    return d


def test_shards_stream_and_an_interrupted_run_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setattr(FC, "SHARD_ROWS", 8)
    real = F.FeatureCache.write_shard
    written = []

    def write_then_maybe_die(self, names, matrix):
        real(self, names, matrix)
        written.append(len(names))
        if len(written) == 2:
            raise KeyboardInterrupt  # killed mid-extraction, after two shards reached the disk

    monkeypatch.setattr(F.FeatureCache, "write_shard", write_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    monkeypatch.setattr(F.FeatureCache, "write_shard", real)
    feats, stats = _run(tmp_path)
    assert written == [8, 8] and (stats.hits, stats.misses) == (16, 4)
    fresh, _ = _run(tmp_path / "other", cache=False)
    assert torch.equal(feats, fresh)
    assert len(list(_dir(tmp_path).glob("*.safetensors"))) == 3 and len(
        (_dir(tmp_path) / "index.jsonl").read_text().splitlines()) == 3


def test_lookup_reads_the_index_and_only_the_shards_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(FC, "SHARD_ROWS", 4)
    _run(tmp_path)  # 20 images -> 5 shards
    opened = []
    real = FC._mmap_matrix
    monkeypatch.setattr(FC, "_mmap_matrix", lambda p: (opened.append(p.name), real(p))[1])
    samples = tiny_samples()
    fc = F.FeatureCache(tmp_path / "cache", {"backbone": "tiny", "transform": None} | {})
    fc.dir = _dir(tmp_path)
    got = fc.lookup([samples.content_hash(0), samples.content_hash(1)])  # both in the first shard
    assert len(got) == 2 and len(set(opened)) == 1


def test_a_damaged_shard_is_a_miss_reported_once(tmp_path, monkeypatch):
    monkeypatch.setattr(FC, "SHARD_ROWS", 8)
    first, _ = _run(tmp_path)
    victim = sorted(_dir(tmp_path).glob("*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the data: same size, valid header, wrong numbers
    victim.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=f"{victim.name}.*checksum mismatch") as rec:
        again, stats = _run(tmp_path)
    assert len([w for w in rec if "unusable" in str(w.message)]) == 1
    assert stats.misses == 8 and stats.hits == 12 and torch.equal(first, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tombstone: not reported again
        third, stats = _run(tmp_path)
    assert stats.misses == 0 and torch.equal(first, third)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_weights_file(tmp_path_factory.mktemp("w") / "a.safetensors", seed=0)


def test_a_warm_run_decodes_no_image(tmp_path, weights):
    data = make_image_folder(tmp_path / "colors", per_class=6)
    kw = train_kwargs(tmp_path, epochs=1)
    before = decode_count()
    cold = zoo.train(BACKBONE, data, weights=str(weights), **kw)
    cold_decodes = decode_count() - before
    before = decode_count()
    warm = zoo.train(BACKBONE, data, weights=str(weights), head="mlp", hidden=(8,), **kw)
    assert cold.cache["misses"] == 18 and cold_decodes >= 18  # verified, then decoded for extraction
    assert warm.cache["hits"] == 18 and warm.cache["misses"] == 0
    assert decode_count() - before == 0
    kw_nc = dict(kw, cache=False)
    before = decode_count()
    zoo.train(BACKBONE, data, weights=str(weights), **kw_nc)
    assert decode_count() - before >= 18  # without the cache everything is verified again


def test_cold_and_warm_heads_are_identical_with_dropout(tmp_path, weights):
    data = make_image_folder(tmp_path / "colors", per_class=6)
    kw = train_kwargs(tmp_path, epochs=3, head="mlp", hidden=(16,), dropout=0.5)
    cold = zoo.train(BACKBONE, data, weights=str(weights), **kw)
    warm = zoo.train(BACKBONE, data, weights=str(weights), **kw)
    assert cold.cache["misses"] == 18 and warm.cache["hits"] == 18
    for k, v in cold.model.head.state_dict().items():
        assert torch.equal(v, warm.model.head.state_dict()[k]), k
    assert [h["train_loss"] for h in cold.history] == [h["train_loss"] for h in warm.history]


def _jpeg_folder(root, n=6, size=(70, 50)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = (rng.random((size[1], size[0], 3)) * 60 + (180 if c == "a" else 40)).astype("uint8")
            Image.fromarray(arr).save(root / c / f"{i}.jpg", quality=92)
    Image.fromarray(np.full((40, 40, 3), 128, "uint8")).save(root / "a" / "png.png")  # not a JPEG: CPU path
    return root


@pytest.mark.parametrize("mode", ["gpu", "draft"])
def test_alternative_decoders_are_close_to_the_reference_and_cached_apart(tmp_path, monkeypatch, mode):
    from zoo.data import scan_folder
    from zoo.features.engines import row_cosine

    samples, _ = scan_folder(_jpeg_folder(tmp_path / "jpegs", size=(200, 160)))
    norm = type(NORM)(NORM.mean, NORM.std, (3, 24, 24), 28)
    common = dict(key_fields={"backbone": "tiny"}, device=torch.device("cpu"), cache_dir=tmp_path / "cache",
                  batch_size=4, num_workers=0, engine="eager")
    ref, _ = F.cached_features(tiny_backbone(), samples, EvalTransform(norm), norm, **common)
    if mode == "gpu":  # torchvision's batched decoder, on the CPU here (the same code path as on CUDA)
        import torchvision.io

        real = torchvision.io.decode_jpeg
        calls = []

        def flaky(data, **kw):  # the batch call fails once: per-image retry, then the CPU fallback
            calls.append(len(data) if isinstance(data, list) else 1)
            if len(calls) == 1 or not isinstance(data, list) and len(calls) == 2:
                raise RuntimeError("decoder refused")
            return real(data, **kw)

        monkeypatch.setattr(torchvision.io, "decode_jpeg", flaky)
        alt, stats = F.cached_features(tiny_backbone(), samples, EvalTransform(norm), norm, gpu_decode="any", **common)
    else:
        alt, stats = F.cached_features(tiny_backbone(), samples, EvalTransform(norm), norm, jpeg_draft=True, **common)
    assert stats.misses == len(samples)  # another decode is another cache entry, never the reference's
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2
    assert float(row_cosine(ref[0], alt[0]).min()) >= 0.99
    assert not torch.equal(ref, alt)


def test_decoding_workers_start_once_per_run_and_not_at_all_when_warm(tmp_path, weights, monkeypatch):
    import multiprocessing.process

    started = []
    real_start = multiprocessing.process.BaseProcess.start

    def counting_start(self):
        started.append(self.name)
        return real_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counting_start)
    data = make_image_folder(tmp_path / "colors", per_class=6)
    # 12 train and 6 val images in batches of 64: the train pass, the val pass, then a second train
    # view pass (views=2 with augmentation): three passes, one pool of 2 workers.
    kw = train_kwargs(tmp_path, epochs=1, num_workers=2, augment=True, views=2)
    cold = zoo.train(BACKBONE, data, weights=str(weights), **kw)
    assert cold.cache["misses"] == 2 * 12 + 6
    assert len(started) == 2, started
    started.clear()
    warm = zoo.train(BACKBONE, data, weights=str(weights), **kw)
    assert warm.cache["misses"] == 0 and started == []
    for a, b in zip(cold.model.head.state_dict().values(), warm.model.head.state_dict().values()):
        assert torch.equal(a, b)  # the same features whether extracted by the pool or read back


def test_the_cache_key_follows_an_in_place_weight_change(tmp_path):
    backbone = tiny_backbone()
    key_a = F.state_digest(backbone)
    assert F.state_digest(backbone) == key_a  # asked again (the run asks several times): the same
    with torch.no_grad():
        backbone[0].weight[0, 0, 0, 0] += 1.0  # written in place, same tensor, same address
    key_b = F.state_digest(backbone)
    backbone[1].running_mean.add_(0.5)  # a buffer too
    key_c = F.state_digest(backbone)
    assert len({key_a, key_b, key_c}) == 3
    fresh = tiny_backbone()
    fresh.load_state_dict(backbone.state_dict())
    assert F.state_digest(fresh) == key_c  # the digest is of the contents, not of the object


class _NanFor(torch.nn.Module):
    """A backbone that gives NaN features for all-white images (a stand-in for weights that
    overflow on some inputs)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_backbone()

    def forward(self, x):
        f = self.inner(x)
        white = (x.flatten(1).amin(1) >= x.max() - 1e-6)
        return torch.where(white[:, None], torch.full_like(f, float("nan")), f)


@pytest.mark.parametrize("bad", [1, 6])  # in the first batch's reference rows, in a later batch
def test_non_finite_features_are_an_error_naming_the_file_not_a_cache_entry(tmp_path, bad):
    import numpy as np

    samples = tiny_samples(8)
    samples.items[bad] = np.full((24, 24, 3), 255, np.uint8)
    with pytest.raises(F.NonFiniteFeaturesError, match=rf"backbone tiny \(engine eager\).*1 image\(s\): <array #{bad}>"):
        _run(tmp_path, samples=samples, backbone=_NanFor())
    fc = F.FeatureCache(tmp_path / "cache", {"backbone": "tiny"})
    for d in (tmp_path / "cache" / "features").glob("*"):
        fc.dir = d
        assert fc.locate([samples.content_hash(bad)]) == [None]


def test_a_lower_max_image_pixels_applies_to_images_the_warm_path_trusts(tmp_path, weights):
    data = make_image_folder(tmp_path / "colors", per_class=6)  # 40x40 = 1600 pixels each
    kw = train_kwargs(tmp_path, epochs=1)
    zoo.train(BACKBONE, data, weights=str(weights), **kw)  # every image decoded once, and remembered
    # a lower limit: the remembered images are checked again (their header) and refused, not trusted
    with pytest.raises(DataError, match="no readable images left(.|\n)*1600 pixels, over the limit of 1000"):
        zoo.train(BACKBONE, data, weights=str(weights), max_image_pixels=1000, **kw)
    before = decode_count()
    warm = zoo.train(BACKBONE, data, weights=str(weights), max_image_pixels=1600, **kw)  # within it: trusted
    assert warm.cache["misses"] == 0 and decode_count() == before
