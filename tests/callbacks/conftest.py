"""Shared pieces of the callback tests: tiny float64 classifiers and an event-file reader."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.curvature.helpers import dense_hessian

NUM_CLASSES = 3


def tiny_data(n=48, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features))
    y = rng.integers(0, NUM_CLASSES, n)
    return x, y


def tiny_model(features=4, hidden=5, dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,), dtype=dtype),
            keras.layers.Dense(hidden, activation="tanh", dtype=dtype),
            keras.layers.Dense(NUM_CLASSES, dtype=dtype),
        ]
    )


class FakeClock:
    """A clock that only moves when told to (seconds)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def mean_xent(y):
    return lambda out: tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
    )


def dense_spectrum(model, x, y):
    """Eigenvalues (descending) and eigenvectors (columns) of the dense probe-set Hessian."""
    h = dense_hessian(model, mean_xent(y), tf.constant(x))
    values, vectors = np.linalg.eigh(0.5 * (h + h.T))
    order = np.argsort(-values)
    return values[order], vectors[:, order], h


def read_events(directory):
    """{tag: [(step, kind, value)]} from every event file in ``directory``."""
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                kind = value.metadata.plugin_data.plugin_name
                payload = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                found.setdefault(value.tag, []).append((event.step, kind, payload))
    return found


@pytest.fixture
def needs_tensorboard():
    pytest.importorskip("tensorboard", reason="writing summaries needs the tensorboard package")


@pytest.fixture(autouse=True)
def _reset_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")
