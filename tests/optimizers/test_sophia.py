"""Sophia through compile/fit: golden values against NumPy, and Keras's features."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv._internal.keras_privates import stateless_seed
from keras_curv.optimizers import Sophia, _sampled_labels
from keras_curv.optimizers.sophia import sophia_direction
from tests.conftest import float64_everywhere

LOGITS_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# For the float64 models: a float32 loss would round their outputs.
LOGITS_CE64 = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def _draw(seed: int, step: int, shape, kind: str) -> np.ndarray:
    """The random numbers Sophia draws at ``step`` (its generator's state is (seed, step))."""
    pair = stateless_seed(tf.constant([seed, step], tf.int64))
    if kind == "rademacher":
        bits = tf.random.stateless_uniform(shape, seed=pair, minval=0, maxval=2, dtype=tf.int32)
        return 2.0 * bits.numpy() - 1.0
    spec = _sampled_labels.SamplingSpec("categorical", True, "sum_over_batch_size")
    return _sampled_labels.noise_for(spec, shape, pair, tf.float64).numpy()


def _augmented(x):
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _numpy_sophia(
    theta, batches, gradient, estimate, *, lr, b1, b2, rho, eps, wd, k, bs=1.0, corrected=False
):
    """The rule, the weights as one (d+1, o) matrix [W; b].

    ``corrected=False`` is the authors' rule (NOTES.md) and the default: ``h`` used as it
    is, first estimate at step ``k``; ``True`` is ``bias_correction=True``: estimates from
    step 0, and ``h / (1 − β2^n)`` after ``n`` of them. ``estimate(theta, batch, t)`` is the
    curvature estimate in the same shape; ``bs`` the batch-size factor of the official
    SophiaG denominator ``ρ·bs·h + ε``.
    """
    m = np.zeros_like(theta)
    h = np.zeros_like(theta)
    clipped, n = None, 0
    for t, batch in enumerate(batches):
        g = gradient(theta, batch)
        if t % k == 0 and (corrected or t >= k):
            h = b2 * h + (1 - b2) * estimate(theta, batch, t)
            n += 1
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        used = h / (1 - b2**n) if corrected and n else h
        ratio = np.abs(m) / (rho * bs * np.maximum(used, 0) + eps)
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


@pytest.mark.parametrize("corrected", [True, False], ids=["corrected", "authors"])
def test_sophia_h_golden_values_through_fit(corrected):
    """Least squares with a dense Hessian; the probes are redrawn from the seed."""
    rng = np.random.default_rng(0)
    n, d, o, batch, epochs = 24, 3, 2, 6, 3
    x = rng.normal(size=(n, d)) * [1.0, 2.0, 0.5]
    y = rng.normal(size=(n, o))
    settings = dict(lr=0.05, b1=0.9, b2=0.5, rho=0.3, eps=1e-12, wd=WD, k=2, corrected=corrected)

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
            update_every=2, bias_correction=corrected, seed=7,
        )  # fmt: skip
        got = _fit(model, optimizer, x, y, batch, epochs)
    batches = [(_augmented(x[i : i + batch]), y[i : i + batch]) for i in range(0, n, batch)]
    expected, clipped = _numpy_sophia(theta0, batches * epochs, gradient, estimate, **settings)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert 0.0 < clipped < 1.0  # both regimes of the rule are exercised
    assert float(optimizer.clip_fraction) == pytest.approx(clipped)
    assert int(optimizer.hessian_updates) == len(range(0 if corrected else 2, 4 * epochs, 2))


@pytest.mark.parametrize("corrected", [True, False], ids=["corrected", "authors"])
@pytest.mark.parametrize("weighted", [False, True], ids=["official", "weighted"])
def test_sophia_g_golden_values_through_fit(weighted, corrected):
    """Softmax regression; labels redrawn from the seed, the official ``ρ·bs·h`` form."""
    rng = np.random.default_rng(1)
    n, d, c, batch, epochs = 24, 3, 3, 8, 3
    x = rng.normal(size=(n, d))
    y = rng.integers(0, c, n)
    w = rng.uniform(0.2, 2.0, n) if weighted else np.ones(n)
    settings = dict(
        lr=0.02, b1=0.8, b2=0.7, rho=0.5, eps=1e-12, wd=WD, k=2, bs=batch, corrected=corrected
    )

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
            update_every=2, estimator="gauss_newton_bartlett", bias_correction=corrected,
            seed=11,
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


