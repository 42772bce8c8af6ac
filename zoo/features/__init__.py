"""Feature extraction and the on-disk feature cache (the features wing).

Modules: cache (FeatureCache, ReadableSet, cache_root), decode (DecodePool, draft / device JPEG
decoding), engines (ways to run the forward pass, and the choice among them), extract
(extract_into, extract, cached_features). State digests live in zoo.digest.

With the backbone fully frozen and a deterministic transform, an image's features never change, so
the trainer extracts them once and trains the head on cached tensors. The cache lives under
``$ZOO_CACHE_DIR`` (default ``~/.cache/backbone-zoo``) in ``features/<model key>/``, where the model
key hashes everything that determines a feature vector except the image:

  backbone name, weights id, a digest of the backbone's actual state dict (so random init, local
  files and plugin changes are covered too), the preprocessing (normalization record and transform:
  eval, or the augmentation parameters and seed of a view; JPEG draft decoding), the engine's
  numerics (fp32, or bf16: zoo.features.engines), a format version.

Layout (format 2). Shards are safetensors files holding one float32 matrix "features" (rows x D);
``index.jsonl`` has one line per shard: its file name, sha256 and the row names, where a row name
is ``<sha256 of the image bytes>[.v<view>]``. So a second run with another head, or on a superset
of the images, reuses what is there; any change to the key is a different directory (never a
stale hit). A lookup reads the index once, not every shard.

Streaming: rows are written to a shard every SHARD_ROWS extracted images (atomically, then the
index line is appended), so memory does not grow with the data and an interrupted run keeps what
it extracted. Reading: shards are memory-mapped and only the wanted rows copied; each shard's
sha256 is verified the first time it is read in a process, and a shard that fails (damaged,
missing) is reported once, its rows are misses (re-extracted), and a tombstone line in the index
keeps it from being reported again. The returned feature matrix of a single-process run lives in
an unlinked temporary file, memory-mapped, so training on 10^5+ images reads features from the
page cache instead of holding them all in RAM.

Determinism: extraction runs with the global RNG state saved and restored, so a head trained on a
cold run (features just extracted) is identical to one trained on a warm run (features read from
the cache), dropout included: a DataLoader draws its base seed from the global generator.

Warm path: `readable_hashes` remembers the content hashes of images that decoded successfully, so
`zoo.data.verify_images` skips decoding them; with every feature cached a warm run hashes the
files and reads the cache, and decodes nothing.

JPEG draft decoding (``jpeg_draft=True``, opt-in): a JPEG at least twice the resize target on
each side is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (keeping at least twice the target), then
resized as usual. It changes pixel values slightly compared with the reference full decode that
zoo.preprocess (and so `zoo predict`) uses, so it is part of the cache key and off by default.
"""

from ..digest import model_key, state_digest
from .cache import (
                    FEATURE_FORMAT,
                    INDEX,
                    MATRIX,
                    SHARD_ROWS,
                    CacheStats,
                    FeatureCache,
                    ReadableSet,
                    cache_root,
                    readable_hashes,
)
from .decode import (
                    DecodePool,
                    DeviceJpegDecoder,
                    DraftImageDataset,
                    JpegBytesDataset,
                    default_workers,
)
from .extract import (
                    NonFiniteFeaturesError,
                    cached_features,
                    engine_numerics,
                    extract,
                    extract_into,
                    head_predictions_agree,
)

__all__ = ["FEATURE_FORMAT", "INDEX", "MATRIX", "SHARD_ROWS", "CacheStats", "DecodePool", "DeviceJpegDecoder",
           "DraftImageDataset", "FeatureCache", "JpegBytesDataset", "NonFiniteFeaturesError", "ReadableSet",
           "cache_root", "cached_features", "default_workers", "engine_numerics", "extract", "extract_into",
           "head_predictions_agree", "model_key", "readable_hashes", "state_digest"]
