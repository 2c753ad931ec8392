"""The common small models every optimizer must train at its defaults, with their data.

``ZOO`` maps a name to ``(build_model, (x, y))``; ``first_epoch`` trains one epoch and
returns the losses before, during and after it, the measures behind "no optimizer at
its defaults raises the training loss in the first epoch" ([7/8]).
Data are small so a check takes seconds on 2 CPU cores. ``LARGER`` adds MobileNetV2 and
the BatchNorm ResNet on digits upsampled to their input sizes: too slow for the tests,
they are for ``benchmarks.safe_defaults``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_curv import models
from keras_curv.data import load_dataset, motif_sequences, split_halves


@functools.cache
def _digits(limit: int = 512):
    data = load_dataset("digits", max_train=limit)
    return data.x_train, data.y_train


def _sequences():
    return motif_sequences(512, sequence_length=12, vocabulary=24, num_classes=4, seed=0)


def _two_inputs():
    x, y = _digits()
    return split_halves(x), y


def _digits_rgb(size: int):
    """Digits bilinearly upsampled to ``size`` x ``size`` and repeated over 3 channels.

    The whole training split (1,438 images, 45 steps at batch 32): in 16 steps even
    Adam does not lower MobileNetV2's loss from its random start.
    """
    x, y = _digits(limit=None)
    images = tf.image.resize(x.astype("float32"), (size, size)).numpy()
    return np.repeat(images, 3, axis=-1), y


ZOO: dict[str, tuple[Callable[[], keras.Model], Callable[[], tuple]]] = {
    "mlp": (lambda: models.mlp((8, 8, 1), 10), _digits),
    "cnn": (lambda: models.small_cnn((8, 8, 1), 10), _digits),
    "batchnorm_cnn": (lambda: models.batchnorm_cnn((8, 8, 1), 10, depthwise=True), _digits),
    "transformer": (lambda: models.transformer_classifier(12, 24, 4, dim=16), _sequences),
    "lstm": (lambda: models.lstm_classifier(12, 24, 4, units=16), _sequences),
    "two_input": (lambda: models.two_input_classifier((4, 8, 1), (4, 8, 1), 10), _two_inputs),
}

LARGER: dict[str, tuple[Callable[[], keras.Model], Callable[[], tuple]]] = {
    "mobilenet_v2": (lambda: models.mobilenet_v2((32, 32, 3), 10), lambda: _digits_rgb(32)),
    "bn_resnet": (lambda: models.batchnorm_resnet((16, 16, 3), 10), lambda: _digits_rgb(16)),
}

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# MobileNetV2 ends in a softmax.
_LOSSES = {"mobilenet_v2": keras.losses.SparseCategoricalCrossentropy()}


def entry(name: str) -> tuple[Callable[[], keras.Model], Callable[[], tuple]]:
    """``(build_model, data)`` of ``name``, from ``ZOO`` or ``LARGER``."""
    return ZOO[name] if name in ZOO else LARGER[name]


class _BatchLosses(keras.callbacks.Callback):
    """Each batch's training loss, recovered from the running means Keras logs."""

    def __init__(self):
        super().__init__()
        self.means: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))

    def losses(self) -> list[float]:
        totals = [mean * (i + 1) for i, mean in enumerate(self.means)]
        return [totals[0]] + [b - a for a, b in zip(totals, totals[1:])]


def _training_mode_loss(model: keras.Model, x, y, batch_size: int, loss=LOSS) -> float:
    """Mean training-mode loss over ``batch_size`` batches; leaves every weight as it was."""
    saved = model.get_weights()  # BatchNormalization moves its statistics when training
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    losses = [float(loss(yb, model(xb, training=True))) for xb, yb in batches]
    model.set_weights(saved)
    return float(np.mean(losses))


def first_epoch(
    name: str,
    optimizer: keras.optimizers.Optimizer,
    *,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Trains ``ZOO[name]`` (or ``LARGER[name]``) for one epoch with ``optimizer``.

    Returns:
        ``initial`` (loss on the training set before training, inference mode),
        ``initial_training`` (the same in training mode, batch by batch: what the first
        batch's loss is an estimate of; BatchNormalization and Dropout make the two
        differ), ``mean`` (the epoch's mean training loss as Keras reports it),
        ``last`` (the mean training loss of the epoch's last quarter of batches),
        ``final`` (inference-mode loss on the training set after the epoch),
        ``final_training`` (training-mode, like ``initial_training``) and
        ``max_weight_change``.
    """
    keras.utils.set_random_seed(seed)
    build, data = entry(name)
    loss = _LOSSES.get(name, LOSS)
    x, y = data()
    model = build()
    model.compile(optimizer=optimizer, loss=loss)
    before = [w.copy() for w in model.get_weights()]
    initial = float(model.evaluate(x, y, batch_size=256, verbose=0))
    initial_training = _training_mode_loss(model, x, y, batch_size, loss)
    record = _BatchLosses()
    history = model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=[record])
    losses = record.losses()
    final = float(model.evaluate(x, y, batch_size=256, verbose=0))
    final_training = _training_mode_loss(model, x, y, batch_size, loss)
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), before))
    return {
        "initial": initial,
        "initial_training": initial_training,
        "mean": float(history.history["loss"][0]),
        "last": float(np.mean(losses[-max(1, len(losses) // 4) :])),
        "final": final,
        "final_training": final_training,
        "max_weight_change": change,
    }
