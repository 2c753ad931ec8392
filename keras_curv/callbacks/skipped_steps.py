"""Training logs and a warning for steps the curvature optimizers skipped."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.optimizer import model_optimizer


class SkippedSteps(keras.callbacks.Callback):
    """Copies the optimizer's ``skipped_steps`` count into ``logs`` and warns once.

    keras-curv optimizers skip a step whose loss, gradient (or, for AdaHessian, very
    first curvature estimate) is not finite: the weights and the optimizer state are
    left as they were and ``optimizer.skipped_steps`` is incremented inside the
    compiled step (so this works with ``jit_compile`` and distribution strategies).
    An optimizer has no way to add entries to Keras's logs; this callback reads the
    counter on the host after each batch and each epoch, so it appears as
    ``skipped_steps`` in the progress bar, in ``History`` and in every callback that
    runs after it. The first time it grows during a ``fit``, a ``RuntimeWarning``
    says so.

    To stop training on a NaN loss instead, use ``keras.callbacks.TerminateOnNaN``:
    it still sees the NaN loss of the skipped batch. Note that Keras's running
    ``loss`` of an epoch is a mean over its batches, so it stays NaN for the rest of
    an epoch in which a NaN batch was skipped, although the weights are finite.

    Args:
        warn: Give a ``RuntimeWarning`` the first time steps are skipped in a ``fit``.

    Example:
        >>> model.compile(optimizer=keras_curv.AdaHessian(), loss="mse")
        >>> history = model.fit(x, y, callbacks=[keras_curv.callbacks.SkippedSteps()])
        >>> history.history["skipped_steps"]   # cumulative count, per epoch
    """

    def __init__(self, warn: bool = True) -> None:
        super().__init__()
        self.warn = bool(warn)
        self._seen = 0
        self._warned = False

    def _count(self) -> int:
        optimizer = model_optimizer(self.model)
        if not hasattr(type(optimizer), "skipped_steps"):
            raise ValueError(
                f"SkippedSteps needs a keras-curv optimizer (one with `skipped_steps`); "
                f"the model was compiled with {type(optimizer).__name__}."
            )
        if not optimizer.built:
            return 0
        counter = optimizer.skipped_steps
        # A MirroredVariable under a distribution strategy: read its primary copy.
        return int(np.asarray(tf.convert_to_tensor(getattr(counter, "value", counter))))

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._seen = self._count()
        self._warned = False

    def _update(self, logs: dict[str, Any] | None) -> None:
        count = self._count()
        if logs is not None:
            logs["skipped_steps"] = count
        if count > self._seen and self.warn and not self._warned:
            self._warned = True
            warnings.warn(
                f"{count - self._seen} training step(s) were skipped because the loss or a "
                "gradient (or the first curvature estimate) was not finite (NaN/Inf); the "
                "weights and optimizer state were left unchanged for those steps. Check the "
                "input data and the learning rate, or add keras.callbacks.TerminateOnNaN() "
                "to stop training instead.",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._update(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._update(logs)
