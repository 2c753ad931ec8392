"""Both diagnostic callbacks on the architectures users train, checked against dense Hessians.

A Transformer encoder (Embedding, MultiHeadAttention, LayerNormalization, Dropout), an
LSTM + GRU classifier, a BatchNorm + DepthwiseConv CNN, a two-input Functional model and a
subclassed model, each small enough (< 300 parameters, float64) for a dense Hessian.
"""

import logging

import keras
import numpy as np
import pytest

from keras_curv import models
from keras_curv._internal.flat import variable_ranges
from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
from keras_curv.data import motif_sequences, split_halves
from tests.callbacks.conftest import mean_xent
from tests.curvature.helpers import dense_hessian

pytestmark = pytest.mark.slow
F64 = "float64"


def _sequences():
    return motif_sequences(16, sequence_length=6, vocabulary=8, num_classes=3, seed=0)


def _recurrent():
    # Unrolled: a small graph, so the dense oracle's Jacobian is quick.
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(8, 3, dtype=F64),
            keras.layers.LSTM(3, return_sequences=True, unroll=True, dtype=F64),
            keras.layers.GRU(3, unroll=True, dtype=F64),
            keras.layers.Dense(3, dtype=F64),
        ]
    )


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="tanh", dtype=F64)
        self.out = keras.layers.Dense(3, dtype=F64)

    def call(self, x, training=None):
        return self.out(self.hidden(x))


def _images(shape):
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, *shape)), rng.integers(0, 3, 16)


CASES = {
    "transformer": (lambda: models.transformer_classifier(6, 8, 3, dim=4, dtype=F64), _sequences),
    "lstm_gru": (_recurrent, _sequences),
    "batchnorm_depthwise_cnn": (
        lambda: models.batchnorm_cnn((6, 6, 1), 3, filters=2, depthwise=True, dtype=F64),
        lambda: _images((6, 6, 1)),
    ),
    "two_input": (
        lambda: models.two_input_classifier((2, 4, 1), (2, 4, 1), 3, width=3, dtype=F64),
        lambda: (lambda x, y: (split_halves(x), y))(*_images((4, 4, 1))),
    ),
    "subclassed": (Subclassed, lambda: _images((4,))),
}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", list(CASES))
def test_values_are_finite_and_match_the_dense_hessian(name):
    build, data = CASES[name]
    x, y = data()
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # Two blocks (the first two layers with weights) keep the tracing short.
    blocks = [layer for layer in model.layers if layer.trainable_variables][:2]
    spectrum = HessianSpectrum(
        (x, y),
        every_n_epochs=1,
        tol=1e-8,
        blocks=[layer.name for layer in blocks],
        trace_samples=3,
    )
    alignment = SubspaceAlignment((x, y), every_n_epochs=1, tol=1e-8)
    records = _Records()
    logging.getLogger("tensorflow").addHandler(records)
    try:
        history = model.fit(
            x, y, epochs=1, batch_size=16, verbose=0, callbacks=[spectrum, alignment]
        )
    finally:
        logging.getLogger("tensorflow").removeHandler(records)
    logged = {k: v[-1] for k, v in history.history.items()}
    assert all(np.isfinite(v) for v in logged.values()), logged
    assert {"preconditioned_sharpness", "combined_rank", "alignment"} <= set(logged)
    assert not [m for m in records.messages if "IndexedSlices" in m]  # densified silently

    h = dense_hessian(model, mean_xent(y), x)
    h = 0.5 * (h + h.T)
    assert logged["top_eigenvalue"] == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-6)
    for layer in blocks:
        ranges = variable_ranges(model.trainable_variables, layer.trainable_variables)
        idx = np.concatenate([np.arange(a, b) for a, b in ranges])
        expected = np.linalg.eigvalsh(h[np.ix_(idx, idx)])[-1]
        assert logged[f"{layer.name}_top_eigenvalue"] == pytest.approx(expected, rel=1e-6)
