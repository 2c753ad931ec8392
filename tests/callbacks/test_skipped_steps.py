"""SkippedSteps with any optimizer: Keras's, LossScaleOptimizer's own skips, frozen epochs."""

import warnings

import keras
import numpy as np
import pytest

from keras_curv import AdaHessian
from keras_curv.callbacks import SkippedSteps

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=32, bad=()):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype("float32")
    for batch in bad:
        x[4 * batch : 4 * batch + 4] = np.nan  # non-finite scaled gradients: LSO skips
    return x, rng.integers(0, 3, n)


def classifier(dtype=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "tanh", dtype=dtype), keras.layers.Dense(3)]
    )


def test_plain_keras_optimizer_counts_zero_without_warning():
    x, y = data()
    model = classifier()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=XENT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[SkippedSteps()])
    assert history.history["skipped_steps"] == [0, 0]


def test_loss_scale_optimizer_skips_are_counted(needs_mixed_precision):
    x, y = data(bad=(1, 4, 5))
    model = classifier()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=XENT)
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    cb = SkippedSteps()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LSO skips are normal: no warning
        history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    skipped = history.history["skipped_steps"][0]
    # Independent count from the LSO's own state: every skip halved the scale, no growth.
    halvings = np.log2(optimizer.initial_scale / float(optimizer.dynamic_scale.numpy()))
    assert skipped == round(halvings) >= 3
    assert int(optimizer.iterations.numpy()) == 8 - skipped


@pytest.fixture
def needs_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_a_frozen_epoch_warns_and_can_stop_training():
    x, y = data()
    x[:] = np.nan  # every step of every epoch is skipped
    model = classifier()
    model.compile(optimizer=AdaHessian(0.1, seed=0), loss=XENT)
    cb = SkippedSteps(warn=False, stop_when_frozen=True)
    with pytest.warns(RuntimeWarning, match="Every one of the 8 training steps of epoch 1"):
        history = model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[cb])
    assert len(history.epoch) == 1 and cb.frozen_epochs == [0]
    assert history.history["skipped_steps"] == [8]


def test_a_frozen_epoch_without_stopping_warns_every_epoch():
    x, y = data()
    model = classifier()
    model.compile(optimizer=AdaHessian(0.1, seed=0), loss=XENT)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    x[:] = np.nan
    cb = SkippedSteps()
    with pytest.warns(RuntimeWarning) as record:
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    messages = [str(w.message) for w in record]
    assert sum("Every one of the 8" in m for m in messages) == 2
    assert sum("training step(s) were skipped" in m for m in messages) == 1
    assert history.history["skipped_steps"] == [8, 16] and cb.frozen_epochs == [0, 1]
