"""Tests of keras_curv.optimizers.AdaHessian against independent oracles."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import AdaHessian, CurvatureContextError, curvature_step
from tests.architectures import ZOO, first_epoch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _digits(n=480):
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data[:n] / 16.0).astype("float32"), data.target[:n].astype("int32")


def _mlp64(seed=0, inputs=3, hidden=4, outputs=2):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,), dtype="float64"),
            keras.layers.Dense(hidden, activation="tanh", dtype="float64"),
            keras.layers.Dense(outputs, dtype="float64"),
        ]
    )


def _mse64():
    return keras.losses.MeanSquaredError(dtype="float64")


def _f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


def _regression_data(n=8, inputs=3, outputs=2, seed=1):
    rng = np.random.RandomState(seed)
    return _f32(rng.randn(n, inputs)), _f32(rng.randn(n, outputs))


# ----------------------------------------------------------------- golden values


def _numpy_adahessian(w0, batches, lr, b1, b2, eps, k, update_each, wd, cap=None):
    """Independent transcription of the update for ``mean((x W - y)^2)``, W with no bias.

    Each batch has orthogonal input columns, so the Hessian in W is diagonal and
    ``|z ⊙ Hz| = diag(H)`` for every Rademacher probe z.
    """
    w = w0.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    tau = 0
    for t, (x, y) in enumerate(batches, start=1):
        n, o = y.shape
        g = 2.0 / (n * o) * x.T @ (x @ w - y)
        diag = np.repeat((2.0 / (n * o) * (x**2).sum(0))[:, None], o, axis=1)
        if wd:
            w = w - lr * wd * w
        m = b1 * m + (1 - b1) * g
        if (t - 1) % update_each == 0:
            v = b2 * v + (1 - b2) * diag**2
            tau += 1
        den = (np.sqrt(v) / np.sqrt(1 - b2**tau)) ** k + eps
        direction = (m / (1 - b1**t)) / den
        w = w - lr * (direction if cap is None else np.clip(direction, -cap, cap))
    return w


@pytest.mark.parametrize(
    "k, update_each, wd, cap",
    [
        (1.0, 1, None, None),
        (0.5, 1, None, None),
        (1.0, 2, None, None),
        (1.0, 1, 0.05, None),
        (0.5, 3, 0.05, None),
        (1.0, 1, None, 0.3),
        (0.5, 3, 0.05, 0.3),
    ],
    ids=str,
)
def test_golden_values_through_fit(k, update_each, wd, cap):
    rng = np.random.RandomState(0)
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], float)
    steps = 7
    # Orthogonal columns with a different scale per batch: D changes from step to step.
    # Values exact in float32: Keras's data adapter casts float64 arrays to floatx.
    xs = [_f32(hadamard[:, :3] * rng.uniform(0.3, 2.0, size=3)) for _ in range(steps)]
    ys = [_f32(rng.randn(4, 2)) for _ in range(steps)]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(2, use_bias=False, dtype="float64")]
    )
    w0 = model.get_weights()[0].copy()
    opt = AdaHessian(
        learning_rate=0.0625, beta_1=0.8, beta_2=0.9, epsilon=1e-3, hessian_power=k,
        update_each=update_each, weight_decay=wd, step_cap=cap,
    )  # fmt: skip
    model.compile(optimizer=opt, loss=_mse64())
    model.fit(np.concatenate(xs), np.concatenate(ys), batch_size=4, shuffle=False, verbose=0)
    expected = _numpy_adahessian(
        w0, list(zip(xs, ys)), 0.0625, 0.8, 0.9, 1e-3, k, update_each, wd or 0.0, cap
    )
    # rtol 1e-6, not 1e-12: Keras's compiled loss rounds through floatx (float32) once.
    np.testing.assert_allclose(model.get_weights()[0], expected, rtol=1e-6, atol=1e-9)
    assert int(opt.hessian_iterations) == len(range(0, steps, update_each))


# ---------------------------------------------------- Hessian-diagonal estimation


def _dense_hessian(model, x, y):
    variables = model.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    jac = outer.jacobian(flat, variables)
    return np.concatenate([tf.reshape(j, [flat.shape[0], -1]).numpy() for j in jac], axis=1)


def _one_step_diagonal(model, x, y, **kwargs):
    """D of one step (lr 0, β2 0, so v = D² and the weights do not move)."""
    opt = AdaHessian(learning_rate=0.0, beta_2=0.0, **kwargs)
    model.compile(optimizer=opt, loss=_mse64())
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    return [np.sqrt(v.numpy()) for v in opt.hessian_diagonal_ema]


def test_hutchinson_estimate_approaches_dense_hessian_diagonal():
    x, y = _regression_data()
    model = _mlp64()
    hess = _dense_hessian(model, x, y)
    samples = 600
    got = np.concatenate([d.ravel() for d in _one_step_diagonal(model, x, y, n_samples=samples)])
    off = hess - np.diag(np.diag(hess))
    stderr = np.sqrt((off**2).sum(1) / samples)
    error = np.abs(got - np.abs(np.diag(hess)))
    assert np.all(error <= 5 * stderr + 1e-12)
    # Not trivially close: a single probe is much further from the diagonal.
    one = np.concatenate([d.ravel() for d in _one_step_diagonal(_mlp64(), x, y, n_samples=1)])
    assert np.max(np.abs(one - np.abs(np.diag(hess)))) > 3 * np.max(error)


@pytest.mark.parametrize("layer, shape", [("conv2d", (5, 5, 2)), ("conv1d", (6, 2))])
def test_conv_kernel_spatial_averaging(layer, shape):
    keras.utils.set_random_seed(2)
    conv = (
        keras.layers.Conv2D(2, 3, use_bias=False, dtype="float64")
        if layer == "conv2d"
        else keras.layers.Conv1D(2, 3, use_bias=False, dtype="float64")
    )
    model = keras.Sequential([keras.Input(shape, dtype="float64"), conv, keras.layers.Flatten()])
    rng = np.random.RandomState(3)
    x = rng.randn(4, *shape)
    y = rng.randn(4, model.output_shape[-1])
    hess = _dense_hessian(model, x, y)  # linear model + MSE: PSD, diag(H) >= 0
    samples = 400
    (got,) = _one_step_diagonal(model, x, y, n_samples=samples)
    spatial = (0, 1) if layer == "conv2d" else (0,)
    kernel_shape = model.trainable_variables[0].shape
    assert got.shape == tuple(kernel_shape)
    # Constant over the spatial axes...
    np.testing.assert_allclose(got, np.broadcast_to(got.mean(spatial, keepdims=True), got.shape))
    # ...and equal to the spatial mean of diag(H), up to the Hutchinson error.
    diag = np.diag(hess).reshape(kernel_shape)
    stderr = np.sqrt(((hess - np.diag(np.diag(hess))) ** 2).sum(1) / samples).reshape(kernel_shape)
    expected = diag.mean(spatial, keepdims=True)
    tol = 5 * stderr.mean(spatial, keepdims=True) + 1e-12
    assert np.all(np.abs(got.mean(spatial, keepdims=True) - expected) <= tol)


# ----------------------------------------------------------------------- probes


def _diagonal_sequence(seed, steps=3, n_samples=1, jit=False):
    """D at each of ``steps`` steps on a fixed batch with fixed weights."""
    x, y = _regression_data()
    model = _mlp64()
    keras.utils.set_random_seed(seed)
    opt = AdaHessian(learning_rate=0.0, beta_2=0.0, n_samples=n_samples)
    model.compile(optimizer=opt, loss="mse", jit_compile=jit)
    out = []
    for _ in range(steps):
        model.train_on_batch(x, y)
        out.append(np.concatenate([np.sqrt(v.numpy()).ravel() for v in opt.hessian_diagonal_ema]))
    return np.stack(out)


def test_fresh_probes_each_step_and_reproducible_under_set_random_seed():
    first = _diagonal_sequence(seed=3)
    # Same weights and batch: only the probe can change D between steps.
    assert not np.allclose(first[0], first[1])
    assert not np.allclose(first[1], first[2])
    np.testing.assert_array_equal(first, _diagonal_sequence(seed=3))
    assert not np.allclose(first, _diagonal_sequence(seed=4))


def test_jit_compile_draws_the_same_probes():
    np.testing.assert_allclose(
        _diagonal_sequence(5, steps=2, n_samples=3),
        _diagonal_sequence(5, steps=2, n_samples=3, jit=True),
        rtol=1e-10,
    )


def test_rng_state_is_an_optimizer_variable():
    model = _mlp64()
    opt = AdaHessian(seed=11)
    opt.build(model.trainable_variables)
    states = [v for v in opt.variables if "seed_generator_state" in v.path]
    assert len(states) == 1 and tuple(states[0].numpy()) == (11, 0)


# --------------------------------------------------------------------- training


def test_beats_sgd_on_ill_conditioned_regression():
    rng = np.random.RandomState(0)
    scales = np.logspace(-2, 2, 6)
    x = rng.randn(256, 6) * scales
    y = x @ rng.randn(6, 1)
    steps = 150

    def final_loss(opt):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((6,), dtype="float64"), keras.layers.Dense(1, dtype="float64")]
        )
        model.compile(optimizer=opt, loss="mse")
        # One epoch of `steps` full batches: cheaper than `steps` epochs.
        model.fit(np.tile(x, (steps, 1)), np.tile(y, (steps, 1)), batch_size=256,
                  shuffle=False, verbose=0)  # fmt: skip
        return float(model.evaluate(x, y, verbose=0))

    # SGD's stable rate is bounded by 2 / (largest curvature ~ 2e4).
    sgd = final_loss(keras.optimizers.SGD(learning_rate=8e-5))
    ada = final_loss(AdaHessian(learning_rate=0.3))
    assert ada < 1e-2 * sgd


def _compile_fit(model, opt, epochs=4, **kwargs):
    x, y = _digits()
    fit_kwargs = {k: kwargs.pop(k) for k in ("sample_weight",) if k in kwargs}
    model.compile(
        optimizer=opt,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **kwargs,
    )
    history = model.fit(x, y, batch_size=48, epochs=epochs, verbose=0, **fit_kwargs)
    return history.history


def _sequential(regularizer=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(10),
            keras.layers.Activation("softmax", dtype="float32"),
        ]
    )


def _functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(32, activation="tanh")
        self.out = keras.layers.Dense(10, activation="softmax")

    def call(self, x):
        return self.out(self.hidden(x))


# ------------------------------------------------------------------ safe defaults

_FAST_ZOO = ("mlp", "two_input")  # the models on which the authors' rule blows up


@pytest.mark.parametrize(
    "name",
    [n if n in _FAST_ZOO else pytest.param(n, marks=pytest.mark.slow) for n in ZOO],
)
def test_defaults_lower_the_loss_in_the_first_epoch(name):
    """[7/8]: ``AdaHessian()`` at its defaults never raises the first epoch's loss."""
    result = first_epoch(name, AdaHessian())
    # Against the training-mode loss of the initial weights: BatchNormalization and
    # Dropout make the inference-mode loss a different quantity.
    assert result["mean"] < result["initial_training"]
    assert result["last"] < 0.9 * result["initial_training"]
    # The cap bounds every coordinate's move: lr · step_cap per step, 16 steps.
    assert result["max_weight_change"] <= 16 * 0.15 * 1.0 * (1 + 1e-6)


