"""SketchySGD against a NumPy transcription, on spiked least squares, and the standard battery."""

from __future__ import annotations

import functools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv import SketchySGD, curvature_step
from keras_curv.data import spiked_regression
from keras_curv.optimizers import sketchy_sgd
from tests.architectures import ZOO, first_epoch
from tests.conftest import float64_everywhere
from tests.optimizers._fresh_process import json_reports
from tests.optimizers.sketchy_reference import numpy_sketchy_sgd

# ------------------------------------------------------------------ golden values

_SPECTRUM = np.array([40.0, 20.0, 4.0, 2.0, 1.0, 0.5])  # eigenvalues of every batch's H


def _batches(steps=7, n=8, seed=0):
    """Batches whose Hessian 2XᵀX/n has the eigenvalues _SPECTRUM (eigenvectors fixed)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    xs = []
    for _ in range(steps):
        rows = np.linalg.qr(rng.standard_normal((n, 6)))[0]
        xs.append(rows * np.sqrt(_SPECTRUM * n / 2.0) @ basis.T)
    x = np.concatenate(xs)
    return x, rng.standard_normal(len(x))


def _linear_fit(optimizer, x, y, *, l2=0.0, batch_size=8, epochs=1, **compile_kwargs):
    keras.utils.set_random_seed(0)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(1, use_bias=False, kernel_regularizer=regularizer),
        ]
    )
    w0 = model.get_weights()[0][:, 0].copy()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    model.fit(x, y[:, None], batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return w0, model


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.1, "update_every": 1},
        {"learning_rate": 0.1, "update_every": 3, "momentum": 0.5},
        {"update_every": 1, "rho": 0.2, "power_iterations": 25},
        pytest.param(
            {"update_every": 3, "rho": 0.2, "power_iterations": 25, "momentum": 0.5},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["fixed", "fixed_momentum_every3", "auto", "auto_every3_momentum"],
)
def test_golden_values_through_fit(kwargs):
    """The whole space is sketched (rank 2 + oversampling 4 = 6 parameters): the Nyström
    factor is exact, so the transcription's dense eigendecomposition is the oracle."""
    x, y = _batches()
    with float64_everywhere():
        opt = SketchySGD(rank=2, oversampling=4, seed=1, **kwargs)
        w0, model = _linear_fit(opt, x, y)
        got = model.get_weights()[0][:, 0]
    reference = {k: v for k, v in kwargs.items() if k != "power_iterations"}
    rho = reference.pop("rho", "next")
    expected = numpy_sketchy_sgd(
        x, y, 8, 1, w0=w0, rank=2, oversampling=4, rho_rule=rho, sketch_seed=None, **reference
    )
    assert np.max(np.abs(expected - w0)) > 0.1  # it moved
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    if opt.automatic:
        # The step size in force is written into learning_rate.
        assert float(opt.learning_rate) == pytest.approx(
            0.5 / float(opt.curvature_summary()["preconditioned_curvature"]), rel=1e-6
        )


@pytest.mark.slow
def test_golden_hessian_batch_size_weight_decay_and_regularizer():
    """The sketch of the first 4 samples; Keras's decoupled weight decay uses the
    automatic step; L2 enters both the gradient and the curvature."""
    x, y = _batches()
    with float64_everywhere():
        opt = SketchySGD(
            rank=2, oversampling=4, rho=0.2, power_iterations=25, update_every=1,
            hessian_batch_size=4, weight_decay=0.05, curvature="hessian", seed=1,
        )  # fmt: skip
        w0, model = _linear_fit(opt, x, y, l2=0.01)
        got = model.get_weights()[0][:, 0]
    w = w0.copy()
    for start in range(0, len(x), 8):
        xb, yb = x[start : start + 8], y[start : start + 8]
        g = 2 / 8 * xb.T @ (xb @ w - yb) + 2 * 0.01 * w
        h = 2 / 4 * xb[:4].T @ xb[:4] + 2 * 0.01 * np.eye(6)
        vals, vecs = np.linalg.eigh(h)
        u = vecs[:, -2:]
        p = (u * vals[-2:]) @ u.T + 0.2 * np.eye(6)
        pv, pq = np.linalg.eigh(p)
        root = (pq / np.sqrt(pv)) @ pq.T
        eta = 0.5 / np.linalg.eigvalsh(root @ h @ root)[-1]
        w = w - eta * 0.05 * w  # decoupled weight decay, before the step
        w = w - eta * np.linalg.solve(p, g)
    # 1e-8: 25 power steps on this spectrum (gap ratio ~0.6) leave λ_max exact to ~1e-10.
    np.testing.assert_allclose(got, w, rtol=1e-8, atol=1e-10)


