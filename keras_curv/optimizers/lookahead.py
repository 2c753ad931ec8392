"""Lookahead (Zhang, Lucas, Hinton, Ba 2019; survey §3.11): slow weights over any optimizer.

The math is :func:`lookahead_slow_weights`; :class:`Lookahead` is the Keras wrapper
around it. ``docs/sketchy_sgd.md`` explains the choices.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import validation
from keras_curv._internal.keras_privates import maybe_merge_call, variable_index
from keras_curv._internal.numerics import exact_cast


def _handle(variable: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (what ``extended.update`` takes)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def lookahead_slow_weights(fast: Any, slow: Any, slow_step_size: float) -> Any:
    """``φ + α (θ − φ)``: the slow weights after a synchronisation (the fast ones reset to it).

    Args:
        fast: ``θ``, the weights after ``k`` steps of the inner optimizer.
        slow: ``φ``, the slow weights.
        slow_step_size: ``α`` in ``(0, 1]``.
    """
    return slow + exact_cast(slow_step_size, slow.dtype) * (fast - slow)


@keras.saving.register_keras_serializable(package="keras_curv")
class Lookahead(keras.optimizers.Optimizer):
    r"""Lookahead: the inner optimizer moves fast weights; every ``k`` steps the slow ones follow.

    ```
    θ ← A(θ, g)                          (every step: the inner optimizer A)
    every k-th step of A:  φ ← φ + α (θ − φ),  θ ← φ
    ```

    with ``k = sync_period`` and ``α = slow_step_size``; ``φ`` starts at the initial
    weights. It wraps any Keras or keras-curv optimizer (curvature optimizers still see
    their batch), and mixed precision wraps it in turn
    (``LossScaleOptimizer(Lookahead(...))``). A step the inner optimizer skips (a
    non-finite batch) is not counted. ``learning_rate``, ``iterations`` and the
    keras-curv protocol (``skipped_steps``, ``curvature_summary()``) are the inner
    optimizer's; the slow weights are saved with the optimizer. See
    ``docs/sketchy_sgd.md``.

    Args:
        inner_optimizer: The optimizer to wrap (an instance).
        sync_period: ``k``, inner steps between synchronisations (int ≥ 1).
        slow_step_size: ``α``, in ``(0, 1]``.
        name: Name of the optimizer.

    Example:
        >>> model.compile(optimizer=keras_curv.Lookahead(keras.optimizers.Adam()), loss="mse")
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        sync_period: int = 5,
        slow_step_size: float = 0.5,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"Lookahead does not take {sorted(kwargs)}: set them on the inner "
                "optimizer, e.g. Lookahead(keras.optimizers.Adam(weight_decay=0.01))."
            )
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer instance; received "
                f"inner_optimizer={inner_optimizer!r}."
            )
        super().__init__(learning_rate=0.0, name=name or f"lookahead_{inner_optimizer.name}")
        self.inner_optimizer = inner_optimizer
        self.sync_period = validation.integer(sync_period, "sync_period", minimum=1)
        self.slow_step_size = validation.number(
            slow_step_size, "slow_step_size", low=0.0, high=1.0, low_open=True
        )

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Builds the inner optimizer and the slow weights, equal to the current weights."""
        if self.built:
            return
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._slow_weights = []
        for variable in var_list:
            # An eager snapshot: an initializer that read the variable inside the traced
            # train step could not be lifted out of it, and tf.function would then run
            # its variable-creating first trace (a curvature optimizer's empty one).
            with tf.init_scope():
                value = tf.identity(_handle(variable))

            def initial(shape, dtype, value=value):
                return tf.cast(value, dtype)

            self._slow_weights.append(
                self.add_variable_from_reference(variable, name="slow", initializer=initial)
            )

    @property
    def variables(self) -> list:
        return self._variables + self.inner_optimizer.variables

    @property
    def slow_weights(self) -> list:
        """``φ``, one per trainable variable."""
        if not self.built:
            raise ValueError("The Lookahead optimizer has no slow weights yet: train first.")
        return list(self._slow_weights)

    def load_own_variables(self, store: Any) -> None:
        """Restores the slow weights, then lets the inner optimizer restore its own state.

        The inner optimizer reads its part of ``store`` renumbered from 0, so one that
        creates state lazily (``ClassSubspaceNewton``) restores as it does unwrapped.
        """
        own = self._variables
        for i, variable in enumerate(own):
            variable.assign(store[str(i)])
        rest = {str(i - len(own)): store[str(i)] for i in range(len(own), len(store.keys()))}
        self.inner_optimizer.load_own_variables(rest)

    # ------------------------------------------------------------------ apply

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """One step of the inner optimizer, then the slow weights every ``k``-th of them."""
        grads = list(grads)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables or self._trainable_variables))
        variables = list(trainable_variables or self._trainable_variables)
        before = tf.convert_to_tensor(self.inner_optimizer.iterations)
        self.inner_optimizer.apply(grads, trainable_variables)
        after = tf.convert_to_tensor(self.inner_optimizer.iterations)
        period = tf.constant(self.sync_period, after.dtype)
        synchronise = tf.logical_and(after > before, tf.equal(after % period, 0))
        maybe_merge_call(self._synchronise, variables, synchronise)

    def _synchronise(self, strategy, variables: list, synchronise: Any) -> None:
        def update(fast, slow, flag):
            def sync():
                value = lookahead_slow_weights(fast, slow, self.slow_step_size)
                slow.assign(value)
                fast.assign(value)

            tf.cond(flag, sync, lambda: None)

        for variable in variables:
            slow = self._slow_weights[variable_index(self, variable)]
            strategy.extended.update(
                _handle(variable), update, args=(_handle(slow), synchronise), group=False
            )

    # ------------------------------------------------------------ delegation

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: list) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "sync_period": self.sync_period,
            "slow_step_size": self.slow_step_size,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> Lookahead:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)