def test_the_authors_rule_blows_up_where_the_cap_does_not():
    """``step_cap=None`` (the authors' rule and defaults) raises the MLP's loss."""
    paper = first_epoch("mlp", AdaHessian(step_cap=None))
    assert paper["mean"] > paper["initial_training"]
    assert paper["max_weight_change"] > 10  # far beyond the cap's bound of 2.4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_digits_training(kind):
    if kind == "subclassed":
        keras.utils.set_random_seed(0)
        model = SubclassedNet()
    else:
        model = _sequential() if kind == "sequential" else _functional()
    history = _compile_fit(model, AdaHessian(learning_rate=0.1))
    assert history["accuracy"][-1] > 0.8
    assert history["loss"][-1] < history["loss"][0]


@pytest.mark.slow
def test_digits_jit_steps_per_execution_sample_weights_regularizer():
    x, y = _digits()
    weights = np.where(y % 2 == 0, 2.0, 0.5)
    model = _sequential(regularizer=keras.regularizers.L2(1e-3))
    opt = AdaHessian(learning_rate=0.1)
    history = _compile_fit(
        model, opt, jit_compile=True, steps_per_execution=3, sample_weight=weights
    )
    assert history["accuracy"][-1] > 0.8
    assert int(opt.iterations) == int(opt.hessian_iterations) == 4 * 10
    assert float(opt.mean_curvature()) > 0