def test_constant_sample_weights_scale_out_and_other_weights_do_not():
    """With the automatic ρ and step size the update is invariant to a constant factor
    on the loss (H, g, ρ and λ_max scale together); non-uniform weights change it."""
    x, y = _batches()
    with float64_everywhere():
        runs = []
        for weights in (None, np.full(len(x), 3.0), np.linspace(0.2, 2.0, len(x))):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, use_bias=False)])
            model.compile(optimizer=SketchySGD(rank=2, oversampling=4, seed=1), loss="mse")
            model.fit(x, y[:, None], sample_weight=weights, batch_size=8, shuffle=False, verbose=0)
            runs.append(model.get_weights()[0])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-10)
    assert not np.allclose(runs[2], runs[0], rtol=1e-3)


# ---------------------------------------------------------- spiked least squares


@pytest.mark.slow
def test_why_rho_is_the_largest_eigenvalue_not_kept():
    """The NumPy transcription on spiked least squares (10 spikes, condition 1e4), rank 10,
    10 epochs of batch 256, a sketch every 32 steps (one epoch): ρ = λ̂_11 from 5
    oversampled directions reaches the optimum; the r-th kept eigenvalue leaves the bulk
    untouched; with the authors' ρ = 1e-3 the bulk sets the automatic step, and only the
    sketch's errors move the spikes (docs/sketchy_sgd.md: fragile)."""
    x, y = spiked_regression(8192, 200)
    x, y = x.astype(np.float64), y[:, 0].astype(np.float64)
    optimum = np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2)

    def final(rule):
        w = numpy_sketchy_sgd(x, y, 256, 10, rho_rule=rule, update_every=32, sketch_seed=0)
        return float(np.mean((x @ w - y) ** 2))

    results = {rule: final(rule) for rule in ("next", "kept", 1e-3)}
    print("optimum", optimum, results)
    assert results["next"] < 1.06 * optimum
    assert results["kept"] > 100 * optimum and results[1e-3] > 100 * optimum


def _spiked_final(optimizer, epochs=10):
    x, y = spiked_regression(8192, 200)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((200,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=256, epochs=epochs, shuffle=False, verbose=0)
    loss = float(model.evaluate(x, y, batch_size=8192, verbose=0))
    return loss if np.isfinite(loss) else np.inf


@pytest.mark.slow
def test_defaults_beat_tuned_sgd_and_adam_on_spiked_least_squares():
    sketchy = _spiked_final(SketchySGD())
    sgd = min(_spiked_final(keras.optimizers.SGD(lr)) for lr in (1e-4, 3e-4, 1e-3))
    adam = min(_spiked_final(keras.optimizers.Adam(lr)) for lr in (0.1, 0.3, 1.0))
    sgd_default = _spiked_final(keras.optimizers.SGD())
    adam_default = _spiked_final(keras.optimizers.Adam())
    print({"sketchy": sketchy, "sgd": sgd, "adam": adam, "adam_default": adam_default})
    assert sketchy < 0.0105  # the least-squares optimum is 0.0098
    assert sketchy < 1e-2 * min(sgd, adam)
    assert sgd_default == np.inf or sgd_default > 1e6  # diverges
    assert adam_default > 50.0  # from 3.3e3, after 320 steps


# ------------------------------------------------------------------- the battery


def _classifier(dtype="float32", regularizer=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh", dtype=dtype, kernel_regularizer=regularizer),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


def _classification(n=48, nan_batch=None):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3)).astype(np.float32).astype(np.float64)  # exact in floatx
    y = np.argmax(x @ rng.normal(size=(3, 3)), axis=1)  # learnable labels
    if nan_batch is not None:
        x[nan_batch * 8 + 1, 2] = np.nan
    return x, y


