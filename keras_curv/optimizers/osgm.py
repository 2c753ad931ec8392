"""OSGM (Gao, Chu, Ye, Udell 2024): gradient descent with an online-learned diagonal scaling.

The math is in the pure functions :func:`osgm_hypergradient` and :func:`osgm_scale`;
:class:`OSGM` is the Keras shell around them. ``docs/sketchy_sgd.md`` explains the choices.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from keras_curv._internal import validation
from keras_curv._internal.keras_privates import variable_index
from keras_curv._internal.numerics import curvature_dtype, exact_cast
from keras_curv.optimizers import distribute
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch

# Losses below this are treated as this (the surrogate divides by the previous loss).
LOSS_FLOOR = 1e-12


def osgm_hypergradient(gradient: Any, previous_gradient: Any, previous_loss: Any) -> Any:
    """``h = g_k ⊙ g_{k−1} / f_{k−1}``: minus the gradient of the surrogate in ``P_{k−1}``.

    For ``ℓ(P) = f(x − P ⊙ g_{k−1}) / f(x)`` at ``x = x_{k−1}``,
    ``∂ℓ/∂P = −∇f(x − P ⊙ g_{k−1}) ⊙ g_{k−1} / f(x)``, and ``∇f(x − P ⊙ g_{k−1})`` is the
    next step's gradient ``g_k`` (on the next batch). ``f_{k−1}`` is floored at
    ``LOSS_FLOOR``.
    """
    floor = exact_cast(LOSS_FLOOR, previous_gradient.dtype)
    loss = ops.maximum(ops.cast(previous_loss, previous_gradient.dtype), floor)
    return ops.cast(gradient, previous_gradient.dtype) * previous_gradient / loss


def osgm_scale(
    scale: Any,
    accumulator: Any,
    hypergradient: Any,
    learning_rate: Any,
    max_scale: float,
    epsilon: float,
) -> tuple[Any, Any]:
    """One AdaGrad step of the online learner on ``P``, projected onto ``[0, max_scale]``.

    ```
    v ← v + h²,     P ← clip(P + η h / (√v + ε), 0, max_scale)
    ```

    Returns:
        ``(P, v)`` after the step.
    """
    dtype = scale.dtype
    accumulator = accumulator + ops.square(hypergradient)
    step = exact_cast(learning_rate, dtype) * hypergradient
    step = step / (ops.sqrt(accumulator) + exact_cast(epsilon, dtype))
    return ops.clip(scale + step, 0.0, exact_cast(max_scale, dtype)), accumulator


@keras.saving.register_keras_serializable(package="keras_curv")
class OSGM(CurvatureOptimizer):
    r"""Online scaled gradient method: ``θ ← θ − P ⊙ g`` with a diagonal ``P`` learned online.

    At step ``k``, with the batch gradient ``g_k`` and the previous step's batch loss
    ``f_{k−1}``:

    ```
    h_k = g_k ⊙ g_{k−1} / f_{k−1}                     (−∇ of f(x − P g)/f(x) in P)
    v   ← v + h_k²
    P   ← clip(P + η h_k / (√v + ε), 0, max_scale)     (AdaGrad on the surrogate)
    b   ← β b + P ⊙ g_k,     θ ← θ − b                 (β = momentum)
    ```

    The surrogate ``ℓ_x(P) = f(x − P∇f(x)) / f(x)`` is the contraction factor of one
    step, with ``f* = 0`` in place of the unknown optimum (losses are ≥ 0); its
    gradient needs ``∇f`` at the point the step reached, which is the next step's
    gradient, so it costs no extra pass (it is measured on the next batch: an unbiased
    estimate of the full loss's hypergradient). See ``docs/sketchy_sgd.md``.

    Args:
        learning_rate: ``η``, the online learner's step (float, schedule or callable):
            how fast ``P`` moves.
        initial_scale: ``P`` at the start, in ``[0, max_scale]``.
        max_scale: Upper bound of every entry of ``P`` (> 0).
        momentum: Heavy-ball ``β`` in ``[0, 1)`` (the slides' best variant uses it).
        epsilon: AdaGrad's ``ε`` (> 0).
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay``, ``clipnorm``...).

    Example:
        >>> model.compile(optimizer=keras_curv.OSGM(1e-3), loss="mse")
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        initial_scale: float = 0.0,
        max_scale: float = 1.0,
        momentum: float = 0.9,
        epsilon: float = 1e-12,
        name: str = "osgm",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.max_scale = validation.positive(max_scale, "max_scale")
        self.initial_scale = validation.number(
            initial_scale, "initial_scale", low=0.0, high=self.max_scale
        )
        self.momentum = validation.decay(momentum, "momentum")
        self.epsilon = validation.positive(epsilon, "epsilon")

    def build(self, var_list: list) -> None:
        """Creates ``P``, AdaGrad's ``v``, the previous gradient and loss, and ``b``."""
        if self.built:
            return
        super().build(var_list)
        names = ["accumulator", "previous_gradient"] + (["velocity"] if self.momentum else [])
        slots = self.add_optimizer_variables(var_list, names)
        self._accumulators, self._previous_gradients = slots[0], slots[1]
        self._velocities = slots[2] if self.momentum else []

        def initial(shape, dtype):
            # Not keras.initializers.Constant: it rounds the value through float32.
            return tf.fill(shape, exact_cast(self.initial_scale, dtype))

        self._scales = [
            self.add_variable_from_reference(v, name="scale", initializer=initial) for v in var_list
        ]
        self._previous_loss = self.add_variable(
            (),
            initializer="ones",
            dtype=curvature_dtype(var_list[0].dtype),
            name="previous_loss",
            aggregation="only_first_replica",
        )

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """The batch loss ``f_k`` (summed over replicas: the global batch mean)."""

        def total(replica):
            return (yield tf.cast(replica.loss, self._previous_loss.dtype))

        with batch.step_graph():
            loss = distribute.replica_sum(batch, total)
        return StepStatistics(shared={"loss": loss})

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """``P ← clip(P + η h/(√v+ε))``, then ``θ ← θ − (β b + P ⊙ g)`` for one variable."""
        index = variable_index(self, variable)
        scale, accumulator = self._scales[index], self._accumulators[index]
        previous = self._previous_gradients[index]
        gradient = ops.cast(tf.convert_to_tensor(gradient), variable.dtype)  # dense
        hypergradient = osgm_hypergradient(gradient, previous, self._previous_loss)
        new_scale, new_accumulator = osgm_scale(
            scale, accumulator, hypergradient, learning_rate, self.max_scale, self.epsilon
        )
        self.assign(scale, new_scale)
        self.assign(accumulator, new_accumulator)
        self.assign(previous, gradient)
        step = new_scale * gradient
        if self.momentum:
            velocity = self._velocities[index]
            step = exact_cast(self.momentum, variable.dtype) * velocity + step
            self.assign(velocity, step)
        self.assign_sub(variable, step)

    def finish_step(self, statistics: StepStatistics) -> None:
        self._previous_loss.assign(tf.cast(statistics.shared["loss"], self._previous_loss.dtype))

    @property
    def scales(self) -> list:
        """``P``, one tensor per trainable variable."""
        self._check_built()
        return list(self._scales)

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """``mean_scale``, ``largest_scale`` (of the entries of ``P``) and ``skipped_steps``."""
        self._check_built()
        total = tf.add_n([tf.reduce_sum(tf.cast(s, tf.float32)) for s in self._scales])
        count = sum(int(tf.size(s)) for s in self._scales)
        largest = tf.reduce_max(
            tf.stack([tf.reduce_max(tf.cast(s, tf.float32)) for s in self._scales])
        )
        return {
            "mean_scale": total / float(count),
            "largest_scale": largest,
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "initial_scale": self.initial_scale,
                "max_scale": self.max_scale,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
            }
        )
        return config
