"""Distribution, non-finite steps and mixed precision for the curvature optimizers."""

from __future__ import annotations

import functools
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks import SkippedSteps
from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton
from tests.optimizers._fresh_process import json_reports

_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_distributed_case.py")
_F64_CASES = [
    "adahessian_f64",
    "adahessian_samples_update_each",
    "csn_paper_f64",
    "csn_gauss_newton_weighted",
    "csn_projected_exact",
]
_F32_CASES = ["adahessian_f32", "csn_paper_f32"]
# An explicit LossScaleOptimizer in float64: on 2 CPU replicas it calls the optimizer
# from threads of its own, where the statistics are summed in the step graph.
_LOSS_SCALED_CASES = [
    "adahessian_loss_scaled_f64",
    "csn_paper_loss_scaled_f64",
    "csn_gauss_newton_loss_scaled_f64",
]
# Largest weight difference allowed under each policy: about 10 units in the last
# place of the compute dtype at 1 (float16: 2**-10, bfloat16: 2**-7). One device in
# mixed precision differs from one device in float32 by as much (measured: float16
# 4e-4..3e-3, bfloat16 5e-3..0.18); a wrong reduction differs by more than 1.
_MIXED_TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 0.1}
_MIXED_CASES = [
    f"{case}_{policy}"
    for policy in _MIXED_TOLERANCE
    for case in ("adahessian", "csn_paper", "csn_gauss_newton")
]


# ------------------------------------------------------------------ distribution


@functools.cache
def _reports() -> dict:
    """Every distributed case, in two processes run side by side (tracing dominates)."""
    groups = (
        [*_F64_CASES, *_F32_CASES, "csn_paper_short_last_batch_f64"],
        [*_LOSS_SCALED_CASES, *_MIXED_CASES],
    )
    report = {}
    for part in json_reports(_CASE_SCRIPT, groups, timeout=900):
        report.update(part)
    return report


@pytest.fixture(scope="module")
def distributed_report():
    return _reports()


def _check_golden(result, tolerance):
    assert result["num_replicas"] == 2
    assert result["iterations"] == [6, 6]
    # The weights moved far from their initial values, and identically. (AdaHessian's
    # default step cap bounds each coordinate's move by lr = 0.05 per step: 0.3 in 6.)
    assert result["moved"] > 0.1
    assert result["abs"] < tolerance * max(1.0, result["moved"]), result
    # Optimizer state (EMAs, counters, RNG, loss scale) is the same on both replicas.
    assert result["replicas_agree"]
    assert result["finite"]


@pytest.mark.slow
@pytest.mark.parametrize("case", _F64_CASES + _F32_CASES)
def test_two_replicas_equal_one_device_on_the_global_batch(distributed_report, case):
    _check_golden(distributed_report[case], 1e-12 if case in _F64_CASES else 2e-6)


@pytest.mark.slow
def test_replica_with_an_empty_shard_trains(distributed_report):
    """49 samples in batches of 16: the last global batch leaves the second replica empty.

    CSN's per-class sub-batches used to gather a missing sample there. No golden
    equality: Keras divides each replica's loss by the number of replicas, so a
    first-order optimizer also differs from one device on an uneven batch.
    """
    result = distributed_report["csn_paper_short_last_batch_f64"]
    assert result["iterations"] == [8, 8]
    assert result["replicas_agree"] and result["finite"]
    assert result["moved"] > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("case", _LOSS_SCALED_CASES)
def test_loss_scaled_two_replicas_equal_one_device_exactly(distributed_report, case):
    _check_golden(distributed_report[case], 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("case", _MIXED_CASES)
def test_mixed_precision_two_replicas_equal_one_device(distributed_report, case):
    policy = "mixed_float16" if case.endswith("mixed_float16") else "mixed_bfloat16"
    _check_golden(distributed_report[case], _MIXED_TOLERANCE[policy])


# ------------------------------------------------------------ non-finite steps


def _regression(nan_batch=None, n=16, batch=4):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3))
    y = rng.integers(0, 3, n)
    if nan_batch is not None:
        x[nan_batch * batch + 1, 2] = np.nan
    return x, y


def _classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


_OPTIMIZERS = {
    "adahessian": lambda: AdaHessian(0.05, seed=1, use_ema=True),
    "csn": lambda: ClassSubspaceNewton(0.05, momentum=0.5, damping=0.1, curvature="paper"),
}