# ------------------------------------------------------------------ the schedule


def _mlp64(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def _classification(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.integers(0, 3, n), rng.uniform(0.2, 2.0, n)


@pytest.mark.parametrize("corrected", [True, False], ids=["corrected", "authors"])
@pytest.mark.parametrize("estimator", ["hutchinson", "gauss_newton_bartlett"])
def test_estimates_every_k_steps_and_nothing_stale_is_reabsorbed(estimator, corrected):
    x, y, _ = _classification()
    model = _mlp64()
    opt = Sophia(0.01, update_every=3, estimator=estimator, bias_correction=corrected, seed=0)
    model.compile(optimizer=opt, loss=LOGITS_CE)
    counts, states = [], []
    for _ in range(8):
        model.train_on_batch(x, y)
        counts.append(int(opt.hessian_updates))
        states.append(np.concatenate([h.numpy().ravel() for h in opt.hessian_diagonal_ema]))
    if corrected:  # bias_correction=True: the first estimate at the first step, then every k
        assert counts == [1, 1, 1, 2, 2, 2, 3, 3]
        assert states[0].any()
    else:  # the authors' schedule: the first estimate after k steps, then every k
        assert counts == [0, 0, 0, 1, 1, 1, 2, 2]
        assert not states[0].any()
    for step in range(1, 8):
        assert (not np.array_equal(states[step], states[step - 1])) == (step % 3 == 0), step


# --------------------------------------------------------- Keras's features


def _weights_after(estimator, **compile_kwargs):
    x, y, w = _classification(n=24)
    model = _mlp64()
    model.layers[0].kernel_regularizer = keras.regularizers.L2(1e-2)
    opt = Sophia(0.05, update_every=2, estimator=estimator, seed=4)
    model.compile(optimizer=opt, loss=LOGITS_CE64, **compile_kwargs)
    model.fit(x, y, sample_weight=w, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert int(opt.hessian_updates) == 5
    return model.get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["hutchinson", "gauss_newton_bartlett"])
def test_jit_compile_and_steps_per_execution_match_plain_graph_steps(estimator):
    """Sample weights and a regularizer included; XLA draws the same probes and labels."""
    plain = _weights_after(estimator)
    fused = _weights_after(estimator, jit_compile=True, steps_per_execution=3)
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def test_nan_batch_is_skipped_without_touching_weights_or_state():
    from tests.optimizers.test_hardening import _classifier, _regression, _Snapshots

    x, y = _regression(nan_batch=2)
    model = _classifier()
    model.compile(optimizer=Sophia(0.05, update_every=1, seed=1), loss=LOGITS_CE)
    snapshots = _Snapshots()
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[snapshots])
    opt = model.optimizer
    assert int(opt.skipped_steps) == 1 and int(opt.iterations) == 3
    before, after = snapshots.states[1], snapshots.states[2]
    for w0, w1 in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(w0, w1)
    old = before["optimizer"]
    changed = [p for p, v in after["optimizer"].items() if not np.array_equal(v, old[p])]
    # Only the skip counter and the RNG (drawn before the step is judged) move.
    assert any("skipped_steps" in p for p in changed)
    assert all("skipped_steps" in p or "seed_generator" in p for p in changed), changed
    for v in opt.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))


