r"""The optimizer protocol for Keras's own optimizers, read from their slots.

Keras's SGD, Adam (and AdamW) and RMSprop do not implement
:mod:`~keras_curv.callbacks._protocol`; their preconditioners are read here from the
optimizer's state (through :func:`~keras_curv._internal.keras_privates.optimizer_slots`),
exactly as their ``update_step`` uses it (:math:`t`: steps taken so far; the update is
:math:`\theta \leftarrow \theta - \eta P^{-1} u`):

* SGD: :math:`P = I`; threshold of gradient descent, heavy ball or Nesterov;
* Adam, AdamW: :math:`P = (\sqrt{v} + \epsilon) / \sqrt{1 - \beta_2^t}` (:math:`\hat v`
  with ``amsgrad``), the exact denominator of Keras's update; EMA threshold in
  :math:`\beta_1`;
* RMSprop: :math:`P = \sqrt{v + \epsilon}` (:math:`\sqrt{v - \bar g^2 + \epsilon}` when
  ``centered``); heavy-ball threshold in ``momentum``.

AdamW's decoupled weight decay adds :math:`\eta \lambda_{wd}` to the effective curvature
and is left out. Other Keras optimizers (Adagrad, Nadam, Adamax, Lion, ...) have no
adapter: the callbacks then log the plain sharpness only.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.keras_privates import optimizer_slots, variable_index
from keras_curv.curvature.operators import LinearOperator
from keras_curv.curvature.stability import stability_threshold
from keras_curv.curvature.structured import DiagonalOperator, IdentityOperator


def learning_rate(optimizer: Any) -> float | None:
    """The optimizer's current learning rate (schedules evaluated), or ``None``."""
    try:
        value = float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _flat_slots(optimizer: Any, slots: list, variables: list) -> tf.Tensor:
    """The slots of ``variables`` (in the model's order) as one flat float vector."""
    return tf.concat(
        [
            tf.reshape(tf.convert_to_tensor(slots[variable_index(optimizer, v)]), [-1])
            for v in variables
        ],
        axis=0,
    )


def _adam(optimizer: Any, variables: list) -> LinearOperator | None:
    steps = int(keras.ops.convert_to_numpy(optimizer.iterations))
    if steps == 0:
        return None
    kind = "velocity_hat" if optimizer.amsgrad else "velocity"
    v = _flat_slots(optimizer, optimizer_slots(optimizer, "adam", kind), variables)
    correction = np.sqrt(1.0 - optimizer.beta_2**steps)
    return DiagonalOperator((tf.sqrt(v) + optimizer.epsilon) / correction)


def _rmsprop(optimizer: Any, variables: list) -> LinearOperator | None:
    if int(keras.ops.convert_to_numpy(optimizer.iterations)) == 0:
        return None
    v = _flat_slots(optimizer, optimizer_slots(optimizer, "rmsprop", "velocity"), variables)
    if optimizer.centered:
        mean = _flat_slots(
            optimizer, optimizer_slots(optimizer, "rmsprop", "average_gradient"), variables
        )
        v = v - tf.square(mean)
    return DiagonalOperator(tf.sqrt(v + optimizer.epsilon))


def keras_preconditioning(optimizer: Any, variables: list) -> tuple[LinearOperator, float] | None:
    """``(P, threshold)`` of a Keras SGD, Adam(W) or RMSprop optimizer; ``None`` otherwise.

    ``None`` too before the optimizer's first step (its slots are still zero) and when its
    learning rate is not a positive number.
    """
    lr = learning_rate(optimizer)
    if lr is None or not optimizer.built:
        return None
    dim = int(sum(int(np.prod(v.shape)) for v in variables))
    if isinstance(optimizer, keras.optimizers.SGD):
        rule = "nesterov" if optimizer.nesterov else "heavy_ball"
        threshold = stability_threshold(lr, float(optimizer.momentum), rule)
        return IdentityOperator(dim, 1.0, variables[0].dtype), threshold
    if isinstance(optimizer, keras.optimizers.Adam):
        operator = _adam(optimizer, variables)
        threshold = stability_threshold(lr, float(optimizer.beta_1), "ema")
    elif isinstance(optimizer, keras.optimizers.RMSprop):
        operator = _rmsprop(optimizer, variables)
        threshold = stability_threshold(lr, float(optimizer.momentum), "heavy_ball")
    else:
        return None
    return None if operator is None else (operator, threshold)