_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train(optimizer, epochs=2, dtype="float64", **compile_kwargs):
    x, y = _classification()
    model = _classifier(dtype)
    model.compile(optimizer=optimizer, loss=_LOSS, **compile_kwargs)
    history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history["loss"]


def _small(**kwargs):
    return SketchySGD(rank=3, oversampling=3, update_every=3, power_iterations=4, seed=2, **kwargs)


def test_jit_and_steps_per_execution_equal_graph_mode():
    graph, losses = _train(_small())
    assert losses[-1] < losses[0]
    # XLA's linear algebra rounds differently, and the step size passes through Keras's
    # float32 learning-rate variable: equal to 1e-5 after 12 steps, not to float64.
    for kwargs, tolerance in (({"jit_compile": True}, 1e-5), ({"steps_per_execution": 3}, 1e-12)):
        other, _ = _train(_small(), **kwargs)
        for a, b in zip(graph.get_weights(), other.get_weights()):
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


def test_refresh_schedule_and_state():
    model, _ = _train(_small(momentum=0.5), epochs=1)  # 6 steps: refreshes at 0, 1, 2, 3
    opt = model.optimizer
    assert int(opt.sketch_updates) == 4 and int(opt.iterations) == 6
    summary = opt.curvature_summary()
    assert set(summary) == {
        "eigenvalues", "rho", "step_size", "sketch_updates", "rejected_sketches",
        "skipped_steps", "preconditioned_curvature",
    }  # fmt: skip
    values = summary["eigenvalues"].numpy()
    assert values.shape == (3,) and np.all(np.diff(values) <= 0) and values[-1] >= 0
    assert 0 < float(summary["rho"]) <= values[-1]
    rows = opt.eigenvectors.numpy()
    assert rows.shape == (3, 38)
    np.testing.assert_allclose(rows @ rows.T, np.eye(3), atol=1e-10)


def test_mixed_precision_keeps_the_sketch_in_float32():
    for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model, losses = _train(_small(), epochs=2, dtype=None)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
        assert isinstance(inner, SketchySGD) and int(inner.sketch_updates) > 0
        floats = [v for v in inner.variables if "float" in str(v.dtype)]
        assert all(v.dtype == "float32" for v in floats), policy
        assert all(np.all(np.isfinite(np.asarray(v, np.float64))) for v in inner.variables)
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (policy, losses)


def test_nan_batch_is_skipped_without_touching_weights_or_state():
    x, y = _classification(n=32, nan_batch=2)
    model = _classifier("float64")
    model.compile(optimizer=_small(), loss=_LOSS)
    states = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: states.append(
            [np.asarray(v).copy() for v in model.weights + model.optimizer.variables]
        )
    )
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[record])
    opt = model.optimizer
    assert int(opt.skipped_steps) == 1 and int(opt.iterations) == 3
    for before, after, variable in zip(states[1], states[2], model.weights + opt.variables):
        if "skipped_steps" in variable.path or "seed_generator" in variable.path:
            continue
        np.testing.assert_array_equal(before, after, err_msg=variable.path)


def test_gaussian_test_matrix_is_finite_in_float32():
    """Regression: float32 rounds the top 32 of the 2³⁰ integer levels to a uniform of
    exactly 1, whose normal quantile is inf; the QR of Ω was then NaN and the sketch's
    eigendecomposition stopped fit (MNIST-1D MLP, a few epochs). This seed draws one."""
    seed, index = tf.constant([107, 0], tf.int32), 145062
    levels = tf.random.stateless_uniform((228150,), seed, 0, 2**30, dtype=tf.int32, alg="philox")
    assert int(levels[index]) >= 2**30 - 32  # the case is exercised
    draws = sketchy_sgd._gaussian((228150,), seed, tf.float32).numpy()
    assert np.all(np.isfinite(draws)) and np.max(np.abs(draws)) < 6.2
    # The quantile of the largest float32 below 1, 1 − 2⁻²⁴.
    assert draws[index] == pytest.approx(5.2947, abs=1e-3)


