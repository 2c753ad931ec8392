"""Sophia through compile/fit: golden values against NumPy, and Keras's features."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv._internal.keras_privates import stateless_seed
from keras_curv.optimizers import Sophia
from tests.conftest import float64_everywhere

LOGITS_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _draw(seed: int, step: int, shape, kind: str) -> np.ndarray:
    """The random numbers Sophia draws at ``step`` (its generator's state is (seed, step))."""
    pair = stateless_seed(tf.constant([seed, step], tf.int64))
    if kind == "rademacher":
        bits = tf.random.stateless_uniform(shape, seed=pair, minval=0, maxval=2, dtype=tf.int32)
        return 2.0 * bits.numpy() - 1.0
    return tf.random.stateless_uniform(shape, seed=pair, dtype=tf.float64).numpy()


def _augmented(x):
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _numpy_sophia(theta, batches, gradient, estimate, *, lr, b1, b2, rho, eps, wd, k, bs=1.0):
    """The authors' rule (NOTES.md), the weights as one (d+1, o) matrix [W; b].

    ``estimate(theta, batch, t)`` is the curvature estimate in the same shape; ``bs``
    the batch-size factor of the official SophiaG denominator ``ρ·bs·h + ε``.
    """
    m = np.zeros_like(theta)
    h = np.zeros_like(theta)
    clipped = None
    for t, batch in enumerate(batches):
        g = gradient(theta, batch)
        if t >= k and t % k == 0:
            h = b2 * h + (1 - b2) * estimate(theta, batch, t)
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        ratio = np.abs(m) / (rho * bs * np.maximum(h, 0) + eps)
        theta = theta - lr * np.sign(m) * np.minimum(ratio, 1)
        clipped = float(np.mean(ratio >= 1))
    return theta, clipped


# Keras's weight decay casts its Python float through float32 (even for float64
# variables): a decay exact in float32 keeps the comparison float64-tight.
WD = 0.125


def _fit(model, optimizer, x, y, batch_size, epochs, sample_weight=None, loss="mse"):
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(
        x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=epochs,
        shuffle=False, verbose=0,
    )  # fmt: skip
    kernel, bias = model.get_weights()
    return np.concatenate([kernel, bias[None]], axis=0)


def test_sophia_h_golden_values_through_fit():
    """Least squares with a dense Hessian; the probes are redrawn from the seed."""
    rng = np.random.default_rng(0)
    n, d, o, batch, epochs = 24, 3, 2, 6, 3
    x = rng.normal(size=(n, d)) * [1.0, 2.0, 0.5]
    y = rng.normal(size=(n, o))
    settings = dict(lr=0.05, b1=0.9, b2=0.5, rho=0.3, eps=1e-12, wd=WD, k=2)

    def gradient(theta, batch):
        xa, yb = batch
        return 2.0 / yb.size * xa.T @ (xa @ theta - yb)

    def estimate(theta, batch, t):
        xa, yb = batch
        hessian = 2.0 / yb.size * np.kron(xa.T @ xa, np.eye(o))  # row-major [W; b]
        u = _draw(7, t, (1, theta.size), "rademacher")[0]
        return (u * (hessian @ u)).reshape(theta.shape)

    with float64_everywhere():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(o)])
        kernel, bias = model.get_weights()
        theta0 = np.concatenate([kernel, bias[None]], axis=0)
        optimizer = Sophia(
            settings["lr"], beta_1=0.9, beta_2=0.5, rho=0.3, weight_decay=WD,
            update_every=2, seed=7,
        )  # fmt: skip
        got = _fit(model, optimizer, x, y, batch, epochs)
    batches = [(_augmented(x[i : i + batch]), y[i : i + batch]) for i in range(0, n, batch)]
    expected, clipped = _numpy_sophia(theta0, batches * epochs, gradient, estimate, **settings)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert 0.0 < clipped < 1.0  # both regimes of the rule are exercised
    assert float(optimizer.clip_fraction) == pytest.approx(clipped)
    assert int(optimizer.hessian_updates) == len(range(2, 4 * epochs, 2))


@pytest.mark.parametrize("weighted", [False, True], ids=["official", "weighted"])
def test_sophia_g_golden_values_through_fit(weighted):
    """Softmax regression; labels redrawn from the seed, the official ``ρ·bs·h`` form."""
    rng = np.random.default_rng(1)
    n, d, c, batch, epochs = 24, 3, 3, 8, 3
    x = rng.normal(size=(n, d))
    y = rng.integers(0, c, n)
    w = rng.uniform(0.2, 2.0, n) if weighted else np.ones(n)
    settings = dict(lr=0.02, b1=0.8, b2=0.7, rho=0.5, eps=1e-12, wd=WD, k=2, bs=batch)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def gradient(theta, batch):
        xa, yb, wb = batch
        residual = softmax(xa @ theta) - np.eye(c)[yb]
        return xa.T @ (wb[:, None] * residual) / len(yb)

    def estimate(theta, batch, t):
        xa, _, wb = batch
        p = softmax(xa @ theta)
        u = _draw(11, t, p.shape, "uniform")
        sampled = np.argmax(np.log(p) - np.log(-np.log(u)), axis=1)
        # The official estimate: the gradient of the mean loss on sampled labels,
        # squared; the batch size enters the denominator. With sample weights, each
        # sample's term carries sqrt(w) (so that the estimate is the weighted GGN's).
        g_hat = xa.T @ (np.sqrt(wb)[:, None] * (p - np.eye(c)[sampled])) / len(p)
        return g_hat**2

    with float64_everywhere():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(c)])
        kernel, bias = model.get_weights()
        theta0 = np.concatenate([kernel, bias[None]], axis=0)
        optimizer = Sophia(
            settings["lr"], beta_1=0.8, beta_2=0.7, rho=0.5, weight_decay=WD,
            update_every=2, estimator="gauss_newton_bartlett", seed=11,
        )  # fmt: skip
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # float64 now
        got = _fit(model, optimizer, x, y, batch, epochs, w if weighted else None, loss)
    batches = [
        (_augmented(x[i : i + batch]), y[i : i + batch], w[i : i + batch])
        for i in range(0, n, batch)
    ]
    expected, clipped = _numpy_sophia(theta0, batches * epochs, gradient, estimate, **settings)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert 0.0 < clipped < 1.0
    assert float(optimizer.clip_fraction) == pytest.approx(clipped)
