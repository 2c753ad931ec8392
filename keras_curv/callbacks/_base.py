"""``CurvatureCallback``: the Keras callback plumbing the diagnostic callbacks share.

It puts together what lives elsewhere, one concern per module:

* :mod:`~keras_curv.callbacks._schedule`: when to measure (a fixed schedule or the
  overhead budget) and at which TensorBoard step;
* :mod:`~keras_curv.callbacks._shared`: the Hessian operator and eigenpairs shared by
  callbacks on the same probe data;
* :mod:`~keras_curv.callbacks.summaries`: the ``tf.summary`` writer;
* :mod:`~keras_curv.callbacks._protocol`: what the callbacks read from the optimizer;
* :mod:`keras_curv.plotting`: the figures;
* :mod:`~keras_curv._internal.losses`: the loss to differentiate when none is given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.data import ProbeData, probe_data
from keras_curv._internal.losses import model_loss
from keras_curv._internal.model import stateless_outputs
from keras_curv._internal.validation import choice, integer, positive
from keras_curv.callbacks._schedule import ProbeSchedule
from keras_curv.callbacks._shared import (
    SharedProbe,
    model_entry,
    probe_fingerprint,
    shared_probe,
    weights_state,
)
from keras_curv.callbacks.summaries import CurvatureWriter
from keras_curv.curvature.eigensolvers import METHODS
from keras_curv.curvature.operators import HessianOperator, resolve_loss


def eigensolver_args(top_k: Any, method: Any, tol: Any) -> tuple[int | None, str, float]:
    """The validated eigensolver arguments the diagnostic callbacks share.

    Returns:
        ``(top_k, method, tol)``.

    Raises:
        ValueError: ``top_k`` not an int >= 1 (or None), an unknown ``method``, or a
            ``tol`` that is not a positive number.
    """
    return (
        integer(top_k, "top_k", minimum=1, allow_none=True),
        choice(method, "method", METHODS),
        positive(tol, "tol"),
    )


def _unpack_data(data: Any, owner: str) -> tuple[Any, Any, Any]:
    if isinstance(data, tf.data.Dataset):
        return data, None, None
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return (*data, None) if len(data) == 2 else tuple(data)
    raise ValueError(
        f"{owner} needs probe data as `(x, y)`, `(x, y, sample_weight)` or a finite "
        f"tf.data.Dataset of such tuples; got {type(data).__name__}."
    )


class CurvatureCallback(keras.callbacks.Callback):
    r"""Keras plumbing shared by the diagnostic callbacks.

    Subclasses implement :meth:`_prepare` (called at ``on_train_begin`` with the model
    built; build operators there, cheaply: nothing is traced yet), :meth:`_calibrate`
    (traces what a measurement needs), :meth:`_expected_products` (the products of a
    cold measurement) and :meth:`_measure` (returns the
    values for ``logs`` and writes summaries). Measurements never change the model, the
    optimizer or any random stream: products use the stateless forward pass and probes
    come from :meth:`probe_rng`, a NumPy generator seeded with ``(seed, step)``. Each
    measurement's randomness is therefore a function of the seed and the step alone, so
    a fit that is interrupted and resumed (``keras.callbacks.BackupAndRestore``, or
    ``load_model`` and ``fit(initial_epoch=...)``) measures what an uninterrupted fit
    would. The one difference is the eigensolver's warm start from the previous
    measurement's eigenvectors, which a resumed fit does not have: its first
    eigenpairs agree with the uninterrupted ones to the solver's ``tol``, not bit for
    bit.

    **Schedule.** With ``every_n_epochs`` and/or ``every_n_batches`` set, measurements
    follow that fixed schedule (:class:`~keras_curv.callbacks._schedule.ProbeSchedule`),
    whatever they cost. With neither set (the default), the callback always measures at
    the end of the fit's first epoch and at the end of training, and in between the
    *overhead budget* decides: all curvature callbacks of the model share one account per
    ``fit`` (:class:`~keras_curv.callbacks._schedule.OverheadLedger`) and, at every other
    epoch end, measure together iff their estimated cost keeps the seconds spent in them
    within ``max_overhead`` of the training seconds (the rule and the estimates:
    :mod:`~keras_curv.callbacks._schedule`). The end of training is the last epoch's end
    or, when training stopped early (``EarlyStopping``), ``on_train_end``: that final
    measurement goes to :attr:`measurements` and TensorBoard, not to ``History``, which
    is already written. At ``on_train_begin`` (with ``verbose`` on) one line says what
    the schedule will be.

    Attributes:
        trace_prior_epochs: Prior for the one-off tracing cost, in first-epoch durations.
        measurements: ``{"step": [...], "<logs key>": [...]}`` for every measurement of
            the last ``fit``, including a final one made at ``on_train_end``; unlike
            ``History``, it says at which step each value was taken.
    """

    trace_prior_epochs = 2.5

    def __init__(
        self,
        data: Any,
        *,
        every_n_epochs: int | None,
        every_n_batches: int | None,
        log_dir: str | os.PathLike | None,
        loss: Any,
        batch_size: int | None,
        training: bool,
        seed: int,
        max_overhead: float | None = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ):
        super().__init__()
        owner = type(self).__name__
        self.x, self.y, self.sample_weight = _unpack_data(data, owner)
        self.batch_size = integer(batch_size, "batch_size", minimum=1, allow_none=True)
        # Validate (and materialise) the probe set now, not mid-training.
        self.probe: ProbeData = probe_data(self.x, self.y, self.sample_weight, self.batch_size)
        self.max_overhead = positive(max_overhead, "max_overhead", allow_none=True)
        self.budgeted = every_n_epochs is None and every_n_batches is None
        self.schedule = ProbeSchedule(
            every_n_epochs, every_n_batches, budgeted=self.max_overhead is not None
        )
        if not callable(clock):
            raise ValueError(f"`clock` must be a callable returning seconds; got {clock!r}.")
        self.clock = clock
        self.writer = CurvatureWriter(log_dir) if log_dir is not None else None
        self.loss = loss
        self.training = bool(training)
        self.seed = integer(seed, "seed")
        self._prepared_for = None
        self._fingerprint = probe_fingerprint(self.probe)
        self.shared: SharedProbe | None = None
        self.measurements: dict[str, list] = {}
        self._ledger = None
        self._calibrated = False
        self._last_cost: float | None = None
        self._first_epoch_seconds: float | None = None
        self._last_epoch: int | None = None
        self._last_epoch_measured: int | None = None
        if self.schedule.every_n_batches is None:
            # Leave Keras free to dispatch batch ends asynchronously: it only does so when
            # no callback overrides on_train_batch_end.
            self.on_train_batch_end = keras.callbacks.Callback.on_train_batch_end.__get__(self)

    # Subclass hooks ----------------------------------------------------------------------

    def _prepare(self) -> None:
        raise NotImplementedError

    def _measure(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def _expected_products(self) -> tuple[int, int]:
        """(eigensolver products, other products) a cold measurement is expected to need."""
        raise NotImplementedError

    def _calibrate(self) -> None:
        """Traces what a measurement needs (at least the Hessian-vector product)."""
        self.shared.calibrate(self.clock)

    # Helpers -----------------------------------------------------------------------------

    def probe_rng(self, step: int, stream: int | None = None) -> np.random.Generator:
        """The random stream of the measurement at ``step``, a function of ``(seed, step)``.

        Stateless across measurements, so that a resumed fit draws the same probes at the
        same step as an uninterrupted one. ``stream`` gives an independent stream for a
        part of the measurement, so that parts do not shift each other's draws.
        """
        key = [self.seed, int(step)] + ([] if stream is None else [int(stream)])
        return np.random.default_rng(key)

    def _probe_outputs(self) -> Any:
        """The model's outputs on the first probe batch.

        Raises:
            ValueError: the probe inputs do not fit the model (named as such, rather
                than as a layer's shape error in the middle of training).
        """
        first = self.probe.batches[0]
        try:
            if not self.model.built:
                # A subclassed model whose layers Keras built symbolically is not marked
                # built, and stateless_call refuses it; one call marks it (its variables
                # exist already, so nothing is created and no random number is drawn).
                self.model(first.x)
            values = [v.value for v in self.model.trainable_variables]
            return stateless_outputs(self.model, values, first.x, False)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"{type(self).__name__}: the probe inputs do not fit the model ({error}). "
                "Pass probe inputs shaped like the model's training inputs."
            ) from error

    def _check_probe(self, outputs: Any) -> None:
        """Evaluates the loss on the first probe batch, so bad targets fail before training.

        Raises:
            ValueError: no usable loss, or targets the loss cannot take (wrong shape,
                sparse labels outside ``[0, C)``).
        """
        loss = self._resolved_loss()
        if isinstance(outputs, (list, tuple, dict)):
            return  # the subclass names the multi-output problem
        first = self.probe.batches[0]
        dtype = outputs.dtype
        try:
            value = resolve_loss(loss, dtype)(
                first.y, outputs, first.sample_weight, tf.constant(first.size, dtype)
            )
            tf.convert_to_tensor(value).numpy()
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"{type(self).__name__}: the probe targets do not fit the loss ({error}). "
                "Pass targets of the form the training loss takes, e.g. integer labels in "
                "[0, C) of shape (n,) for sparse_categorical_crossentropy, one-hot (n, C) "
                "for categorical_crossentropy."
            ) from error

    def _num_outputs(self) -> int:
        """Size of the model's last output axis (the number of classes of a classifier)."""
        outputs = self._probe_outputs()
        if isinstance(outputs, (list, tuple, dict)):
            raise ValueError(
                f"{type(self).__name__} needs a single-output model; this one has several."
            )
        return int(outputs.shape[-1]) if outputs.shape.rank >= 2 else 1

    def _resolved_loss(self) -> Any:
        return model_loss(self.model, self.loss, type(self).__name__)

    def _shared_operator(self, loss: Any) -> HessianOperator:
        """The Hessian operator, shared with other callbacks on the same probe data and loss."""
        if self.loss is None:
            loss_key = ("compiled", id(getattr(self.model, "loss", None)))
        else:
            loss_key = self.loss if isinstance(self.loss, str) else ("object", id(self.loss))
        key = (
            self._fingerprint,
            loss_key,
            self.training,
            tuple(id(v) for v in self.model.trainable_variables),
        )
        self.shared = shared_probe(
            self.model,
            key,
            lambda: HessianOperator(
                self.model,
                loss,
                self.x,
                self.y,
                sample_weight=self.sample_weight,
                training=self.training,
                batch_size=self.batch_size,
            ),
        )
        return self.shared.operator

    def _estimate(self) -> tuple[float, float]:
        """Estimated seconds of the next measurement: ``(own part, eigensolver part)``."""
        shared = self.shared
        eig_products, other_products = self._expected_products()
        if self._last_cost is None:
            return shared.hvp_seconds * other_products, shared.hvp_seconds * eig_products
        eig = shared.eig_seconds if shared.eig_seconds is not None else 0.0
        return self._last_cost, eig

    def _record(self, step: int, values: dict[str, float]) -> None:
        self.measurements.setdefault("step", []).append(int(step))
        for key, value in values.items():
            self.measurements.setdefault(key, []).append(value)

    def _timed_measure(self, step: int) -> dict[str, float]:
        start = self.clock()
        runs = self.shared.eig_runs
        values = self._measure(step)
        cost = self.clock() - start
        self._ledger.charge(cost)
        # Keep the eigensolver apart: another callback may pay it next time.
        own = cost - (self.shared.eig_seconds if self.shared.eig_runs != runs else 0.0)
        self._last_cost = max(own, 0.0)
        self._record(step, values)
        return values

    def _group_allows(self, when: Any, forced: bool = False) -> bool:
        """The joint decision of this fit's budget-scheduled callbacks at ``when``."""
        return self._ledger.decide(
            when,
            self.clock,
            self._first_epoch_seconds,
            lambda: weights_state(self.model),
            forced=forced,
        )

    # Keras hooks -------------------------------------------------------------------------

    def _schedule_line(self) -> str:
        """What the schedule will be, in one line (printed at ``on_train_begin``)."""
        name = type(self).__name__
        if not self.budgeted:
            parts = []
            if self.schedule.every_n_epochs is not None:
                parts.append(f"every {self.schedule.every_n_epochs} epoch(s)")
            if self.schedule.every_n_batches is not None:
                parts.append(f"every {self.schedule.every_n_batches} batch(es)")
            return f"{name}: measures {' and '.join(parts)} (fixed schedule)."
        epochs = (getattr(self, "params", None) or {}).get("epochs")
        last = f" (epoch {epochs})" if epochs else ""
        return (
            f"{name}: measures after the first epoch and at the end of training{last}; in "
            f"between while its cost stays within max_overhead={self.max_overhead:g} of the "
            "training time (every_n_epochs=1 measures every epoch)."
        )

    def on_train_begin(self, logs=None):
        if (getattr(self, "params", None) or {}).get("verbose", 0):
            print(self._schedule_line())
        self._ledger = model_entry(self.model, self.clock).ledger
        self._ledger.begin(getattr(self, "params", None), self.clock)
        if self.budgeted:
            self._ledger.members.append(self)
        start = self.clock()
        self.schedule.reset()
        self.measurements = {}
        self._last_epoch_measured = None
        self._last_epoch = None
        self._first_epoch = None
        self._first_epoch_seconds = None
        # Rebuild only when the model or its set of trainable variables changed.
        key = (id(self.model), tuple(id(v) for v in self.model.trainable_variables))
        if key != self._prepared_for:
            # Probe data that does not fit the model or the loss fails here, before the
            # first epoch, not at the first (possibly much later) measurement.
            self._check_probe(self._probe_outputs())
            self._prepare()
            self._prepared_for = key
            self._calibrated = False
            self._last_cost = None
        self._ledger.charge(self.clock() - start)

    def on_epoch_begin(self, epoch, logs=None):
        steps = (getattr(self, "params", None) or {}).get("steps")
        self.schedule.epoch_begin(epoch, steps)

    def on_train_batch_end(self, batch, logs=None):
        if self.schedule.batch_end(batch):
            values = self._timed_measure(self.schedule.global_batch)
            if logs is not None:
                logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        if self._first_epoch_seconds is None:
            self._first_epoch_seconds = self._ledger.training_seconds()
        if self._first_epoch is None:
            self._first_epoch = int(epoch)
        if self.budgeted:
            epochs = (getattr(self, "params", None) or {}).get("epochs")
            forced = int(epoch) == self._first_epoch or (epochs and int(epoch) == epochs - 1)
            due = self._group_allows(int(epoch), forced=bool(forced))
        else:
            due = self.schedule.epoch_due(epoch)
        if due:
            values = self._timed_measure(self.schedule.step(epoch))
            self._last_epoch_measured = int(epoch)
            if logs is not None:
                # Keras appends History and ProgbarLogger after user callbacks and hands
                # every callback the same dict, so these keys reach both.
                logs.update(values)
        self._last_epoch = int(epoch)

    def on_train_end(self, logs=None):
        try:
            last = self._last_epoch
            if self.budgeted and last is not None and self._last_epoch_measured != last:
                # Training stopped before its last epoch (EarlyStopping): measure the end.
                if self._group_allows("train_end", forced=True):
                    self._timed_measure(self.schedule.step(last))
        finally:
            if self.writer is not None:
                self.writer.close()