def test_non_finite_test_matrix_keeps_the_previous_sketch(monkeypatch):
    """An inf in Ω at the refresh of step 2: that refresh is rejected and counted, the
    preconditioner of step 1 stays in force, and training goes on."""
    original = sketchy_sgd._gaussian
    opt = _small()

    def poisoned(shape, seed, dtype):
        draws = original(shape, seed, dtype)
        if len(shape) != 2:
            return draws
        mask = np.zeros(shape, bool)
        mask[0, 0] = True
        hit = tf.logical_and(tf.equal(opt.iterations, 2), mask)
        return tf.where(hit, tf.constant(np.inf, dtype), draws)

    monkeypatch.setattr(sketchy_sgd, "_gaussian", poisoned)
    x, y = _classification()
    model = _classifier("float64")
    model.compile(optimizer=opt, loss=_LOSS)
    states = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: states.append(
            (opt.eigenvalues.numpy().copy(), float(opt.shift))
        )
    )
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[record])
    assert int(opt.iterations) == 6 and int(opt.skipped_steps) == 0
    assert int(opt.rejected_sketches) == 1 and int(opt.sketch_updates) == 3  # of 0, 1, 2, 3
    np.testing.assert_array_equal(states[2][0], states[1][0])
    assert states[2][1] == states[1][1] and not np.array_equal(states[3][0], states[2][0])
    assert all(np.all(np.isfinite(v)) for v in model.get_weights())
    assert float(opt.curvature_summary()["rejected_sketches"]) == 1.0


def test_save_load_and_backup_and_restore_resume_exactly(tmp_path):
    x, y = _classification(n=32)

    def fresh():
        model = _classifier("float64")
        model.compile(optimizer=_small(momentum=0.5), loss=_LOSS)
        return model

    straight = fresh()
    straight.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    first = fresh()
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "sketchy.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, SketchySGD) and loaded.optimizer.automatic
    loaded.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("preempted")

    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="preempted"):
        fresh().fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                    callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()])  # fmt: skip
    resumed = fresh()
    resumed.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup)])  # fmt: skip
    for model in (loaded, resumed):
        assert int(model.optimizer.iterations) == 16
        for a, b in zip(model.weights, straight.weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-10)
        for a, b in zip(model.optimizer.variables, straight.optimizer.variables):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-10)


def test_config_round_trip():
    for opt in (SketchySGD(), SketchySGD(0.05, rank=4, rho=1e-3, oversampling=0, momentum=0.9,
                                         update_every=7, hessian_batch_size=64, seed=3,
                                         curvature="hessian", clipnorm=1.0)):  # fmt: skip
        again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert isinstance(again, SketchySGD) and again.get_config() == opt.get_config()
    assert SketchySGD().get_config()["learning_rate"] == "auto"


def test_curvature_step_trains():
    x, y = _classification(n=32)
    model = _classifier("float64")
    opt = _small()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = [float(curvature_step(model, opt, loss, x, y)) for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0] and int(opt.iterations) == 12


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rho": 0.0}, "rho"),
        ({"oversampling": 0}, "oversampling"),
        ({"update_every": 0}, "update_every"),
        ({"hessian_batch_size": 0}, "hessian_batch_size"),
        ({"step_scale": 2.0}, "step_scale"),
        ({"power_iterations": 0}, "power_iterations"),
        ({"tracking_iterations": 11}, "tracking_iterations"),
        ({"momentum": 1.0}, "momentum"),
        ({"curvature": "fisher"}, "curvature"),
        ({"seed": 1.5}, "seed"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SketchySGD(**kwargs)


def test_a_rank_larger_than_the_model_is_refused():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="rank"):
        SketchySGD(rank=10).build(model.trainable_variables)


def test_gauss_newton_and_hessian_differ_on_a_network_and_both_train():
    finals = []
    for curvature in ("gauss_newton", "hessian"):
        model, losses = _train(_small(curvature=curvature), epochs=3)
        assert losses[-1] < losses[0]
        finals.append(model.get_weights()[0])
    assert not np.allclose(finals[0], finals[1])


