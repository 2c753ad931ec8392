"""``CurvatureOptimizer``: the base of every optimizer that needs the step's batch.

Keras calls ``apply(grads, variables)`` and then, per variable, ``update_step(gradient,
variable, learning_rate)``; it has no channel for anything else. This base class is the
one channel, shared by every optimizer of the package:

1. ``apply`` takes the step's :class:`~keras_curv.optimizers.batch.TrainBatch`
   (:func:`~keras_curv.optimizers.contract.current_batch`) and asks the subclass for its
   :class:`StepStatistics` (:meth:`CurvatureOptimizer.step_statistics`), built in the
   step's graph and reduced over replicas;
2. it skips the step, counting it in :attr:`~CurvatureOptimizer.skipped_steps`, when
   the loss, a gradient or a statistic that must be finite is not, or when the
   statistics say so; weights and state are then untouched;
3. otherwise it runs Keras's own ``apply`` (clipping, weight decay, EMA, constraints,
   distribution), during which ``update_step`` reads the statistics of its variable
   with :meth:`~CurvatureOptimizer.statistics_for`, and then
   :meth:`~CurvatureOptimizer.finish_step`.

Subclasses write ``build``, ``step_statistics``, ``update_step`` (like Keras's Adam) and
optionally ``begin_step`` and ``finish_step``; the math lives in pure functions of tensors
next to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal.keras_privates import use_fresh_collective_keys, variable_index
from keras_curv.optimizers import distribute
from keras_curv.optimizers.batch import TrainBatch
from keras_curv.optimizers.contract import attach, current_batch, model_of


@dataclass
class StepStatistics:
    """What one step's ``update_step`` calls need beyond the gradient.

    Attributes:
        per_variable: Name -> one tensor per trainable variable (``TrainBatch.variables``
            order); :meth:`CurvatureOptimizer.statistics_for` hands each variable its own.
        shared: Name -> a tensor every variable's update reads.
        checks: Tensors that must all be finite for the step to run (agreed over
            replicas); ``None`` entries are ignored.
        proceed: A boolean scalar, equal on every replica, that must hold for the step to
            run (``None``: no condition).
    """

    per_variable: dict[str, Sequence[tf.Tensor]] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    checks: list = field(default_factory=list)
    proceed: tf.Tensor | None = None


# Per optimizer; module-level so that Keras's attribute tracking never sees tensors.
_channels: dict[int, StepStatistics] = {}


class CurvatureOptimizer(keras.optimizers.Optimizer):
    """A ``keras.optimizers.Optimizer`` whose update needs the step's :class:`TrainBatch`.

    Use subclasses as any Keras optimizer: ``model.compile(optimizer=...)`` and
    ``model.fit``, or :func:`keras_curv.curvature_step` in hand-written loops.

    Attributes:
        uses_layer_taps: Whether ``step_statistics`` reads
            :attr:`TrainBatch.layer_calls` (the layer taps are then recorded).
    """

    uses_layer_taps: bool = False

    def __init__(self, *args: Any, gradient_accumulation_steps: int | None = None, **kwargs):
        if gradient_accumulation_steps is not None:
            raise ValueError(
                f"{type(self).__name__} does not support `gradient_accumulation_steps` (its "
                "curvature would be that of the last micro-batch, out of step with the "
                "accumulated gradient); pass gradient_accumulation_steps=None and use a "
                "larger batch instead."
            )
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Creates Keras's state and :attr:`skipped_steps`; attaches to the model if known."""
        if self.built:
            return
        # A new strategy would reuse an earlier one's collective keys (TensorFlow bug).
        use_fresh_collective_keys()
        super().build(var_list)
        # Equal on every replica: "only_first_replica" lets a replica context update it.
        self._skipped_steps = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="int64",
            name="skipped_steps",
            aggregation="only_first_replica",
        )
        # Keras builds the optimizer eagerly, before any trace, under a distribution
        # strategy and when loading a model: attach to the model there.
        model = model_of(self)
        if model is not None:
            if self.uses_layer_taps and tf.executing_eagerly():
                # Taps installed now are in every replica's first trace (installed lazily,
                # during the first replica's apply, the replicas would disagree on whether
                # to retrace).
                attach(model, layer_taps=True)
            self.build_for_model(model)

    def build_for_model(self, model: keras.Model) -> None:
        """Creates state whose shape depends on the model (not only on its variables).

        Called where variables may be created: in :meth:`build` once the model is known,
        and in the first trace of the train step. Must be idempotent.
        """

    @property
    def skipped_steps(self) -> tf.Variable:
        """Steps skipped for a non-finite loss, gradient or statistic.

        Skipped steps leave the weights and all other state untouched (``iterations``
        does not advance). :class:`keras_curv.callbacks.SkippedSteps` logs this count.
        """
        self._check_built()
        return self._skipped_steps

    def _check_built(self) -> None:
        if not self.built:
            raise ValueError(
                f"The {type(self).__name__} optimizer has no state yet: train (or call "
                "`optimizer.build(model.trainable_variables)`) first."
            )

    # ------------------------------------------------------------ the contract

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """This step's statistics, built under ``batch.step_graph()`` and replica-reduced.

        Args:
            batch: The step's batch (one replica's).

        Returns:
            The :class:`StepStatistics` that ``update_step`` reads.
        """
        raise NotImplementedError

    def statistics_for(self, variable: Any) -> dict[str, Any]:
        """This step's statistics for ``variable``: its own per-variable entries and the shared.

        Call it from ``update_step``.

        Raises:
            RuntimeError: called outside the optimizer's ``apply``.
        """
        statistics = _channels.get(id(self))
        if statistics is None:
            raise RuntimeError(
                f"{type(self).__name__}.update_step ran outside apply(): the step's "
                "statistics exist only while the optimizer applies a train step."
            )
        index = variable_index(self, variable)
        own = {name: values[index] for name, values in statistics.per_variable.items()}
        return {**statistics.shared, **own}

    def begin_step(self, statistics: StepStatistics) -> None:
        """Runs before Keras's ``apply`` of an applied (not skipped) step.

        The place to set state that Keras's ``apply`` reads, such as a learning rate
        computed from the statistics (``SketchySGD``'s automatic step size): gradient
        clipping, weight decay and every ``update_step`` then see the new value.
        """

    def finish_step(self, statistics: StepStatistics) -> None:
        """Runs after the per-variable updates of an applied (not skipped) step."""

    # ------------------------------------------------------------------ apply

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Builds this step's statistics, then applies the update or skips the step."""
        grads = list(grads)
        batch = current_batch(self, grads, layer_taps=self.uses_layer_taps)
        if not self.built:
            if trainable_variables is None:
                return super().apply(grads, trainable_variables)  # raises Keras's error
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        if batch is None:
            # A first trace that tf.function discards before running (see contract.py);
            # the last place where model-dependent state can still be created.
            self.build_for_model(model_of(self))
            return
        statistics = distribute.once_per_step(self, batch, lambda: self.step_statistics(batch))
        finite = distribute.all_finite_on_every_replica(
            [*grads, batch.loss, *statistics.checks], batch
        )
        proceed = finite if statistics.proceed is None else finite & statistics.proceed
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        distribute.apply_or_skip(
            proceed,
            self._apply_with,
            (grads, trainable_variables, statistics),
            self._skipped_steps,
        )

    def _apply_with(self, grads, trainable_variables, statistics: StepStatistics) -> None:
        _channels[id(self)] = statistics
        try:
            self.begin_step(statistics)
            super().apply(grads, trainable_variables)
            self.finish_step(statistics)
        finally:
            _channels.pop(id(self), None)
