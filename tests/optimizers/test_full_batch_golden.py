"""The four full-batch optimizers through ``compile``/``fit`` against NumPy transcriptions.

l2-regularised softmax regression in float64 (``floatx`` float64: Keras casts the
compiled loss to floatx), one full batch per step: the weights after every step
must equal the NumPy solvers' (``_full_batch_numpy``) to float64 precision.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_curv.optimizers import LBFGS, LevenbergMarquardt, NewtonCG, NysNewtonCG
from tests.conftest import float64_everywhere
from tests.optimizers import _full_batch_numpy as ref

L2 = 0.125  # exact in float32, as Keras stores it
STEPS = 4


@pytest.fixture(autouse=True)
def float64():
    # The policy too: Keras fixes it at the first layer an earlier test made.
    with float64_everywhere():
        yield


def _data(n=40, p=4, classes=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, p))
    y = rng.integers(0, classes, n)
    return x, y


def _model(p=4, classes=3):
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((p,)),
            keras.layers.Dense(classes, kernel_regularizer=keras.regularizers.L2(L2)),
        ]
    )


class _Weights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(np.concatenate([w.ravel() for w in self.model.get_weights()]))


def _trajectory(optimizer, x, y, sample_weight=None, start=None, **compile_kwargs):
    model = _model()
    if start is not None:
        model.set_weights([start[:-3].reshape(-1, 3), start[-3:]])
    w0 = np.concatenate([w.ravel() for w in model.get_weights()])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    record = _Weights()
    model.fit(x, y, sample_weight=sample_weight, batch_size=len(x), epochs=STEPS, shuffle=False,
              verbose=0, callbacks=[record])  # fmt: skip
    return w0, record.weights


def _check(got, expected, rtol=1e-9):
    for step, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2, err_msg=f"step {step}")
    # The weights moved: the comparison is not between two resting points.
    assert np.linalg.norm(expected[-1] - expected[0]) > 1e-3


def test_lbfgs_golden():
    x, y = _data()
    problem = ref.SoftmaxRegression(x, y, 3, L2)
    w0, got = _trajectory(LBFGS(), x, y)
    _check(got, ref.lbfgs(problem.value_and_gradient, w0, STEPS))


def test_lbfgs_golden_with_a_small_memory_and_accurate_line_search():
    x, y = _data()
    problem = ref.SoftmaxRegression(x, y, 3, L2)
    w0, got = _trajectory(LBFGS(memory=2, c2=0.1), x, y)
    _check(got, ref.lbfgs(problem.value_and_gradient, w0, STEPS, memory=2, c2=0.1))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_newton_cg_golden_with_sample_weights(curvature):
    x, y = _data()
    weights = np.linspace(0.5, 2.0, len(y))
    # The model is linear in its weights: the GGN is the Hessian.
    problem = ref.SoftmaxRegression(x, y, 3, L2, sample_weight=weights)
    optimizer = NewtonCG(curvature=curvature, damping=0.5, cg_tolerance=1e-12, max_cg_iterations=30)
    w0, got = _trajectory(optimizer, x, y, sample_weight=weights)
    expected = ref.newton_cg(
        problem.value_and_gradient, problem.hessian_vector_product, w0, STEPS, 0.5, 1e-12, 30
    )
    _check(got, expected)


def test_nys_newton_cg_golden():
    """With CG solved tightly, the preconditioner (random sketch) changes only the path."""
    x, y = _data()
    problem = ref.SoftmaxRegression(x, y, 3, L2)
    optimizer = NysNewtonCG(rank=3, cg_tolerance=1e-13, max_cg_iterations=60, seed=0)
    w0, got = _trajectory(optimizer, x, y)
    expected = ref.newton_cg(
        problem.value_and_gradient,
        problem.hessian_vector_product,
        w0,
        STEPS,
        1e-4,
        1e-13,
        60,
        adapt=False,
    )
    _check(got, expected, rtol=1e-8)


@pytest.mark.parametrize("damping", [1.0, 1e-6])
def test_levenberg_marquardt_golden(damping):
    x, y = _data()
    start = None
    if damping < 1e-3:
        # Far from the optimum with almost no damping: the first trials are rejected.
        x = 3 * x
        start = 3 * np.random.default_rng(1).normal(size=15)
    problem = ref.SoftmaxRegression(x, y, 3, L2)
    optimizer = LevenbergMarquardt(damping=damping, cg_tolerance=1e-12, max_cg_iterations=30)
    w0, got = _trajectory(optimizer, x, y, start=start)
    expected = ref.levenberg_marquardt(
        problem.value_and_gradient, problem.hessian_vector_product, w0, STEPS, damping, 1e-12, 30
    )
    _check(got, expected)


@pytest.mark.slow
def test_jit_compile_and_steps_per_execution_match():
    x, y = _data()
    _, plain = _trajectory(LBFGS(), x, y)
    _, compiled = _trajectory(LBFGS(), x, y, jit_compile=True)
    _check(compiled, plain, rtol=1e-10)
    # steps_per_execution=2 over a repeated batch: 2 steps per execution, same path.
    model = _model()
    model.compile(
        optimizer=LBFGS(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    model.fit(np.tile(x, (STEPS, 1)), np.tile(y, STEPS), batch_size=len(x), shuffle=False,
              verbose=0)  # fmt: skip
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in model.get_weights()]), plain[-1], rtol=1e-10
    )
    assert int(model.optimizer.batch_changes) == 0
