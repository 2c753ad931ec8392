"""Tests for keras_curv.data: offline datasets, the tfds conversion and its failure mode."""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import pytest

from keras_curv.data import (
    DATASET_NAMES,
    DatasetUnavailableError,
    datasets,
    load_dataset,
)


def _row_multiset(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (flattened per sample) sorted lexicographically: an order-free fingerprint."""
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_labels():
    data = load_dataset("digits")
    assert data.name == "digits"
    assert data.input_shape == (8, 8, 1)
    assert data.num_classes == 10
    assert data.num_train + data.num_test == 1797
    assert data.x_train.shape == (data.num_train, 8, 8, 1)
    assert data.x_test.shape == (data.num_test, 8, 8, 1)
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int32 and data.y_test.dtype == np.int32
    for x in (data.x_train, data.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(data.y_train)) == set(range(10))
    assert set(np.unique(data.y_test)) == set(range(10))


def test_digits_is_a_partition_of_the_sklearn_set():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = load_dataset("digits", seed=3)
    expected = np.concatenate([bunch.images.reshape(1797, -1) / 16.0, bunch.target[:, None]], 1)
    got = np.concatenate(
        [
            np.concatenate([data.x_train, data.x_test]).reshape(1797, -1),
            np.concatenate([data.y_train, data.y_test])[:, None],
        ],
        1,
    )
    np.testing.assert_allclose(_row_multiset(got), _row_multiset(expected), rtol=0, atol=1e-7)


@pytest.mark.parametrize("test_fraction", [0.2, 0.5])
def test_digits_split_is_stratified(test_fraction):
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    data = load_dataset("digits", test_fraction=test_fraction)
    np.testing.assert_array_equal(
        np.bincount(data.y_test, minlength=10), np.round(test_fraction * per_class).astype(int)
    )
    np.testing.assert_array_equal(
        np.bincount(data.y_train, minlength=10),
        per_class - np.round(test_fraction * per_class).astype(int),
    )


def test_digits_split_is_deterministic_in_the_seed():
    a, b = load_dataset("digits", seed=7), load_dataset("digits", seed=7)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c = load_dataset("digits", seed=8)
    assert not np.array_equal(_row_multiset(a.x_test), _row_multiset(c.x_test))


def test_subsampling_is_stratified_deterministic_and_a_subset():
    full = load_dataset("digits", seed=1)
    small = load_dataset("digits", seed=1, max_train=100, max_test=30)
    assert small.num_train == 100 and small.num_test == 30
    # Classes hold 174..183 training samples: 100 drawn proportionally give 9 or 10 each.
    counts = np.bincount(small.y_train, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11 and counts.sum() == 100
    np.testing.assert_array_equal(np.bincount(small.y_test, minlength=10), np.full(10, 3))
    # Every kept sample is one of the full split's samples, with its own label.
    full_rows = full.x_train.reshape(full.num_train, -1)
    rows = {r.tobytes(): int(y) for r, y in zip(full_rows, full.y_train, strict=True)}
    for r, y in zip(small.x_train.reshape(100, -1), small.y_train, strict=True):
        assert rows[r.tobytes()] == y
    again = load_dataset("digits", seed=1, max_train=100, max_test=30)
    np.testing.assert_array_equal(small.x_train, again.x_train)
    # A limit above the size keeps everything.
    assert load_dataset("digits", max_train=10**6).num_train == full.num_train


# ---------------------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_standardisation_and_determinism(tmp_path):
    a = load_dataset("mnist1d", data_dir=tmp_path / "a", seed=5, mnist1d_samples=300)
    assert a.input_shape == (40, 1) and a.num_classes == 10
    assert a.num_train == 240 and a.num_test == 60
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(a.y_test, minlength=10), np.full(10, 6))
    everything = np.concatenate([a.x_train, a.x_test])
    assert abs(float(everything.mean())) < 1e-5
    assert abs(float(everything.std()) - 1.0) < 1e-4
    # A fresh cache directory regenerates the very same arrays.
    b = load_dataset("mnist1d", data_dir=tmp_path / "b", seed=5, mnist1d_samples=300)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c = load_dataset("mnist1d", data_dir=tmp_path / "a", seed=6, mnist1d_samples=300)
    assert not np.allclose(_row_multiset(a.x_train), _row_multiset(c.x_train))


def test_mnist1d_reuses_its_cache(tmp_path, monkeypatch):
    first = load_dataset("mnist1d", data_dir=tmp_path, seed=2, mnist1d_samples=200)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached arrays should have been reused")

    monkeypatch.setattr(datasets, "_generate_mnist1d", no_generation)
    second = load_dataset("mnist1d", data_dir=tmp_path, seed=2, mnist1d_samples=200)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_train, second.y_train)
    # Another seed is a cache miss, which must generate.
    with pytest.raises(AssertionError, match="cached arrays"):
        load_dataset("mnist1d", data_dir=tmp_path, seed=3, mnist1d_samples=200)


def test_mnist1d_regenerates_over_a_corrupt_cache(tmp_path):
    first = load_dataset("mnist1d", data_dir=tmp_path, seed=4, mnist1d_samples=100)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz file")
    second = load_dataset("mnist1d", data_dir=tmp_path, seed=4, mnist1d_samples=100)
    np.testing.assert_array_equal(first.x_train, second.x_train)


def test_mnist1d_leaves_global_random_state_alone(tmp_path):
    # The generator reseeds the legacy global RNGs; the loader must hide that.
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    load_dataset("mnist1d", data_dir=tmp_path, seed=9, mnist1d_samples=100)
    assert np.random.random() == expected_np  # noqa: NPY002
    assert random.random() == expected_py


# ------------------------------------------------------------------- tensorflow-datasets


@pytest.mark.parametrize(
    "name, shape, classes",
    [("mnist", (28, 28, 1), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_tfds_conversion_on_mock_data(tmp_path, name, shape, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = load_dataset(name, data_dir=tmp_path, download=False)
        raw_train = tfds.load(name, split="train", data_dir=tmp_path, as_supervised=True)
        raw_x, raw_y = zip(*tfds.as_numpy(raw_train), strict=True)
    assert data.name == name and data.num_classes == classes and data.input_shape == shape
    assert data.x_train.shape == (12, *shape) and data.x_test.shape == (12, *shape)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert 0 <= data.y_train.min() and data.y_train.max() < classes
    # The conversion is exactly uint8 / 255, in the dataset's order.
    np.testing.assert_array_equal(data.x_train, np.stack(raw_x).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(data.y_train, np.asarray(raw_y))


def test_tfds_missing_data_fails_fast_with_one_sentence(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    assert time.perf_counter() - start < 15.0
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0
    assert "'fashion_mnist'" in message and str(tmp_path) in message
    assert "'digits'" in message and "'mnist1d'" in message
    assert info.value.__cause__ is not None
    assert isinstance(info.value, RuntimeError)


def test_tfds_not_installed_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DatasetUnavailableError, match="tensorflow-datasets.*'digits'"):
        load_dataset("cifar10", download=False)


# ------------------------------------------------------------------------- bad input


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="`name` must be one of .*received name='imagenet'"
    ) as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"max_train": 0}, "max_train"),
        ({"max_test": -3}, "max_test"),
        ({"max_train": 2.5}, "max_train"),
        ({"max_train": True}, "max_train"),
        ({"mnist1d_samples": 5}, "mnist1d_samples"),
        ({"mnist1d_samples": 200.0}, "`mnist1d_samples` must be an int >= 20"),
        ({"test_fraction": float("nan")}, "test_fraction"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits", **kwargs)
