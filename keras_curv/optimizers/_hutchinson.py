"""Hutchinson probes of the step's Hessian, shared by AdaHessian and Sophia-H.

The probes come from an optimizer-owned ``keras.random.SeedGenerator`` (saved with the
optimizer, so a resumed fit draws the probes the uninterrupted one would). The
generator advances at every step, whether or not the step estimates, so the probe
sequence does not depend on how often estimates are made; the draw itself and the
Hessian-vector products run only on the steps that use them (see
:class:`~keras_curv.optimizers._graph.StepGate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_curv._internal import flat
from keras_curv._internal.keras_privates import stateless_seed
from keras_curv.optimizers import distribute
from keras_curv.optimizers._graph import stacked_map
from keras_curv.optimizers.batch import TrainBatch


def hutchinson_diagonal(
    probes: Sequence[tf.Tensor], products: Sequence[tf.Tensor]
) -> list[tf.Tensor]:
    """``z ⊙ (H z)`` per variable: an unbiased estimate of ``diag(H)`` for Rademacher ``z``.

    Args:
        probes: ``z`` per variable (entries ±1).
        products: ``H z`` per variable.

    Returns:
        One tensor per variable, in the products' dtype.
    """
    return [tf.cast(z, hz.dtype) * hz for z, hz in zip(probes, products)]


def next_seed(generator: keras.random.SeedGenerator, batch: TrainBatch) -> tf.Tensor:
    """Advances ``generator`` once; its seed for ``tf.random.stateless_*`` draws.

    Call it once per step (outside the per-replica statistics): a draw from this seed
    equals ``keras.random``'s draw with ``seed=generator``.
    """
    with batch.step_graph():
        seed = stateless_seed(generator.next())
        if batch.replicas is not None:
            distribute.mirror_copies(generator.state)
    return seed


def rademacher(seed: tf.Tensor, num: int, dim: int) -> tf.Tensor:
    """``(num, dim)`` int32 entries ±1 drawn from ``seed`` (the generator's ``randint`` bits)."""
    bits = tf.random.stateless_uniform((num, dim), seed=seed, minval=0, maxval=2, dtype=tf.int32)
    return 2 * bits - 1


def probe_estimates(batch: TrainBatch, signs: tf.Tensor) -> list[tf.Tensor]:
    """``(1/S) Σ_s z_s ⊙ (H z_s)`` per variable of this replica's loss.

    Args:
        batch: One replica's batch.
        signs: ``(S, dim)`` probes in the flat parameter layout.
    """
    batch.scaled_gradients()  # once, outside the vectorised function below
    shapes = flat.variable_shapes(batch.variables)

    def estimate(flat_signs):
        probes = flat.unflatten(flat_signs, shapes)
        return hutchinson_diagonal(probes, batch.hessian_vector_product(probes))

    if signs.shape[0] == 1:
        return estimate(signs[0])
    return [tf.reduce_mean(e, axis=0) for e in stacked_map(estimate, signs)]