@pytest.mark.slow
def test_mixed_float16_stays_finite():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _sequential()
        history = _compile_fit(model, AdaHessian(learning_rate=0.1), epochs=3)
        inner = model.optimizer.inner_optimizer
        assert isinstance(inner, AdaHessian)
        assert np.all(np.isfinite(history["loss"]))
        assert all(np.all(np.isfinite(w)) for w in model.get_weights())
        assert history["accuracy"][-1] > 0.6
        assert int(inner.hessian_iterations) > 0 and np.isfinite(float(inner.mean_curvature()))
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------------------ update_each


def test_update_each_skips_hessian_steps():
    x, y = _regression_data()
    model = _mlp64()
    opt = AdaHessian(learning_rate=0.01, update_each=3)
    model.compile(optimizer=opt, loss="mse")
    counts, emas = [], []
    for _ in range(7):
        model.train_on_batch(x, y)
        counts.append(int(opt.hessian_iterations))
        emas.append(np.concatenate([v.numpy().ravel() for v in opt.hessian_diagonal_ema]))
    assert counts == [1, 1, 1, 2, 2, 2, 3]
    for step in range(1, 7):
        changed = not np.array_equal(emas[step], emas[step - 1])
        assert changed == (step % 3 == 0), step


# ------------------------------------------------------- Keras optimizer features