class _Snapshots(keras.callbacks.Callback):
    """Weights and optimizer variables after every batch."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        self.states.append(
            {
                "weights": [w.numpy().copy() for w in self.model.weights],
                "optimizer": {v.path: np.asarray(v).copy() for v in opt.variables},
            }
        )


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_nan_batch_is_skipped_counted_logged_and_warned(name, jit):
    x, y = _regression(nan_batch=2)
    model = _classifier()
    model.compile(
        optimizer=_OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    snapshots = _Snapshots()
    with pytest.warns(RuntimeWarning, match="1 training step"):
        history = model.fit(
            x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[SkippedSteps(), snapshots]
        )
    opt = model.optimizer
    assert int(opt.skipped_steps) == 1
    assert int(opt.iterations) == 3  # the skipped step is not counted
    assert history.history["skipped_steps"] == [1]
    assert float(opt.curvature_summary()["skipped_steps"]) == 1.0
    before, after = snapshots.states[1], snapshots.states[2]
    for w0, w1 in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(w0, w1)
    changed = [
        path
        for path, value in after["optimizer"].items()
        if not np.array_equal(value, before["optimizer"][path])
    ]
    # Only the skip counter and the probes' RNG (drawn before the step is judged) move.
    assert all("skipped_steps" in p or "seed_generator" in p for p in changed), changed
    assert any("skipped_steps" in p for p in changed)
    # Training goes on from there: the last step moves the weights, all finite.
    last = snapshots.states[3]
    assert not np.array_equal(last["weights"][0], after["weights"][0])
    for w in model.weights:
        assert np.all(np.isfinite(w.numpy()))
    for v in opt.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))


def test_csn_skip_equals_training_without_the_bad_batch():
    """CSN draws no random numbers: skipping a batch is training without it."""
    x, y = _regression(nan_batch=1)
    keep = np.ones(len(x), bool)
    keep[4:8] = False
    runs = []
    for xs, ys in ((x, y), (x[keep], y[keep])):
        model = _classifier()
        model.compile(
            optimizer=ClassSubspaceNewton(0.05, momentum=0.5, damping=0.1, curvature="paper"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(xs, ys, batch_size=4, shuffle=False, verbose=0)
        runs.append(model)
    for a, b in zip(runs[0].weights, runs[1].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
    for a, b in zip(runs[0].optimizer.variables, runs[1].optimizer.variables):
        if "skipped_steps" not in a.path:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_terminate_on_nan_still_stops_training(name):
    x, y = _regression(nan_batch=1)
    model = _classifier()
    model.compile(
        optimizer=_OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batches = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batches.append(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = model.fit(
            x,
            y,
            batch_size=4,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.TerminateOnNaN(), counter],
        )
    assert batches == [0, 1]  # stopped after the NaN batch
    assert len(history.epoch) == 1
    assert int(model.optimizer.skipped_steps) == 1
    for w in model.weights:
        assert np.all(np.isfinite(w.numpy()))


# -------------------------------------------------------- 1/lambda underflow (CSN)


def test_csn_underflowing_curvature_takes_no_infinite_step():
    """Class 0's samples are saturated (p = 1 in float32): lambda_0 = 0, 1/lambda_0 = inf.

    That class must take the SGD step along its direction; the others their Newton
    step. The expected update is transcribed from eq. 15 with the optimizer's own
    (finite) directions and curvatures and a gradient taken independently.
    """
    x = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2]], "float32")
    y = np.array([0, 0, 1, 1, 2, 2])
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                3,
                kernel_initializer=keras.initializers.Constant(np.diag([200.0, 0.5, 0.7])),
                bias_initializer=keras.initializers.Constant([0.0, 0.1, -0.1]),
            ),
        ]
    )
    lr = 0.1
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    grads = tape.gradient(value, model.trainable_variables)
    g = np.concatenate([t.numpy().ravel() for t in grads]).astype(np.float64)
    theta0 = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])

    model.compile(optimizer=ClassSubspaceNewton(lr, curvature="paper"), loss=loss)
    model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
    opt = model.optimizer
    curvature = opt.class_curvatures.numpy()
    assert curvature[0] == 0.0 and np.all(curvature[1:] > 0)
    theta1 = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
    assert np.all(np.isfinite(theta1))
    directions = opt.class_directions().numpy().astype(np.float64)
    step = lr * g
    for k in (1, 2):
        step += (1.0 / curvature[k] - lr) * (directions[k] @ g) * directions[k]
    assert abs(directions[0] @ g) > 0.1  # class 0 does project on the gradient
    np.testing.assert_allclose(theta0 - theta1, step, rtol=2e-4, atol=1e-6)


# ---------------------------------------------------------------- mixed precision


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _overflow_regression():
    """Exact fit (zero gradient) with curvature ~1e4: the scaled HVP overflows float16."""
    rng = np.random.default_rng(0)
    x = (rng.uniform(60.0, 100.0, size=(8, 3))).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                1,
                kernel_initializer=keras.initializers.Constant(0.5),
                bias_initializer="zeros",
            ),
        ]
    )
    y = model.predict(x, verbose=0).astype("float32")
    return model, x, y


def test_adahessian_float16_hvp_overflow_leaves_no_nan(mixed_float16):
    model, x, y = _overflow_regression()
    weights = [w.numpy().copy() for w in model.weights]
    model.compile(optimizer=AdaHessian(0.1, seed=0), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    inner = model.optimizer.inner_optimizer
    # The gradient is finite (zero), so the LossScaleOptimizer applies the step, but
    # the scaled Hessian-vector product is inf in float16: with no curvature yet, the
    # step is skipped rather than divided by epsilon.
    assert int(inner.hessian_iterations) == 0
    assert int(inner.skipped_steps) == 3
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    for v in inner.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_curvature_state_is_float32_under_mixed_precision(mixed_float16, name):
    x, y = _regression(n=24, batch=8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    assert model.layers[0].compute_dtype == "float16"
    model.compile(
        optimizer=_OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x.astype("float32"), y, batch_size=8, epochs=2, verbose=0)
    inner = model.optimizer.inner_optimizer
    assert int(inner.iterations) > 0
    float_state = [v for v in inner.variables if "float" in str(v.dtype)]
    assert float_state and all(v.dtype == "float32" for v in float_state)
    for v in inner.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))
    summary = inner.curvature_summary()
    assert all(np.all(np.isfinite(np.asarray(s))) for s in summary.values())
