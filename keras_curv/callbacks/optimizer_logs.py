"""``OptimizerLogs``: the optimizer's own diagnostics in ``logs`` and TensorBoard, at no cost."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras

from keras_curv._internal.optimizer import model_optimizer
from keras_curv.callbacks._protocol import optimizer_summary, protocol_method
from keras_curv.callbacks._schedule import ProbeSchedule
from keras_curv.callbacks.summaries import CurvatureWriter

_PREFIX = "optimizer/"


class OptimizerLogs(keras.callbacks.Callback):
    """Copies the scalars of the optimizer's ``curvature_summary()`` into ``logs``.

    They then show in the progress bar, in ``History`` and in every callback that runs
    after this one (``CSVLogger``, ``EarlyStopping(monitor="win_rate")``...); with
    ``log_dir`` they also go to TensorBoard as ``optimizer/<name>`` in the
    ``<log_dir>/curvature`` run. Nothing is measured: the summary only reads the
    optimizer's state (for Sophia, ``clip_fraction`` and ``win_rate``, the authors'
    tuning signal), so training is the same with or without the callback. Vector entries
    give one scalar per entry, ``<name>_1`` ..., or ``<name>_min/_mean/_max`` when long
    (as ``HessianSpectrum`` logs them).

    Args:
        keys: The names to copy (default: all of them).
        every_n_batches: Also update ``logs`` after every n-th training batch (``None``:
            at epoch ends only). TensorBoard steps are then the global batch count
            instead of the epoch index (as for ``HessianSpectrum``).
        log_dir: TensorBoard directory; ``None`` writes nothing.

    Raises:
        ValueError: the optimizer has no ``curvature_summary()``, or a key is not in it.

    Example:
        >>> model.compile(optimizer=keras_curv.Sophia(), loss="mse")
        >>> history = model.fit(x, y, epochs=3, callbacks=[OptimizerLogs(["win_rate"])])
        >>> history.history["win_rate"]
    """

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        every_n_batches: int | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if isinstance(keys, str):
            keys = [keys]
        self.keys = None if keys is None else [str(k) for k in keys]
        self.schedule = ProbeSchedule(every_n_epochs=1, every_n_batches=every_n_batches)
        self._writer = None if log_dir is None else CurvatureWriter(log_dir)
        self._last_step: int | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = model_optimizer(self.model)
        if protocol_method(optimizer, "curvature_summary") is None:
            raise ValueError(
                "OptimizerLogs needs an optimizer with `curvature_summary()` (Sophia, "
                f"AdaHessian, ClassSubspaceNewton...); the model was compiled with "
                f"{type(optimizer).__name__}."
            )
        self.schedule.reset()
        self._last_step = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.schedule.epoch_begin(epoch, (getattr(self, "params", None) or {}).get("steps"))

    def _read(self) -> dict[str, float]:
        if not model_optimizer(self.model).built:
            return {}
        scalars = {tag[len(_PREFIX) :]: v for tag, v in optimizer_summary(self.model)[0].items()}
        if self.keys is None:
            return scalars
        missing = [k for k in self.keys if k not in scalars]
        if missing:
            raise ValueError(
                f"OptimizerLogs(keys=...): {missing} not in the optimizer's "
                f"curvature_summary(), which has {sorted(scalars)}."
            )
        return {k: scalars[k] for k in self.keys}

    def _update(self, logs: dict[str, Any] | None, epoch: int) -> None:
        values = self._read()
        if logs is not None:
            logs.update(values)
        step = self.schedule.step(epoch)
        if self._writer is not None and values and step != self._last_step:
            self._last_step = step
            self._writer.write(step, scalars={_PREFIX + k: v for k, v in values.items()})

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.schedule.batch_end(batch):
            self._update(logs, 0)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._update(logs, epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
