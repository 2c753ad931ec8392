"""The shell shared by the full-batch solvers, in ``fit`` and in :func:`~keras_curv.minimize`.

A solver writes one method, ``solve(problem, w, f, g) -> StepOutcome``: from the flat
weights ``w``, the loss ``f`` and gradient ``g`` there, and a *problem* that evaluates
the loss, its gradient and curvature products at any flat weights, it returns the
step and its new state. The same ``solve`` runs in two places:

* in ``model.fit``, on the step's batch: the problem is :class:`BatchProblem`, whose
  evaluations are :class:`~keras_curv.optimizers.TrainBatch`'s ``loss_at``,
  ``loss_and_gradient`` and ``*_at`` products, summed over replicas;
* in :func:`~keras_curv.minimize`, on a fixed data set: the problem is
  :class:`~keras_curv.optimizers.objective.FullBatchObjective`, accumulated exactly
  over the data's batches.

The line searches make these methods meaningful only on a fixed objective. In ``fit``
that means a fixed full batch (``batch_size=len(x)``, ``shuffle`` irrelevant); each
step compares a fingerprint of its batch (size and sums of the inputs, targets and
weights) with the previous step's, counts the changes in :attr:`batch_changes` and
warns once (``docs/full_batch.md``, "On mini-batches").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_curv._internal import flat
from keras_curv._internal.keras_privates import (
    flatten_layers,
    has_random_state,
    strategy_needs_merge_call,
    under_xla,
)
from keras_curv._internal.losses import piecewise_linear_loss
from keras_curv._internal.numerics import curvature_dtype, exact_cast
from keras_curv.optimizers import distribute
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch
from keras_curv.optimizers.contract import every_replica


class StepOutcome(NamedTuple):
    """One step of a full-batch solver.

    Attributes:
        step: The flat update ``Δθ`` (zeros when the step was rejected).
        loss: ``f(θ + Δθ)`` (``f(θ)`` when rejected).
        gradient: ``∇f(θ + Δθ)`` when the line search computed it, else ``None``.
        statistics: Scalars for the logs (``step_size``, ``function_evaluations``,
            ``cg_iterations``, ``hessian_vector_products`` and the solver's own).
        state: New values of the solver's state variables, by name.
    """

    step: tf.Tensor
    loss: tf.Tensor
    gradient: tf.Tensor | None
    statistics: dict[str, tf.Tensor]
    state: dict[str, tf.Tensor]


# Logged by every solver (curvature_summary, the minimize logs), in this order.
COMMON_STATISTICS = (
    "step_size",
    "function_evaluations",
    "cg_iterations",
    "hessian_vector_products",
)


class BatchProblem:
    """The loss of one train step's batch as a function of flat weights (the ``fit`` problem).

    Every evaluation is a fresh stateless forward pass on the step's batch
    (:meth:`TrainBatch.loss_at` and the ``*_at`` products), so that it can run inside
    the solvers' ``tf.while_loop`` bodies; under a distribution strategy each is summed
    over the replicas (an all-reduce, or a plain sum where every replica's batch is in
    the step graph).
    """

    def __init__(self, batch: TrainBatch, dtype: tf.DType):
        self.batch = batch
        self.dtype = dtype
        self.shapes = flat.variable_shapes(batch.variables)
        self.replicas = batch.replicas

    def _sum(self, fn: Callable[[TrainBatch], Any]) -> Any:
        if self.replicas is None:
            return distribute.all_reduce_sum(fn(self.batch))
        parts = []
        for replica in self.replicas:
            with tf.device(replica.device):
                parts.append(fn(replica))
        return tf.nest.map_structure(lambda *p: tf.add_n(list(p)), *parts)

    def _values(self, w: tf.Tensor) -> list[tf.Tensor]:
        return flat.unflatten(w, self.shapes)

    def _flat(self, tensors: list[tf.Tensor]) -> tf.Tensor:
        return flat.flatten(tensors, self.dtype)

    def value(self, w: tf.Tensor) -> tf.Tensor:
        return self._sum(lambda b: tf.cast(b.loss_at(self._values(w)), self.dtype))

    def value_and_gradient(self, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        def one(b):
            loss, grads = b.loss_and_gradient(self._values(w))
            return tf.cast(loss, self.dtype), self._flat(grads)

        return self._sum(one)

    def hessian_vector_product(self, w: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        return self._sum(
            lambda b: self._flat(b.hessian_vector_product_at(self._values(w), self._values(v)))
        )

    def gauss_newton_vector_product(self, w: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        return self._sum(
            lambda b: self._flat(b.gauss_newton_vector_product_at(self._values(w), self._values(v)))
        )

    def start(self, fresh: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(w, f, g)`` at the step's weights: the step's own loss and gradient, or (for a
        model that draws random numbers) those of ``loss_at``, whose draws every trial
        point of the line search shares."""
        w = self._flat(self.batch.handles())
        if fresh:
            f, g = self.value_and_gradient(w)
        else:
            f, g = self._sum(lambda b: (tf.cast(b.loss, self.dtype), self._flat(b.gradients())))
        return w, f, g

    def fingerprint(self) -> tf.Tensor:
        """``[rows, Σx, Σx², Σy, Σy², Σw]`` of the (global) batch, in float64."""

        def sums(structure):
            leaves = [tf.cast(t, tf.float64) for t in tf.nest.flatten(structure) if t is not None]
            if not leaves:
                return tf.zeros([], tf.float64), tf.zeros([], tf.float64)
            return (
                tf.add_n([tf.reduce_sum(t) for t in leaves]),
                tf.add_n([tf.reduce_sum(t * t) for t in leaves]),
            )

        def one(b):
            rows = tf.cast(tf.shape(tf.nest.flatten(b.x)[0])[0], tf.float64)
            x1, x2 = sums(b.x)
            y1, y2 = sums(b.y)
            w1, _ = sums(b.sample_weight)
            return tf.stack([rows, x1, x2, y1, y2, w1])

        return self._sum(one)


class FullBatchOptimizer(CurvatureOptimizer):
    """Base of :class:`~keras_curv.LBFGS`, :class:`~keras_curv.NewtonCG`,
    :class:`~keras_curv.NysNewtonCG` and :class:`~keras_curv.LevenbergMarquardt`.

    Subclasses define ``STATISTICS`` (their logged scalars beyond the common ones),
    ``build_state(dim, dtype) -> {name: variable}`` and ``solve``. ``learning_rate``
    is the line search's first trial step (1 by default, the Newton step).

    Attributes:
        needs_curvature: Whether the solver uses second derivatives (refuses losses
            without them).
    """

    STATISTICS: tuple[str, ...] = ()
    needs_curvature = True

    def __init__(self, learning_rate: Any = 1.0, name: str | None = None, **kwargs: Any):
        for key in ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"{type(self).__name__} does not support `{key}`: its line search "
                    "evaluates the loss along the step it takes, so a step changed after "
                    "the search would break its guarantees. Put an L2 penalty in the loss "
                    "(a kernel_regularizer) instead of weight_decay, and leave "
                    f"{key}=None."
                )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._mini_batch_warned = False

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Creates the solver's state, the batch fingerprint and the logged statistics."""
        if self.built:
            return
        super().build(var_list)
        self.flat_dim = flat.flat_dim(var_list)
        self.flat_dtype = curvature_dtype(var_list[0].dtype)
        shared = {"aggregation": "only_first_replica"}
        self._fingerprint = self.add_variable(
            (6,), dtype="float64", name="batch_fingerprint", **shared
        )
        self._batch_changes = self.add_variable((), dtype="int64", name="batch_changes", **shared)
        self._state = self.build_state(self.flat_dim, self.flat_dtype)
        self._statistics = {
            name: self.add_variable((), dtype=self.flat_dtype, name=name, **shared)
            for name in ("loss", *COMMON_STATISTICS, *self.STATISTICS)
        }

    def build_state(self, dim: int, dtype: tf.DType) -> dict[str, Any]:
        """Creates the solver's state variables (``add_variable``); returns them by name."""
        raise NotImplementedError

    def state_variable(self, shape: tuple, dtype: Any, name: str, value: float = 0.0):
        """An optimizer variable filled with ``value`` (exactly, also in float64), equal on
        every replica, saved with the optimizer."""

        def initializer(shape, dtype=None):
            dtype = tf.as_dtype(dtype)
            return tf.fill(shape, exact_cast(value if dtype.is_floating else int(value), dtype))

        return self.add_variable(
            shape, initializer=initializer, dtype=dtype, name=name, aggregation="only_first_replica"
        )

    @property
    def batch_changes(self) -> tf.Variable:
        """Steps whose batch differed from the previous step's (0 on a fixed full batch)."""
        self._check_built()
        return self._batch_changes

    # ------------------------------------------------------------------ solving

    def solve(
        self, problem: Any, w: tf.Tensor, loss: tf.Tensor, gradient: tf.Tensor
    ) -> StepOutcome:
        """One step from ``w`` (loss ``f``, gradient ``g``) on ``problem``."""
        raise NotImplementedError

    def initial_step(self, dtype: tf.DType) -> tf.Tensor:
        """The line search's first trial step: the current learning rate."""
        return tf.cast(self.learning_rate, dtype)

    def commit(self, outcome: StepOutcome) -> None:
        """Writes a step's new state and statistics (after the step was applied)."""
        for name, value in outcome.state.items():
            self.assign(self._state[name], tf.cast(value, self._state[name].dtype))
        for name, variable in self._statistics.items():
            value = outcome.loss if name == "loss" else outcome.statistics[name]
            self.assign(variable, tf.cast(value, variable.dtype))

    def check_model(self, model: keras.Model, loss: Any) -> None:
        """Refuses what cannot work: a loss without second derivatives for a Newton method."""
        name = piecewise_linear_loss(loss)
        if self.needs_curvature and name is not None:
            raise ValueError(
                f"{type(self).__name__} needs second derivatives of the loss, and "
                f"{name!r} is piecewise linear in the outputs (zero curvature almost "
                "everywhere). Use a smooth loss (mean_squared_error, huber, "
                "cross-entropy) or keras_curv.LBFGS."
            )

    # ------------------------------------------------------------------ fit

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """Solves one step on the batch and fingerprints the batch."""
        model = batch.model
        self.check_model(model, getattr(model, "loss", None))
        context = tf.distribute.get_replica_context()
        if batch.replicas is None and batch.num_replicas > 1 and strategy_needs_merge_call():
            # No collective can run inside the solvers' while loops: solve once, in a
            # merge_call, on every replica's batch of the step graph (plain sums).
            def solve_once(distribution):
                return self._solve_batch(every_replica(self, batch)[0])

            outcome, fingerprint, changed = context.merge_call(solve_once)
        else:
            outcome, fingerprint, changed = self._solve_batch(batch)
        steps = flat.unflatten(outcome.step, flat.variable_shapes(batch.variables))
        return StepStatistics(
            per_variable={"step": steps},
            shared={"outcome": outcome, "fingerprint": fingerprint, "changed": changed},
            checks=[outcome.step, outcome.loss],
        )

    def _solve_batch(self, batch: TrainBatch) -> tuple[StepOutcome, tf.Tensor, tf.Tensor]:
        fresh = any(has_random_state(layer) for layer in flatten_layers(batch.model))
        with batch.step_graph():
            problem = BatchProblem(batch, self.flat_dtype)
            w, f, g = problem.start(fresh)
            outcome = self.solve(problem, w, f, g)
            fingerprint = problem.fingerprint()
            previous = tf.convert_to_tensor(self._fingerprint)
            differs = (
                tf.abs(fingerprint - previous)
                > 1e-6 * (tf.abs(fingerprint) + tf.abs(previous)) + 1e-12
            )
            changed = tf.logical_and(self.iterations > 0, tf.reduce_any(differs))
            if not under_xla():
                first = tf.logical_and(changed, tf.equal(self._batch_changes, 0))
                tf.cond(
                    first,
                    lambda: tf.py_function(self._warn_mini_batch, [], Tout=tf.bool),
                    lambda: tf.constant(False),
                )
        return outcome, fingerprint, changed

    def _warn_mini_batch(self) -> bool:
        if not self._mini_batch_warned:
            self._mini_batch_warned = True
            warnings.warn(
                f"{type(self).__name__} is a full-batch method, and its batch changed from "
                "one step to the next: each step's line search and curvature then see only "
                "that batch, so training is a stochastic method without convergence "
                "guarantees (see docs/full_batch.md, 'On mini-batches'). Train with "
                "batch_size=len(x), or use keras_curv.minimize.",
                UserWarning,
                stacklevel=2,
            )
        return True

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Adds this step's (line-searched) update to ``variable``."""
        step = self.statistics_for(variable)["step"]
        self.assign_add(variable, tf.cast(step, variable.dtype))

    def finish_step(self, statistics: StepStatistics) -> None:
        self.commit(statistics.shared["outcome"])
        self.assign(self._fingerprint, statistics.shared["fingerprint"])
        self._batch_changes.assign_add(tf.cast(statistics.shared["changed"], tf.int64))

    # ------------------------------------------------------------- diagnostics

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The last step's statistics, ``batch_changes`` and ``skipped_steps`` (read only)."""
        self._check_built()
        summary = {name: tf.cast(v, tf.float32) for name, v in self._statistics.items()}
        summary["batch_changes"] = tf.cast(self._batch_changes, tf.float32)
        summary["skipped_steps"] = tf.cast(self._skipped_steps, tf.float32)
        return summary
