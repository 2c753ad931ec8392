"""keras_curv.KFAC through compile/fit against independent oracles (NumPy, tape Jacobians)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_curv.optimizers import KFAC, curvature_step
from tests.conftest import float64_everywhere

SCCE = keras.losses.SparseCategoricalCrossentropy


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _mlp64(seed=0, inputs=3, hidden=4, outputs=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,), dtype="float64"),
            keras.layers.Dense(hidden, activation="tanh", dtype="float64"),
            keras.layers.Dense(outputs, dtype="float64"),
        ]
    )


def _classification(n=24, inputs=3, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype(np.float32).astype(np.float64)
    return x, rng.integers(0, classes, n)


# ----------------------------------------------------------------- golden values


def _numpy_kfac(weights, batches, *, lr, damping, momentum, decay, inverse_every, norm, wd):
    """K-FAC (Martens & Grosse 2015) for the tanh MLP with softmax cross-entropy, by hand.

    Empirical Fisher (true labels), factored Tikhonov damping with the π-adjustment,
    bias-corrected factor EMAs, inverses (dense ``np.linalg.inv``) every
    ``inverse_every`` steps, KL norm constraint, heavy-ball momentum, decoupled weight decay.
    Returns the weights and the quadratic-model change of every step.
    """
    w1, b1, w2, b2 = (np.array(w, np.float64) for w in weights)
    params = [w1, b1, w2, b2]
    velocity = [np.zeros_like(p) for p in params]
    factors = [None, None, None, None]  # A1, G1, A2, G2
    inverses = None
    changes = []
    for t, (x, y, sw) in enumerate(batches):
        n = len(x)
        sw = np.ones(n) if sw is None else sw
        h = np.tanh(x @ w1 + b1)
        p = _softmax(h @ w2 + b2)
        e2 = p - np.eye(p.shape[1])[y]  # per-sample d NLL / d logits
        e1 = (e2 @ w2.T) * (1 - h**2)
        grads = [x.T @ (sw[:, None] * e1) / n, (sw[:, None] * e1).mean(0)]
        grads += [h.T @ (sw[:, None] * e2) / n, (sw[:, None] * e2).mean(0)]
        hx, hh = np.c_[x, np.ones(n)], np.c_[h, np.ones(n)]
        batch = [hx.T @ hx / n, (sw[:, None] * e1).T @ e1 / n, hh.T @ hh / n]
        batch.append((sw[:, None] * e2).T @ e2 / n)
        weight = (1 - decay) / (1 - decay ** (t + 1))
        factors = [b if f is None else f + weight * (b - f) for f, b in zip(factors, batch)]
        if t % inverse_every == 0:
            inverses = []
            for a, g in (factors[:2], factors[2:]):
                pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
                root = np.sqrt(damping)
                inverses.append(
                    (np.linalg.inv(a + pi * root * np.eye(len(a))),
                     np.linalg.inv(g + root / pi * np.eye(len(g))))
                )  # fmt: skip
        directions = []
        for (a_inv, g_inv), gw, gb in zip(inverses, grads[::2], grads[1::2]):
            d = a_inv @ np.vstack([gw, gb]) @ g_inv
            directions += [d[:-1], d[-1]]
        dot = sum(np.sum(d * g) for d, g in zip(directions, grads))
        nu = 1.0 if norm is None else min(1.0, np.sqrt(norm / (lr**2 * dot)))
        new_velocity = [momentum * v + nu * d for v, d in zip(velocity, directions)]
        steps = [-lr * v for v in new_velocity]
        curvature = 0.0
        for (a, g), sw_, sb in zip((factors[:2], factors[2:]), steps[::2], steps[1::2]):
            s = np.vstack([sw_, sb])
            curvature += np.sum((a @ s @ g) * s)
        step_sq = sum(np.sum(s**2) for s in steps)
        changes.append(sum(np.sum(g * s) for g, s in zip(grads, steps)) + 0.5 * curvature
                       + 0.5 * damping * step_sq)  # fmt: skip
        params = [q - lr * wd * q for q in params]
        params = [q + s for q, s in zip(params, steps)]
        velocity = new_velocity
        w1, b1, w2, b2 = params
    return params, changes


GOLDEN = {
    "plain": {"momentum": 0.0, "decay": 0.0, "inverse_every": 1, "norm": None, "wd": 0.0},
    "momentum_norm_wd": {
        "momentum": 0.5,
        "decay": 0.0,
        "inverse_every": 1,
        "norm": 1e-3,
        "wd": 0.0625,
    },  # fmt: skip
    "ema_stale_inverses_weights": {
        "momentum": 0.9,
        "decay": 0.8,
        "inverse_every": 3,
        "norm": None,
        "wd": 0.0,
        "weighted": True,
    },  # fmt: skip
}


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_values_against_numpy_through_fit(case):
    settings = dict(GOLDEN[case])
    weighted = settings.pop("weighted", False)
    x, y = _classification(n=28)
    rng = np.random.default_rng(5)
    # Float32-exact: Keras's data adapter casts sample weights to float32.
    sw = rng.uniform(0.2, 2.0, len(x)).astype(np.float32).astype(np.float64) if weighted else None
    model = _mlp64()
    w0 = [w.copy() for w in model.get_weights()]
    lr, damping, batch = 0.25, 0.01, 7
    optimizer = KFAC(
        learning_rate=lr,
        damping=damping,
        momentum=settings["momentum"],
        ema_decay=settings["decay"],
        inverse_update_every=settings["inverse_every"],
        norm_constraint=settings["norm"],
        weight_decay=settings["wd"] or None,
        fisher="empirical",
    )
    model.compile(optimizer=optimizer, loss=SCCE(from_logits=True, dtype="float64"))
    model.fit(x, y, sample_weight=sw, batch_size=batch, shuffle=False, verbose=0)
    batches = [
        (x[i : i + batch], y[i : i + batch], None if sw is None else sw[i : i + batch])
        for i in range(0, len(x), batch)
    ]
    expected, changes = _numpy_kfac(w0, batches, lr=lr, damping=damping, **settings)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    summary = optimizer.curvature_summary()
    np.testing.assert_allclose(
        float(optimizer._last["quadratic_model_change"].numpy()), changes[-1], rtol=1e-9
    )
    assert float(summary["curvature_updates"]) == 4
    assert float(summary["inverse_updates"]) == len(range(0, 4, settings["inverse_every"]))


# ------------------------------------------------------- XLA, steps_per_execution


def _weights_after(optimizer_factory, *, jit=False, spe=1, epochs=2):
    x, y = _classification(n=24)
    weights = np.random.default_rng(2).uniform(0.5, 1.5, len(x)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    optimizer = optimizer_factory()
    model.compile(
        optimizer=optimizer,
        loss=SCCE(from_logits=True, dtype="float64"),
        jit_compile=jit,
        steps_per_execution=spe,
    )
    model.fit(x, y, sample_weight=weights, batch_size=6, epochs=epochs, shuffle=False, verbose=0)
    return model, optimizer


def _every_option():
    # Every schedule gated (curvature, inverses, damping trials), sampled labels.
    return KFAC(0.2, damping=0.05, curvature_update_every=2, inverse_update_every=3,
                adapt_damping=True, damping_adaptation_every=2, seed=4)  # fmt: skip


@pytest.mark.slow
def test_jit_compile_and_steps_per_execution_give_the_same_training():
    reference, optimizer = _weights_after(_every_option)
    assert int(optimizer.curvature_updates) == 4 and int(optimizer.inverse_updates) == 3
    assert float(optimizer.current_damping) != 0.05  # adapted
    with pytest.warns(UserWarning, match="jit_compile"):
        compiled, _ = _weights_after(_every_option, jit=True, spe=3)
    # XLA's eigensolver (Jacobi) differs from LAPACK's in the last places, and in the
    # eigenvectors' signs: the trajectories agree to ~1e-9 of each array's scale
    # (measured: 1.2e-9 on a momentum buffer of scale 0.5; a wrong step is off by O(1)).
    for a, b in zip(reference.get_weights(), compiled.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    for a, b in zip(reference.optimizer.variables, compiled.optimizer.variables):
        if "vectors" not in a.path:
            a, b = np.asarray(a), np.asarray(b)
            scale = max(1e-3, float(np.max(np.abs(a))))
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-8 * scale)
    # steps_per_execution, and the sampled labels: the same seed, the same training.
    spe, _ = _weights_after(_every_option, spe=3)
    for a, b in zip(reference.get_weights(), spe.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    other, _ = _weights_after(lambda: KFAC(0.2, damping=0.05, seed=5), epochs=1)
    again, _ = _weights_after(lambda: KFAC(0.2, damping=0.05, seed=4), epochs=1)
    assert not np.allclose(other.get_weights()[0], again.get_weights()[0])


# ------------------------------------------------------- damping adaptation


def test_damping_adaptation_follows_the_reduction_ratio():
    """λ ← ωλ if ρ > 3/4, λ/ω if ρ < 1/4, at every step (ω = 0.95¹)."""
    for lr in (3.0, 0.05):
        history = []
        optimizer = KFAC(lr, damping=0.1, momentum=0.0, norm_constraint=None, fisher="exact",
                         adapt_damping=True, damping_adaptation_every=1, ema_decay=0.0,
                         inverse_update_every=1)  # fmt: skip

        def record(batch, logs, optimizer=optimizer, history=history):
            history.append(
                (float(optimizer._last["reduction_ratio"]), float(optimizer.current_damping))
            )

        x, y = _classification(n=24)
        model = _mlp64()
        model.compile(optimizer=optimizer, loss=SCCE(from_logits=True, dtype="float64"))
        model.fit(
            x,
            y,
            batch_size=6,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)],
        )
        damping = 0.1
        for ratio, got in history:
            damping = (
                damping * 0.95 if ratio > 0.75 else damping / 0.95 if ratio < 0.25 else damping
            )
            np.testing.assert_allclose(got, damping, rtol=1e-12)
        ratios = [r for r, _ in history]
        if lr == 3.0:  # too long a step for the quadratic model, at least once
            assert min(ratios) < 0.25
        else:  # small steps: the model predicts the change well, λ shrinks every time
            assert all(0.75 < r < 1.25 for r in ratios)
            np.testing.assert_allclose(history[-1][1], 0.1 * 0.95**4, rtol=1e-12)


def test_reduction_ratio_is_the_actual_over_the_predicted_change():
    # float64 everywhere: Keras's compiled loss otherwise rounds the loss through floatx.
    with float64_everywhere():
        _check_reduction_ratio()


def _check_reduction_ratio():
    x, y = _classification(n=8)
    model = _mlp64()
    loss = SCCE(from_logits=True, dtype="float64")
    before = float(loss(y, model(x)))
    optimizer = KFAC(0.5, damping=0.1, momentum=0.0, adapt_damping=True, fisher="empirical")
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = float(loss(y, model(x)))
    predicted = float(optimizer._last["quadratic_model_change"])
    np.testing.assert_allclose(
        float(optimizer._last["reduction_ratio"]), (after - before) / predicted, rtol=1e-9
    )


# ------------------------------------------------------- non-finite batches


def test_nan_batch_is_skipped_without_touching_weights_or_factors():
    x, y = _classification(n=16)
    x[9, 1] = np.nan  # the third batch of 4
    model = _mlp64()
    model.compile(optimizer=KFAC(0.1, seed=0), loss=SCCE(from_logits=True))
    states = []
    snapshot = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: states.append(
            {v.path: np.asarray(v).copy() for v in [*model.weights, *model.optimizer.variables]}
        )
    )
    with pytest.warns(RuntimeWarning, match="1 training step"):
        from keras_curv.callbacks import SkippedSteps

        model.fit(
            x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[snapshot, SkippedSteps()]
        )
    optimizer = model.optimizer
    assert int(optimizer.skipped_steps) == 1 and int(optimizer.iterations) == 3
    assert int(optimizer.curvature_updates) == 3
    changed = [p for p, v in states[2].items() if not np.array_equal(v, states[1][p])]
    assert all("skipped_steps" in p or "seed_generator" in p for p in changed), changed
    for value in states[3].values():
        assert np.all(np.isfinite(value))


# ------------------------------------------------------- mixed precision


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_factors_and_trains(policy):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data[:256] / 16).astype("float32"), digits.target[:256]
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(16, activation="tanh", kernel_regularizer="l2"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(optimizer=KFAC(), loss=SCCE(from_logits=True))
        history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    assert isinstance(inner, KFAC)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16"
    )
    state = [v for v in inner.variables if "float" in str(v.dtype)]
    assert state and all(v.dtype == "float32" for v in state)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in inner.variables)
    assert int(inner.skipped_steps) == 0 and int(inner.curvature_updates) == 16
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]


# ------------------------------------------------------- serialization, resume


def _fresh_for_resume():
    model = _mlp64()
    model.compile(
        optimizer=KFAC(
            0.1,
            seed=3,
            weight_decay=0.01,
            inverse_update_every=3,
            adapt_damping=True,
            damping_adaptation_every=2,
        ),  # fmt: skip
        loss=SCCE(from_logits=True, dtype="float64"),
    )
    return model


@pytest.mark.slow
def test_save_load_and_backup_and_restore_resume_like_uninterrupted(tmp_path):
    x, y = _classification(n=16)
    fit = {"batch_size": 4, "shuffle": False, "verbose": 0}
    straight = _fresh_for_resume()
    straight.fit(x, y, epochs=4, **fit)

    first = _fresh_for_resume()
    first.fit(x, y, epochs=2, **fit)
    path = str(tmp_path / "kfac.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, KFAC)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    loaded.fit(x, y, epochs=2, **fit)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("preempted")

    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="preempted"):
        _fresh_for_resume().fit(
            x, y, epochs=4, callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()], **fit
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Keras warns when it skips optimizer state
        resumed = _fresh_for_resume()
        resumed.fit(x, y, epochs=4, callbacks=[keras.callbacks.BackupAndRestore(backup)], **fit)
    # A loaded model's compiled loss is float32 (Keras does not save its dtype): 1e-6.
    for other, atol in ((loaded, 1e-6), (resumed, 1e-10)):
        assert int(other.optimizer.iterations) == 16
        for a, b in zip(straight.get_weights(), other.get_weights()):
            np.testing.assert_allclose(b, a, rtol=0, atol=atol)
        for a, b in zip(straight.optimizer.variables, other.optimizer.variables):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=atol)


def test_config_round_trip():
    optimizer = KFAC(0.3, damping=2.0, momentum=0.5, ema_decay=0.9, curvature_update_every=2,
                     inverse_update_every=7, fisher="exact", norm_constraint=None,
                     adapt_damping=True, max_damping=10.0, max_patches_per_example=3,
                     fallback="diagonal", seed=5, clipnorm=1.0)  # fmt: skip
    again = KFAC.from_config(optimizer.get_config())
    assert again.get_config() == optimizer.get_config()
    assert again.max_patches_per_example == 3
    exact = KFAC.from_config(KFAC(max_patches_per_example=None).get_config())
    assert exact.max_patches_per_example is None
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, KFAC) and restored.get_config() == optimizer.get_config()


# ------------------------------------------------------- arguments, other paths


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"damping": -1.0}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"curvature_update_every": 0}, "curvature_update_every"),
        ({"inverse_update_every": 2.0}, "inverse_update_every"),
        ({"fisher": "true"}, "fisher"),
        ({"norm_constraint": 0.0}, "norm_constraint"),
        ({"adapt_damping": 1}, "adapt_damping"),
        ({"damping_adaptation_every": True}, "damping_adaptation_every"),
        ({"damping_adaptation_decay": 0.0}, "damping_adaptation_decay"),
        ({"min_damping": 1.0, "max_damping": 0.5}, "max_damping"),
        ({"max_factor_size": 0}, "max_factor_size"),
        ({"max_patches_per_example": 0}, "max_patches_per_example"),
        ({"max_patches_per_example": -3}, "max_patches_per_example"),
        ({"max_patches_per_example": 8.0}, "max_patches_per_example` must be an int >= 1 or None"),
        ({"fallback": "full"}, "fallback"),
        ({"seed": 1.5}, "seed"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KFAC(**kwargs)


def test_unsupported_loss_is_a_clear_error():
    x, y = _classification(n=8)
    model = _mlp64()
    model.compile(optimizer=KFAC(), loss="mae")
    with pytest.raises(ValueError, match="MeanSquaredError"):
        model.fit(x, np.eye(3)[y], verbose=0)


def test_curvature_step_and_summary():
    x, y = _classification(n=32)
    model = _mlp64()
    optimizer = KFAC(0.2, seed=0)
    loss = SCCE(from_logits=True)
    model.compile(loss=loss)  # the likelihood comes from the model's compiled loss
    losses = [float(curvature_step(model, optimizer, loss, x, y)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    summary = {k: np.asarray(v) for k, v in optimizer.curvature_summary().items()}
    assert summary["curvature_updates"] == 8 and summary["inverse_updates"] == 1
    assert summary["damping"] == np.float32(optimizer.damping)
    assert summary["input_factor_eigenvalue_min"].shape == (2,)
    assert np.all(summary["input_factor_eigenvalue_max"] >= summary["input_factor_eigenvalue_min"])
    assert np.isfinite(summary["quadratic_model_change"]) and summary["norm_constraint_scale"] > 0
