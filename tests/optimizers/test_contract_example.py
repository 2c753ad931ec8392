"""The worked example of docs/integration.md: a new optimizer written against the contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import float64_everywhere

_PATH = Path(__file__).resolve().parents[2] / "examples" / "gradient_newton.py"
_spec = importlib.util.spec_from_file_location("gradient_newton", _PATH)
gradient_newton = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gradient_newton)
GradientNewton = gradient_newton.GradientNewton


def _problem(n=32, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.array([1.0, 3.0, 0.3, 2.0])
    y = x @ rng.normal(size=(d, 1)) + 0.1 * rng.normal(size=(n, 1))
    return x, y


def _numpy_reference(x, y, w0, steps, lr, damping):
    """Steepest descent with Newton's step size on MSE = mean((x w - y)^2)."""
    n = len(x)
    hessian = 2.0 * x.T @ x / n
    w = w0.copy()
    for _ in range(steps):
        g = 2.0 * x.T @ (x @ w - y) / n
        g_g, g_h_g = (g.T @ g).item(), (g.T @ hessian @ g).item()
        alpha = g_g / (g_h_g + damping * g_g)
        w = w - lr * alpha * g
    return w


@pytest.mark.parametrize("lr, damping", [(1.0, 0.0), (0.5, 1e-2)])
def test_golden_against_numpy_in_float64(lr, damping):
    x, y = _problem()
    with float64_everywhere():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
        w0 = model.get_weights()[0].copy()
        model.compile(optimizer=GradientNewton(lr, damping=damping), loss="mse")
        model.fit(x, y, batch_size=len(x), epochs=6, shuffle=False, verbose=0)
        expected = _numpy_reference(x, y, w0, 6, lr, damping)
        np.testing.assert_allclose(model.get_weights()[0], expected, rtol=1e-11, atol=1e-13)


def test_it_trains_and_round_trips_its_config():
    x, y = _problem(n=64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=GradientNewton(), loss="mse")
    losses = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < 0.2 * losses[0]
    clone = GradientNewton.from_config(model.optimizer.get_config())
    assert clone.damping == model.optimizer.damping