def test_a_non_finite_estimate_is_not_absorbed_and_the_step_still_runs():
    from tests.optimizers.test_hardening import _overflow_regression

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, x, y = _overflow_regression()
        # No weight decay: the fit stays exact, so the gradient stays 0 (finite).
        optimizer = Sophia(0.1, update_every=1, weight_decay=None, seed=0)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, epochs=4, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    inner = model.optimizer.inner_optimizer
    # The float16 Hessian-vector product overflows (the gradient is finite): no estimate
    # is absorbed, and the steps run on (nothing is skipped), with h still 0.
    assert int(inner.iterations) == 4 and int(inner.skipped_steps) == 0
    assert int(inner.hessian_updates) == 0
    assert not any(h.numpy().any() for h in inner.hessian_diagonal_ema)
    for v in inner.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))


@pytest.mark.parametrize(
    "policy, estimator",
    [("mixed_float16", "gauss_newton_bartlett"), ("mixed_bfloat16", "hutchinson")],
)
def test_mixed_precision_keeps_float32_state_and_trains(policy, estimator):
    x, y, _ = _classification(n=64)
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
        )
        model.compile(
            optimizer=Sophia(0.02, update_every=2, estimator=estimator, seed=0), loss=LOGITS_CE
        )
        history = model.fit(x.astype("float32"), y, batch_size=16, epochs=3, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    opt = model.optimizer
    inner = getattr(opt, "inner_optimizer", opt)
    assert isinstance(inner, Sophia)
    assert int(inner.hessian_updates) == 5
    state = [v for v in inner.variables if "float" in str(v.dtype)]
    assert state and all(v.dtype == "float32" for v in state)
    for v in inner.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert any(h.numpy().any() for h in inner.hessian_diagonal_ema)


# ------------------------------------------------------------ save and resume


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["hutchinson", "gauss_newton_bartlett"])
def test_save_load_and_backup_and_restore_resume_exactly(estimator, tmp_path):
    # floatx float64: a loaded model's loss comes back in floatx (Keras saves no dtype).
    with float64_everywhere():
        _resume_exactly(estimator, tmp_path)


def _resume_exactly(estimator, tmp_path):
    x, y, _ = _classification(n=16)

    def fresh():
        model = _mlp64()
        model.compile(
            optimizer=Sophia(0.05, update_every=2, estimator=estimator, seed=7),
            loss="sparse_categorical_crossentropy",
        )
        return model

    def fit(model, epochs, callbacks=()):
        model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=list(callbacks))  # fmt: skip

    straight = fresh()
    fit(straight, 4)

    first = fresh()
    fit(first, 2)
    path = str(tmp_path / "sophia.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, Sophia)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    loaded.fit(x, y, batch_size=4, epochs=4, initial_epoch=2, shuffle=False, verbose=0)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("simulated preemption")

    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="preemption"):
        fit(fresh(), 4, [keras.callbacks.BackupAndRestore(backup), Interrupt()])
    resumed = fresh()
    fit(resumed, 4, [keras.callbacks.BackupAndRestore(backup)])

    for other in (loaded, resumed):
        assert int(other.optimizer.iterations) == 16
        for a, b in zip(straight.get_weights(), other.get_weights()):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
        for a, b in zip(straight.optimizer.variables, other.optimizer.variables):
            np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                                       rtol=0, atol=1e-12)  # fmt: skip


# ------------------------------------------------------------------ the API


def test_config_round_trip():
    opt = Sophia(
        2e-3, beta_1=0.9, beta_2=0.95, rho=0.1, weight_decay=0.2, update_every=5,
        estimator="gauss_newton_bartlett", epsilon=1e-10, bias_correction=True, seed=3,
        clipnorm=1.0,
    )  # fmt: skip
    again = Sophia.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, Sophia) and restored.get_config() == opt.get_config()
    defaults = Sophia().get_config()
    assert (defaults["beta_1"], defaults["beta_2"], defaults["rho"]) == (0.965, 0.99, 0.04)
    assert (defaults["weight_decay"], defaults["update_every"]) == (0.1, 10)
    assert defaults["bias_correction"] is False and again.bias_correction is True


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.5}, "beta_2"),
        ({"rho": 0.0}, "rho"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"update_every": 0}, "update_every"),
        ({"update_every": 2.0}, "update_every"),
        ({"update_every": True}, "update_every"),
        ({"estimator": "fisher"}, "estimator"),
        ({"seed": 1.5}, "seed"),
        ({"bias_correction": 1}, "bias_correction"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sophia(**kwargs)


def test_sophia_g_refuses_a_loss_it_cannot_sample_before_training():
    x, y, _ = _classification()
    model = _mlp64()
    model.compile(optimizer=Sophia(estimator="gauss_newton_bartlett"), loss="mae")
    with pytest.raises(ValueError, match='estimator="hutchinson"'):
        model.fit(x, np.eye(3)[y], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), _mlp64().get_weights()))