def _train_mlp(opt, steps=6):
    x, y = _regression_data()
    model = _mlp64()
    w0 = [w.copy() for w in model.get_weights()]
    model.compile(optimizer=opt, loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return w0, model.get_weights()


def _distance(a, b):
    return np.sqrt(sum(np.sum((p - q) ** 2) for p, q in zip(a, b)))


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.05, 0.0])
    _, after2 = _train_mlp(AdaHessian(learning_rate=schedule, seed=1), steps=3)
    _, after6 = _train_mlp(AdaHessian(learning_rate=schedule, seed=1), steps=6)
    w0, _ = _train_mlp(AdaHessian(learning_rate=schedule, seed=1), steps=0)
    assert _distance(w0, after2) > 0
    # Steps 0..2 use lr 0.05 (the schedule reads the step before incrementing), then 0.
    np.testing.assert_allclose(np.concatenate([w.ravel() for w in after2]),
                               np.concatenate([w.ravel() for w in after6]))  # fmt: skip


def test_clipnorm_weight_decay_and_ema():
    w0, plain = _train_mlp(AdaHessian(learning_rate=0.05, seed=1))
    _, clipped = _train_mlp(AdaHessian(learning_rate=0.05, seed=1, clipnorm=1e-4))
    assert _distance(w0, clipped) < 0.5 * _distance(w0, plain)

    _, decayed = _train_mlp(AdaHessian(learning_rate=0.05, seed=1, weight_decay=0.5))
    kernels = [0, 2]
    assert sum(np.sum(decayed[i] ** 2) for i in kernels) < sum(
        np.sum(plain[i] ** 2) for i in kernels
    )

    opt = AdaHessian(learning_rate=0.05, seed=1, use_ema=True, ema_momentum=0.5)
    _, ema_run = _train_mlp(opt)
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in ema_run]),
        np.concatenate([w.ravel() for w in plain]),
    )  # EMA does not change the trained weights until it is swapped in
    averages = opt._model_variables_moving_average
    assert not np.allclose(averages[0].numpy(), plain[0])
    assert np.all(np.isfinite(averages[0].numpy()))


# ----------------------------------------------------------------- serialization


def test_config_round_trip():
    opt = AdaHessian(learning_rate=0.2, beta_1=0.8, hessian_power=0.5, n_samples=2,
                     update_each=3, seed=4, weight_decay=0.01, clipnorm=1.0)  # fmt: skip
    again = AdaHessian.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, AdaHessian) and restored.get_config() == opt.get_config()


def test_save_load_resume_matches_uninterrupted(tmp_path):
    x, y = _regression_data(n=16)

    def fresh():
        model = _mlp64()
        keras.utils.set_random_seed(7)
        model.compile(optimizer=AdaHessian(learning_rate=0.05, update_each=2), loss=_mse64())
        return model

    straight = fresh()
    straight.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0)

    first = fresh()
    first.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "adah.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, AdaHessian)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(loaded.optimizer.hessian_iterations) == int(straight.optimizer.hessian_iterations)


# ------------------------------------------------------------------ other paths


def test_eager_apply_gradients_raises():
    model = _mlp64()
    opt = AdaHessian()
    with pytest.raises(CurvatureContextError, match="curvature_step"):
        opt.apply_gradients(
            zip([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
        )


def test_curvature_step_trains():
    x, y = _regression_data(n=32)
    model = _mlp64()
    opt = AdaHessian(learning_rate=0.05, seed=0)
    loss = keras.losses.MeanSquaredError()  # one instance: the traced step is reused
    losses = [float(curvature_step(model, opt, loss, x, y)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    assert int(opt.hessian_iterations) == 30


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"hessian_power": 0.0}, "hessian_power"),
        ({"hessian_power": 1.5}, "hessian_power"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"update_each": 0}, "update_each"),
        ({"seed": 1.5}, "seed"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaHessian(**kwargs)


def test_curvature_summary_reports_bias_corrected_state():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = AdaHessian(learning_rate=0.01, update_each=2, seed=1)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 4 steps, 2 Hessian steps
    summary = {k: np.asarray(v) for k, v in optimizer.curvature_summary().items()}
    tau = 2.0
    rms = [np.sqrt(v.numpy() / (1 - optimizer.beta_2**tau)) for v in optimizer.hessian_diagonal_ema]
    assert summary["hessian_updates"] == tau
    np.testing.assert_allclose(
        summary["hessian_diagonal_rms_per_variable"], [r.mean() for r in rms], rtol=1e-5
    )
    np.testing.assert_allclose(
        summary["hessian_diagonal_rms"], np.concatenate([r.ravel() for r in rms]).mean(), rtol=1e-5
    )
