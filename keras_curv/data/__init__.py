"""Datasets for the CLI, examples, tests and benchmarks, as NumPy train/test splits."""

from keras_curv.data.datasets import (
    DATASET_NAMES,
    OFFLINE_DATASETS,
    TFDS_DATASETS,
    DatasetSplits,
    DatasetUnavailableError,
    default_cache_dir,
    load_dataset,
)
from keras_curv.data.synthetic import motif_sequences, spiked_regression, split_halves

__all__ = [
    "DATASET_NAMES",
    "OFFLINE_DATASETS",
    "TFDS_DATASETS",
    "DatasetSplits",
    "DatasetUnavailableError",
    "default_cache_dir",
    "load_dataset",
    "motif_sequences",
    "spiked_regression",
    "split_halves",
]