def test_curvature_summary_is_read_by_the_callbacks():
    from keras_curv.callbacks._protocol import optimizer_summary

    x, y, _ = _classification()
    model = _mlp64()
    opt = Sophia(0.05, update_every=2, bias_correction=True, seed=2)
    model.compile(optimizer=opt, loss=LOGITS_CE)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)  # 8 steps, estimates at 0, 2, 4, 6
    summary = {k: float(v) for k, v in opt.curvature_summary().items()}
    assert summary["hessian_updates"] == 4.0 and summary["skipped_steps"] == 0.0
    assert 0.0 <= summary["clip_fraction"] <= 1.0
    assert summary["win_rate"] == pytest.approx(1.0 - summary["clip_fraction"])
    h = np.concatenate([v.numpy().ravel() for v in opt.hessian_diagonal_ema])
    # The mean of the bias-corrected h, the one the step divides by.
    assert summary["hessian_diagonal_mean"] == pytest.approx(h.mean() / (1 - 0.99**4), rel=1e-6)
    scalars, _ = optimizer_summary(model)
    assert scalars["optimizer/clip_fraction"] == pytest.approx(summary["clip_fraction"])


def test_curvature_step_in_a_hand_written_loop():
    from keras_curv.optimizers import curvature_step

    x, y, _ = _classification(n=32)
    model = _mlp64()
    opt = Sophia(0.05, update_every=2, seed=0)
    losses = [float(curvature_step(model, opt, LOGITS_CE, x, y)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]
    assert int(opt.hessian_updates) == 9


@pytest.mark.parametrize("corrected", [True, False], ids=["corrected", "authors"])
@pytest.mark.parametrize("estimator", ["hutchinson", "gauss_newton_bartlett"])
def test_protocol_operators_reproduce_the_unclipped_step(estimator, corrected):
    x, y, _ = _classification()
    model = _mlp64()
    rho = 0.5 if corrected else 5.0  # the full h clips more: both regimes either way
    opt = Sophia(
        0.05, rho=rho, update_every=2, estimator=estimator, bias_correction=corrected, seed=3
    )
    model.compile(optimizer=opt, loss=LOGITS_CE)
    model.train_on_batch(x, y)
    if not corrected:  # the authors' first estimate comes at step k
        assert opt.preconditioner() is None and opt.curvature_model() is None
    for _ in range(4):
        model.train_on_batch(x, y)
    state = [v.numpy().copy() for v in opt.variables]
    m = np.concatenate([v.numpy().ravel() for v in opt._momentums])
    h = np.concatenate([v.numpy().ravel() for v in opt.hessian_diagonal_ema])
    if corrected:  # estimates at steps 0, 2, 4
        h = h / (1 - 0.99**3)
    np.testing.assert_allclose(np.diag(opt.curvature_model().to_dense()), h, rtol=1e-14)
    p = opt.preconditioner().diagonal.numpy()
    direction = np.ravel(sophia_direction(m, h, rho, opt.epsilon))
    unclipped = np.abs(m) < p
    assert 0 < unclipped.sum() < len(m)  # both kinds of coordinates are checked
    np.testing.assert_allclose(direction[unclipped], (m / p)[unclipped], rtol=1e-12)
    np.testing.assert_array_equal(np.abs(direction[~unclipped]), 1.0)
    assert opt.stability_threshold() == pytest.approx((2 + 2 * 0.965) / (0.035 * 0.05))
    for before, after in zip(state, opt.variables):  # read only
        np.testing.assert_array_equal(before, after.numpy())
