"""Datasets for training a head: sources (folder, CSV, embedded sample; the split), verification
(every file decoded once, up front) and transforms (from the backbone's Normalization record).

    sources     Samples, HeldBytes (the bytes read for a hash, kept for the extraction's decode),
                DataSplit, scan_folder, read_csv, align_labels, embedded_samples, stratified_split,
                load_data, drop_leaked
    verify      verify_images, DataWarning, decode_count / count_decode, read_count / count_read
    transforms  EvalTransform, TrainTransform, sample_seed, ImageDataset, normalize_batch,
                with_image_size
"""

from __future__ import annotations

from .sources import (HELD_BYTES_BUDGET, DataSplit, HeldBytes, Samples, align_labels, drop_leaked, embedded_samples,
                      load_data, read_csv, scan_folder, stratified_split)
from .transforms import (EvalTransform, ImageDataset, TrainTransform, normalize_batch, sample_seed,
                         with_image_size)
from .verify import DataWarning, count_decode, count_read, decode_count, read_count, verify_images

__all__ = ["HELD_BYTES_BUDGET", "DataSplit", "DataWarning", "EvalTransform", "HeldBytes", "ImageDataset", "Samples",
           "TrainTransform", "align_labels", "count_decode", "count_read", "decode_count", "drop_leaked",
           "embedded_samples", "load_data", "normalize_batch", "read_count", "read_csv", "sample_seed", "scan_folder",
           "stratified_split", "verify_images", "with_image_size"]
