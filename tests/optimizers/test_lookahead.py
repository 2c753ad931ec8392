"""Lookahead against a NumPy transcription, around Keras and curvature optimizers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_curv import OSGM, Lookahead, SketchySGD
from keras_curv._internal.optimizer import unwrap
from tests.conftest import float64_everywhere


def _least_squares(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.3])
    return x, x @ rng.standard_normal(6) + 0.1 * rng.standard_normal(n)


def _linear(x, y, optimizer, *, epochs=2, callbacks=(), **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, use_bias=False)])
    w0 = model.get_weights()[0][:, 0].copy()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    model.fit(x, y[:, None], batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=list(callbacks))  # fmt: skip
    return w0, model


def numpy_lookahead_sgd(x, y, w0, lr, k, alpha, epochs, batch_size=8):
    """SGD fast weights; every k-th step φ ← φ + α(θ − φ), θ ← φ."""
    fast, slow, t = w0.copy(), w0.copy(), 0
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            fast = fast - lr * 2 / len(xb) * xb.T @ (xb @ fast - yb)
            t += 1
            if t % k == 0:
                slow = slow + alpha * (fast - slow)
                fast = slow.copy()
    return fast, slow


@pytest.mark.parametrize("jit", [False, True])
def test_golden_values_around_sgd(jit):
    x, y = _least_squares()
    with float64_everywhere():
        opt = Lookahead(keras.optimizers.SGD(0.02), sync_period=4, slow_step_size=0.3)
        w0, model = _linear(x, y, opt, jit_compile=jit)  # 12 steps: 3 synchronisations
        got, slow = model.get_weights()[0][:, 0], opt.slow_weights[0].numpy()[:, 0]
    fast, expected_slow = numpy_lookahead_sgd(x, y, w0, 0.02, 4, 0.3, 2)
    np.testing.assert_allclose(got, fast, rtol=1e-12)
    np.testing.assert_allclose(slow, expected_slow, rtol=1e-12)
    assert int(opt.iterations) == 12
    # 12 steps is a multiple of 4: the fast weights were just reset to the slow ones.
    np.testing.assert_array_equal(got, slow)


def test_a_curvature_optimizer_still_sees_its_batch():
    """k = 1 and α = 1 is the inner optimizer alone, to the last bit: SketchySGD inside
    Lookahead measures the curvature of the step's batch."""
    x, y = _least_squares()

    def inner():
        return SketchySGD(rank=2, oversampling=2, update_every=3, power_iterations=3, seed=0)

    with float64_everywhere():
        _, alone = _linear(x, y, inner())
        wrapped_opt = Lookahead(inner(), sync_period=1, slow_step_size=1.0)
        _, wrapped = _linear(x, y, wrapped_opt)
    np.testing.assert_array_equal(wrapped.get_weights()[0], alone.get_weights()[0])
    assert unwrap(wrapped_opt) is wrapped_opt.inner_optimizer
    assert int(wrapped_opt.inner_optimizer.sketch_updates) == int(alone.optimizer.sketch_updates)
    assert wrapped_opt.learning_rate is wrapped_opt.inner_optimizer.learning_rate


def test_a_skipped_inner_step_does_not_count():
    x, y = _least_squares(n=32)
    x[17, 2] = np.nan  # batch 2 of 4
    with float64_everywhere():
        opt = Lookahead(OSGM(0.02), sync_period=2, slow_step_size=0.5)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, use_bias=False)])
        model.compile(optimizer=opt, loss="mse")
        slow = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: slow.append(opt.slow_weights[0].numpy().copy())
        )
        model.fit(x, y[:, None], batch_size=8, shuffle=False, verbose=0, callbacks=[record])
    assert int(opt.inner_optimizer.skipped_steps) == 1 and int(opt.iterations) == 3
    # Synchronised after batch 1 (step 2); batches 2 (skipped) and 3 (step 3) leave φ.
    assert not np.array_equal(slow[0], slow[1])
    np.testing.assert_array_equal(slow[1], slow[2])
    np.testing.assert_array_equal(slow[2], slow[3])
    assert np.all(np.isfinite(model.get_weights()[0]))


def test_mixed_precision_wraps_lookahead():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = (x @ rng.standard_normal(6) > 0).astype(np.int32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
        )
        inner = SketchySGD(rank=2, oversampling=2, update_every=2, power_iterations=3, seed=0)
        model.compile(
            optimizer=Lookahead(inner, sync_period=2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    lookahead = model.optimizer.inner_optimizer
    assert unwrap(model.optimizer) is inner and int(inner.sketch_updates) > 0
    assert all(s.dtype == "float32" for s in lookahead.slow_weights)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_save_load_and_backup_and_restore_resume_exactly(tmp_path):
    x, y = _least_squares(n=32)

    def opt():
        return Lookahead(keras.optimizers.Adam(0.05), sync_period=3, slow_step_size=0.5)

    with float64_everywhere():
        _, straight = _linear(x, y, opt(), epochs=4)
        _, first = _linear(x, y, opt(), epochs=2)
        path = str(tmp_path / "lookahead.keras")
        first.save(path)
        loaded = keras.models.load_model(path)
        assert isinstance(loaded.optimizer, Lookahead)
        assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Adam)
        loaded.fit(x, y[:, None], batch_size=8, epochs=2, shuffle=False, verbose=0)

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == 2:
                    raise RuntimeError("preempted")

        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        with pytest.raises(RuntimeError, match="preempted"):
            _linear(x, y, opt(), epochs=4, callbacks=[backup, Interrupt()])
        _, resumed = _linear(x, y, opt(), epochs=4, callbacks=[backup])
    for model in (loaded, resumed):
        assert int(model.optimizer.iterations) == 16
        np.testing.assert_allclose(model.get_weights()[0], straight.get_weights()[0], atol=1e-12)
        for a, b in zip(model.optimizer.slow_weights, straight.optimizer.slow_weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-12)


def test_config_round_trip():
    opt = Lookahead(SketchySGD(rank=4, seed=1), sync_period=7, slow_step_size=0.25)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, Lookahead) and isinstance(again.inner_optimizer, SketchySGD)
    assert again.get_config() == opt.get_config()
    assert again.inner_optimizer.rank == 4


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((keras.optimizers.SGD(),), {"sync_period": 0}, "sync_period"),
        ((keras.optimizers.SGD(),), {"sync_period": 2.0}, "sync_period"),
        ((keras.optimizers.SGD(),), {"slow_step_size": 0.0}, "slow_step_size"),
        ((keras.optimizers.SGD(),), {"slow_step_size": 1.5}, "slow_step_size"),
        (("adam",), {}, "inner_optimizer"),
        ((keras.optimizers.SGD(),), {"weight_decay": 0.1}, "weight_decay"),
    ],
)
def test_bad_arguments(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        Lookahead(*args, **kwargs)
