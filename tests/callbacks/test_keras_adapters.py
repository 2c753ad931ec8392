"""Keras optimizers seen through the protocol: P and the threshold as their update uses them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks._keras_adapters import keras_preconditioning, learning_rate


def trained(optimizer, steps=3):
    variables = [keras.Variable(np.ones((2, 3), "float32")), keras.Variable(np.ones(2, "float32"))]
    optimizer.build(variables)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        grads = [tf.constant(rng.standard_normal(v.shape), tf.float32) for v in variables]
        optimizer.apply(grads, variables)
    return variables


def next_step(optimizer, variables, gradient):
    """The change of the flat weights on the next step with ``gradient``."""
    before = np.concatenate([v.numpy().reshape(-1) for v in variables])
    parts = np.split(gradient, [6])
    optimizer.apply(
        [tf.constant(p.reshape(v.shape), tf.float32) for p, v in zip(parts, variables)], variables
    )
    return np.concatenate([v.numpy().reshape(-1) for v in variables]) - before


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_step_is_lr_p_inverse_g(centered):
    optimizer = keras.optimizers.RMSprop(0.01, centered=centered)
    variables = trained(optimizer)
    g = np.random.default_rng(1).standard_normal(8)
    # RMSprop's v after the next step, then P from the protocol applied to g.
    operator, threshold = keras_preconditioning(optimizer, variables)
    p_now = operator.diagonal.numpy() ** 2 - optimizer.epsilon  # v (- mean²) before the step
    step = next_step(optimizer, variables, g)
    v = np.concatenate([s.numpy().reshape(-1) for s in optimizer._velocities])
    if centered:
        mean = np.concatenate([s.numpy().reshape(-1) for s in optimizer._average_gradients])
        v = v - mean**2
    np.testing.assert_allclose(step, -0.01 * g / np.sqrt(v + optimizer.epsilon), rtol=1e-5)
    assert np.all(p_now > -1e-7) and threshold == pytest.approx(2 / 0.01)


def test_adam_preconditioner_is_the_denominator_of_its_update():
    optimizer = keras.optimizers.Adam(0.01, beta_1=0.0)  # no momentum: the step is P⁻¹ g
    variables = trained(optimizer)
    g = np.random.default_rng(2).standard_normal(8)
    step = next_step(optimizer, variables, g)
    operator, threshold = keras_preconditioning(optimizer, variables)  # after the step
    # float32 weights near 1: the step is exact to about 1e-7 absolute.
    np.testing.assert_allclose(step, -0.01 * g / operator.diagonal.numpy(), rtol=1e-4, atol=3e-7)
    assert threshold == pytest.approx(2 / 0.01)  # beta_1 = 0: gradient descent


def test_sgd_identity_thresholds_and_unsupported_optimizers():
    for kwargs, expected in (({}, 2 / 0.1), ({"momentum": 0.9}, 3.8 / 0.1)):
        optimizer = keras.optimizers.SGD(0.1, **kwargs)
        variables = trained(optimizer, 1)
        operator, threshold = keras_preconditioning(optimizer, variables)
        assert operator.dim == 8 and threshold == pytest.approx(expected)
    nesterov = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    assert keras_preconditioning(nesterov, trained(nesterov, 1))[1] == pytest.approx(3.8 / 0.28)
    adagrad = keras.optimizers.Adagrad()
    assert keras_preconditioning(adagrad, trained(adagrad, 1)) is None
    fresh = keras.optimizers.Adam()
    fresh.build([keras.Variable(np.ones(2, "float32"))])
    assert keras_preconditioning(fresh, fresh._trainable_variables) is None  # no step yet
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    decayed = keras.optimizers.SGD(schedule)
    trained(decayed, 2)
    assert learning_rate(decayed) == pytest.approx(0.025)