def test_the_sketch_is_the_step_batchs_curvature():
    """One refresh on one batch: Ûᵀ spans the top eigenvectors of the dense GGN."""
    from tests.curvature.helpers import dense_ggn

    x, y = _classification(n=8)
    with float64_everywhere():  # the compiled loss too (Keras losses compute in floatx)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model = _classifier("float64")
        ggn = dense_ggn(model, lambda out: loss(y, out), x)
        opt = SketchySGD(learning_rate=0.0, rank=3, oversampling=35, seed=0)  # 38 = all
        model.compile(optimizer=opt, loss=loss)
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    exact = np.linalg.eigh(ggn)
    np.testing.assert_allclose(opt.eigenvalues.numpy(), exact[0][::-1][:3], rtol=1e-9)
    np.testing.assert_allclose(float(opt.shift), exact[0][::-1][3], rtol=1e-8)
    overlap = np.linalg.svd(opt.eigenvectors.numpy() @ exact[1][:, ::-1][:, :3])[1]
    np.testing.assert_allclose(overlap, 1.0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_defaults_train_every_zoo_model(name):
    result = first_epoch(name, SketchySGD())
    assert np.isfinite(result["final"]), result
    # After 16 steps a BatchNorm's moving statistics (momentum 0.99) are still near
    # their initial values, so its inference-mode `final` is not a measure of training
    # (SGD's and Adam's rise or stay there too: 2.3026 and 2.3015 from 2.3025); its
    # training-mode loss is (SketchySGD 1.94, Adam 2.34, SGD 2.38).
    trained = result["mean"] if "batchnorm" in name else result["final"]
    assert trained < result["initial"], result


def test_a_huge_but_finite_sketch_is_factored():
    """Curvature ~1e20 in float32: ‖Y‖² overflows unless the sketch is factored at unit max
    (before, the eigendecomposition raised and stopped fit)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 6)) * 1e10).astype(np.float32)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, use_bias=False)])
    opt = SketchySGD(rank=2, oversampling=4, seed=0)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, rng.standard_normal((16, 1)), batch_size=16, verbose=0)
    exact = np.linalg.eigvalsh(2 / 16 * x.astype(np.float64).T @ x)[::-1][:2]
    assert int(opt.sketch_updates) == 1
    np.testing.assert_allclose(opt.eigenvalues.numpy(), exact, rtol=1e-3)


_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_sketchy_distributed_case.py")
_EXACT = [
    "sketchy_auto_f64",
    "sketchy_fixed_momentum_weighted_f64",
    "sketchy_hessian_weighted_f64",
    "sketchy_short_last_batch_f64",
]


@functools.cache
def _distributed_reports() -> dict:
    groups = (_EXACT[:2], [*_EXACT[2:], "sketchy_empty_shard_weighted_f64"])
    report = {}
    for part in json_reports(_CASE_SCRIPT, groups, timeout=900):
        report.update(part)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("case", _EXACT)
def test_two_replicas_equal_one_device_on_the_global_batch(case):
    """MirroredStrategy over two logical CPUs: the summed sketch, gradient and power
    products give one device's trajectory (float64, 6 or 8 steps, 4 or 5 sketches)."""
    result = _distributed_reports()[case]
    assert result["num_replicas"] == 2
    assert result["iterations"] == ([8, 8] if "short" in case else [6, 6])
    assert result["moved"] > 0.2
    assert result["abs"] < 1e-12 * max(1.0, result["moved"]), result
    assert result["replicas_agree"] and result["finite"]


@pytest.mark.slow
def test_a_replica_with_an_empty_weighted_shard_trains():
    result = _distributed_reports()["sketchy_empty_shard_weighted_f64"]
    assert result["iterations"] == [8, 8]
    assert result["replicas_agree"] and result["finite"] and result["moved"] > 0.2


class ResidualModel(keras.Model):
    """A loss written in ``compute_loss`` that never reads ``y_pred`` (as a PINN's)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return tf.reduce_mean(tf.square(self.dense(2.0 * x) - 1.0))


def test_gauss_newton_on_a_loss_that_ignores_y_pred_names_the_fix():
    """It used to fail deep in the graph with ``'NoneType' object has no attribute 'op'``."""
    x = np.random.default_rng(0).standard_normal((16, 3)).astype("float32")
    model = ResidualModel()
    model.compile(optimizer=SketchySGD(rank=2, oversampling=2))
    with pytest.raises(ValueError, match='does not depend on them.*curvature="hessian"'):
        model.fit(x, np.zeros((16, 1), "float32"), batch_size=16, verbose=0)
    hessian = ResidualModel()
    hessian.compile(optimizer=SketchySGD(rank=2, oversampling=2, curvature="hessian"))
    history = hessian.fit(x, np.zeros((16, 1), "float32"), batch_size=16, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
