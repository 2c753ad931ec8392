"""Training logs and warnings for steps that the optimizer skipped, with any optimizer."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.keras_privates import applied_steps
from keras_curv._internal.optimizer import unwrap


def _read(counter: Any) -> int:
    # A MirroredVariable under a distribution strategy: read its primary copy.
    return int(np.asarray(tf.convert_to_tensor(getattr(counter, "value", counter))))


class SkippedSteps(keras.callbacks.Callback):
    """Logs how many training steps were skipped, warns, and can stop a frozen run.

    A step is *skipped* when a batch ran but the optimizer did not apply an update:

    * keras-curv optimizers skip a step whose loss, gradient (or, for AdaHessian, very
      first curvature estimate) is not finite, leaving weights and state as they were
      and counting it in ``optimizer.skipped_steps``;
    * Keras's ``LossScaleOptimizer`` (mixed precision) skips a step whose scaled
      gradients are not finite and halves its loss scale; it keeps no count.

    Either way the optimizer's step counter does not advance, so the callback counts, for
    any optimizer, the batches after which it did not (plain Keras optimizers never skip:
    the count stays 0). It sets ``logs["skipped_steps"]`` (cumulative over the ``fit``)
    after every batch and epoch, so it shows in the progress bar, in ``History`` and in
    every callback after it.

    Warnings (``RuntimeWarning``): once per ``fit`` the first time a keras-curv optimizer
    skips a step (a ``LossScaleOptimizer`` skipping its first steps while it lowers its
    scale is normal and not reported), and at the end of every epoch in which *every*
    step was skipped: the weights then no longer change and training has silently
    stopped. With ``stop_when_frozen=True`` such an epoch also stops training
    (``model.stop_training``), like ``keras.callbacks.TerminateOnNaN`` does at the first
    NaN loss.

    Args:
        warn: Give the first-skip warning (the frozen-epoch warning is always given).
        stop_when_frozen: Stop training at the end of an epoch whose steps were all skipped.

    Example:
        >>> model.compile(optimizer=keras_curv.AdaHessian(), loss="mse")
        >>> cb = keras_curv.callbacks.SkippedSteps(stop_when_frozen=True)
        >>> model.fit(x, y, epochs=5, callbacks=[cb]).history["skipped_steps"]
    """

    def __init__(self, warn: bool = True, stop_when_frozen: bool = False) -> None:
        super().__init__()
        self.warn = bool(warn)
        self.stop_when_frozen = bool(stop_when_frozen)
        self.frozen_epochs: list[int] = []
        self._warned = False

    def _counters(self) -> tuple[int, int]:
        """``(applied steps, steps the keras-curv optimizer itself counted as skipped)``."""
        optimizer = self.model.optimizer
        if optimizer is None or not optimizer.built:
            return 0, 0
        inner = unwrap(optimizer)
        own = _read(inner.skipped_steps) if hasattr(type(inner), "skipped_steps") else 0
        return _read(applied_steps(inner)), own

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fit_applied, self._fit_own = self._counters()
        self._batches_before = 0
        self._batches = 0
        self._warned = False
        self.frozen_epochs = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._batches_before += self._batches
        self._batches = 0
        self._epoch_skipped = self._skipped()

    def _skipped(self) -> int:
        applied, _ = self._counters()
        return self._batches_before + self._batches - (applied - self._fit_applied)

    def _update(self, logs: dict[str, Any] | None) -> int:
        skipped = self._skipped()
        if logs is not None:
            logs["skipped_steps"] = skipped
        own = self._counters()[1] - self._fit_own
        if own > 0 and self.warn and not self._warned:
            self._warned = True
            warnings.warn(
                f"{own} training step(s) were skipped because the loss or a gradient (or "
                "the first curvature estimate) was not finite (NaN/Inf); the weights and "
                "optimizer state were left unchanged for those steps. Check the input data "
                "and the learning rate, or add keras.callbacks.TerminateOnNaN() (or "
                "SkippedSteps(stop_when_frozen=True)) to stop training instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        return skipped

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # With steps_per_execution > 1, Keras reports the last batch of each chunk.
        self._batches = int(batch) + 1
        self._update(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        skipped = self._update(logs)
        in_epoch = skipped - self._epoch_skipped
        if self._batches == 0 or in_epoch < self._batches:
            return
        self.frozen_epochs.append(int(epoch))
        lso = isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer)
        cause = (
            "the LossScaleOptimizer found non-finite scaled gradients at every step"
            if lso and self._counters()[1] == self._fit_own
            else "the loss or a gradient was not finite at every step"
        )
        action = (
            "Training is stopped (stop_when_frozen=True)."
            if self.stop_when_frozen
            else "Pass SkippedSteps(stop_when_frozen=True) to stop training when this happens."
        )
        warnings.warn(
            f"Every one of the {self._batches} training steps of epoch {epoch + 1} was "
            f"skipped ({cause}): the weights no longer change, training has stopped in "
            "effect. The run has most likely diverged: lower the learning rate, add "
            f"damping, or check the data. {action}",
            RuntimeWarning,
            stacklevel=2,
        )
        if self.stop_when_frozen:
            self.model.stop_training = True
