"""keras_curv.Shampoo through compile/fit against a NumPy transcription, and Keras's features."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks import SkippedSteps
from keras_curv.models import small_cnn
from keras_curv.optimizers import Shampoo
from tests.architectures import ZOO, first_epoch
from tests.conftest import float64_everywhere
from tests.optimizers import _shampoo_reference as reference
from tests.optimizers._fresh_process import json_reports

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Tensor4(keras.layers.Layer):
    """``y = Σ_ijk x_nijk K_ijko + b``: a linear layer with a rank-4 kernel."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(*input_shape[1:], 5), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(5,), initializer="random_normal")

    def call(self, x):
        return tf.einsum("nijk,ijko->no", x, self.kernel) + self.bias


def _two_layers(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((2, 3, 2)), Tensor4(), keras.layers.Dense(3, bias_initializer="random_normal")]
    )


def _numpy_gradients(weights, x, t):
    """Gradients of ``mean((y - t)²)`` for the two linear layers above."""
    K, b1, W, b2 = weights
    h = np.einsum("nijk,ijko->no", x, K) + b1
    y = h @ W + b2
    dy = 2.0 * (y - t) / y.size
    dh = dy @ W.T
    return [np.einsum("nijk,no->ijko", x, dh), dh.sum(0), h.T @ dy, dy.sum(0)]


_HP = {
    "lr": 0.05, "beta_1": 0.8, "beta_2": 0.9, "epsilon": 1e-6, "every": 2, "start": 1,
    "grafting": "adam", "grafting_epsilon": 1e-8, "weight_decay": 0.0,
}  # fmt: skip
# (block size, merge, the kernel's preconditioner shape as the docs define it, overrides)
_CASES = {
    "matrix": (1024, True, (12, 5), {}),
    "rank4_blocked": (4, True, (2, 3, 2, 5), {}),
    "rank3_merged_sgd": (6, True, (6, 2, 5), {"grafting": "sgd", "start": 3}),
    "rank4_unmerged_none": (1024, False, (2, 3, 2, 5), {"grafting": "none", "every": 1}),
    # 0.125: Keras casts a Python weight decay to the weight's dtype through float32.
    "weight_decay_start0": (1024, True, (12, 5), {"weight_decay": 0.125, "start": 0, "every": 3}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_golden_values_through_fit(case):
    block_size, merge, layout, overrides = _CASES[case]
    hp = {**_HP, **overrides}
    steps, batch = 7, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 2, 3, 2))
    t = rng.normal(size=(steps * batch, 3))
    with float64_everywhere():
        model = _two_layers()
        w = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        opt = Shampoo(
            hp["lr"], beta_1=hp["beta_1"], beta_2=hp["beta_2"], epsilon=hp["epsilon"],
            precondition_every=hp["every"], start_preconditioning_step=hp["start"],
            block_size=block_size, grafting=hp["grafting"], merge_small_axes=merge,
            weight_decay=hp["weight_decay"] or None,
        )  # fmt: skip
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, t, batch_size=batch, shuffle=False, verbose=0)
        got = [v.numpy() for v in model.trainable_variables]
    layouts = [layout, None, (5, 3), None]
    assert opt.preconditioner_shapes() == layouts
    states = [reference.VariableState(v.shape, lay, block_size) for v, lay in zip(w, layouts)]
    for s in range(steps):
        rows = slice(s * batch, (s + 1) * batch)
        grads = _numpy_gradients(w, x[rows], t[rows])
        w = [reference.step(st, wi, g, s, hp) for st, wi, g in zip(states, w, grads)]
    moved = max(np.max(np.abs(a - b.numpy())) for a, b in zip(w, _two_layers().weights))
    assert moved > 0.1
    for expected, actual in zip(w, got):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)
    # The roots the optimizer holds are those of the transcription.
    for state, roots in zip(states, opt.inverse_roots):
        for block, held in zip(state.blocks, roots):
            for r, h in zip(block["roots"], held):
                np.testing.assert_allclose(h.numpy(), r, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ Keras's features


def _regression(n=24, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2, 3, 2)), rng.normal(size=(n, 3))


def _fit64(opt, *, epochs=2, batch=4, x=None, t=None, **compile_kwargs):
    """The two-layer model of the golden test, trained in float64; returns it."""
    x, t = _regression() if x is None else (x, t)
    with float64_everywhere():
        model = _two_layers()
        model.compile(optimizer=opt, loss="mse", **compile_kwargs)
        model.fit(x, t, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return model


def _assert_same_weights(a, b, atol=1e-12):
    for p, q in zip(a.weights, b.weights):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=0, atol=atol)


def _small(**kwargs):
    """Roots from step 1 and every 2 steps, blocks of 4. ε 1e-6, not 1e-12: where two runs
    are compared, rounding differences in near-null eigenvalues stay small in the roots.
    lr 0.0625 is exact in float32, the dtype of Keras's learning-rate variable when the
    optimizer is made outside float64_everywhere."""
    settings = {
        "learning_rate": 0.0625, "epsilon": 1e-6, "precondition_every": 2,
        "start_preconditioning_step": 1, "block_size": 4,
    }  # fmt: skip
    return Shampoo(**{**settings, **kwargs})


def test_jit_compile_and_steps_per_execution_equal_graph_mode():
    graph = _fit64(_small())
    xla = _fit64(_small(), jit_compile=True, steps_per_execution=3)
    assert int(xla.optimizer.iterations) == 12
    # XLA's eigh is a Jacobi method that stops early: its float64 eigenvectors are good to
    # ~1e-10..1e-7 (LAPACK's to 1e-15), amplified in the roots of near-null eigenvalues.
    # A wrong schedule or update differs by 1e-2.
    _assert_same_weights(graph, xla, atol=1e-5)
    assert (
        max(
            np.max(np.abs(a.numpy() - b.numpy()))
            for a, b in zip(graph.weights, _two_layers().weights)
        )
        > 0.1
    )


def test_hand_written_loop_with_apply_gradients_equals_fit():
    x, t = _regression()
    fitted = _fit64(_small(), epochs=1)
    with float64_everywhere():
        model = _two_layers()
        opt = _small()
        loss = keras.losses.MeanSquaredError()

        @tf.function
        def train_step(xb, tb):
            with tf.GradientTape() as tape:
                value = loss(tb, model(xb))
            grads = tape.gradient(value, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        for s in range(0, len(x), 4):
            train_step(tf.constant(x[s : s + 4]), tf.constant(t[s : s + 4]))
    _assert_same_weights(fitted, model)
    assert int(opt.iterations) == 6


def test_gradient_accumulation_equals_the_larger_batch():
    """Two accumulated batches of 4 are one batch of 8: roots are refreshed on the same
    update steps (the schedule counts updates, not micro-batches)."""
    big = _fit64(_small(), batch=8, epochs=3)
    accumulated = _fit64(_small(gradient_accumulation_steps=2), batch=4, epochs=3)
    _assert_same_weights(big, accumulated, atol=1e-12)
    assert int(accumulated.optimizer.iterations) == 9  # Keras counts the updates


def test_sample_weights_and_regularization_reach_the_statistics():
    """Keras folds both into the gradient; the statistics must see that gradient."""
    x, t = _regression()
    weights = np.where(np.arange(len(x)) % 2 == 0, 2.0, 0.5)
    with float64_everywhere():
        runs = []
        for sample_weight, l2 in (
            (None, None),
            (weights, None),
            (None, keras.regularizers.L2(0.1)),
        ):
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [keras.Input((2, 3, 2)), Tensor4(), keras.layers.Dense(3, kernel_regularizer=l2)]
            )
            opt = _small()
            model.compile(optimizer=opt, loss="mse")
            model.fit(x, t, sample_weight=sample_weight, batch_size=24, epochs=1, verbose=0)
            runs.append(opt.statistics[2][0][0].numpy())
    # One full-batch step: L = (1 − β₂) G Gᵀ of that step's gradient; all three differ.
    assert not np.allclose(runs[0], runs[1]) and not np.allclose(runs[0], runs[2])


def test_clipnorm_clips_the_gradient_the_statistics_see():
    x, t = _regression()
    with float64_everywhere():
        model = _two_layers()
        with tf.GradientTape() as tape:
            value = keras.losses.MeanSquaredError()(t, model(x))
        grads = [g.numpy() for g in tape.gradient(value, model.trainable_variables)]
        opt = Shampoo(0.05, beta_2=0.5, clipnorm=1e-3)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, t, batch_size=24, epochs=1, verbose=0)
    g = grads[2] * 1e-3 / np.linalg.norm(grads[2])  # the Dense kernel, clipped alone
    left, right = opt.statistics[2][0]
    np.testing.assert_allclose(left.numpy(), 0.5 * g @ g.T, rtol=1e-10)
    np.testing.assert_allclose(right.numpy(), 0.5 * g.T @ g, rtol=1e-10)


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.0625, 0.0])
    x, t = _regression()
    four = _fit64(_small(learning_rate=schedule), epochs=1, x=x[:16], t=t[:16])
    six = _fit64(_small(learning_rate=schedule), epochs=1)
    # Steps 0..3 use lr 0.0625 (the schedule reads the step before it is counted), then 0.
    _assert_same_weights(four, six, atol=0)
    assert (
        max(
            np.max(np.abs(a.numpy() - b.numpy()))
            for a, b in zip(six.weights, _two_layers().weights)
        )
        > 0.1
    )


def test_ema_leaves_training_alone_and_is_swapped_in_at_the_end():
    plain = _fit64(_small())
    averaged = _fit64(_small(use_ema=True, ema_momentum=0.5))
    for a, b in zip(plain.optimizer.statistics, averaged.optimizer.statistics):
        for p, q in zip(sum(a, []), sum(b, [])):
            np.testing.assert_array_equal(p.numpy(), q.numpy())
    # fit ends by swapping the averages in (Keras's finalize_variable_values).
    assert not np.allclose(averaged.weights[0].numpy(), plain.weights[0].numpy())
    assert all(np.all(np.isfinite(w.numpy())) for w in averaged.weights)


def test_weights_of_rank_below_two_use_grafting_alone():
    """Bias and scale: exactly Adam's normalised gradient with momentum on it."""
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    with float64_everywhere():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.LayerNormalization()])
        w = [v.numpy() for v in model.trainable_variables]
        opt = Shampoo(0.1, beta_1=0.5, start_preconditioning_step=0)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, t, batch_size=8, epochs=1, verbose=0)
    assert opt.preconditioner_shapes() == [None, None] and opt.statistics == [[], []]
    hp = {**_HP, "lr": 0.1, "beta_1": 0.5, "beta_2": 0.999, "start": 0}
    xn = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-3)
    dy = 2 * (xn * w[0] + w[1] - t) / t.size
    grads = [(dy * xn).sum(0), dy.sum(0)]
    for v, wi, g in zip(model.trainable_variables, w, grads):
        state = reference.VariableState(wi.shape, None, 1024)
        np.testing.assert_allclose(v.numpy(), reference.step(state, wi, g, 0, hp), rtol=1e-10)


# ------------------------------------------------------- non-finite steps, resume


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_nan_batch_is_skipped_without_touching_weights_or_state(jit):
    x, t = _regression(n=16)
    x[9, 0, 0, 0] = np.nan  # the third batch of 4
    snapshots = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: snapshots.append(
            (
                [w.numpy().copy() for w in model.weights],
                {v.path: np.asarray(v).copy() for v in model.optimizer.variables},
            )
        )
    )
    with float64_everywhere():
        model = _two_layers()
        model.compile(optimizer=_small(start_preconditioning_step=0), loss="mse", jit_compile=jit)
        with pytest.warns(RuntimeWarning, match="1 training step"):
            model.fit(
                x, t, batch_size=4, shuffle=False, verbose=0, callbacks=[SkippedSteps(), record]
            )
    opt = model.optimizer
    assert int(opt.skipped_steps) == 1 and int(opt.iterations) == 3
    (w_before, s_before), (w_after, s_after) = snapshots[1], snapshots[2]
    for a, b in zip(w_before, w_after):
        np.testing.assert_array_equal(a, b)
    changed = [p for p in s_after if not np.array_equal(s_after[p], s_before[p])]
    assert changed == [opt.skipped_steps.path]
    assert not np.array_equal(snapshots[3][0][0], w_after[0])  # training goes on
    assert all(np.all(np.isfinite(np.asarray(v))) for v in [*model.weights, *opt.variables])
    assert float(opt.curvature_summary()["skipped_steps"]) == 1.0


def test_save_load_and_backup_and_restore_resume_equal_uninterrupted(tmp_path):
    x, t = _regression(n=16)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("simulated preemption")

    def run(epochs, callbacks=(), model=None):
        with float64_everywhere():
            if model is None:
                model = _two_layers()
                model.compile(optimizer=_small(precondition_every=3), loss="mse")
            try:
                model.fit(x, t, batch_size=4, epochs=epochs, shuffle=False, verbose=0,
                          callbacks=list(callbacks))  # fmt: skip
            except RuntimeError as error:
                assert "preemption" in str(error)
        return model

    straight = run(5)
    # .keras save and load after 2 epochs (8 steps: roots from steps 1, 4, 7), 3 more.
    first = run(2)
    path = str(tmp_path / "shampoo.keras")
    first.save(path)
    loaded = keras.models.load_model(path, custom_objects={"Tensor4": Tensor4})
    assert isinstance(loaded.optimizer, Shampoo)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed = run(3, model=loaded)
    # BackupAndRestore: interrupted at epoch 2, resumed by a fresh model and optimizer.
    backup = str(tmp_path / "backup")
    run(5, [keras.callbacks.BackupAndRestore(backup), Interrupt()])
    restored = run(5, [keras.callbacks.BackupAndRestore(backup)])
    for model in (resumed, restored):
        assert int(model.optimizer.iterations) == 20
        _assert_same_weights(straight, model, atol=1e-12)
        for a, b in zip(straight.optimizer.variables, model.optimizer.variables):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_statistics_in_float32_and_trains(policy):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data[:384] / 16.0).reshape(-1, 8, 8, 1).astype("float32"), digits.target[:384]
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = small_cnn((8, 8, 1), 10)
        model.compile(optimizer=Shampoo(3e-3), loss=LOSS)
        history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    opt = model.optimizer
    if policy == "mixed_float16":
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
        opt = opt.inner_optimizer
    state = [v for blocks in opt.statistics + opt.inverse_roots for b in blocks for v in b]
    assert state and all(v.dtype == "float32" for v in state)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in [*state, *model.weights])
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


# ------------------------------------------------------------ arguments, config


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"precondition_every": 0}, "precondition_every"),
        ({"precondition_every": 10.0}, "precondition_every"),
        ({"start_preconditioning_step": -1}, "start_preconditioning_step"),
        ({"start_preconditioning_step": True}, "start_preconditioning_step"),
        ({"block_size": 0}, "block_size"),
        ({"grafting": "adagrad"}, "grafting"),
        ({"grafting_epsilon": -1e-8}, "grafting_epsilon"),
        ({"merge_small_axes": 1}, "merge_small_axes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Shampoo(**kwargs)


def test_config_round_trip_and_summary():
    opt = Shampoo(learning_rate=0.2, beta_1=0.8, beta_2=0.99, epsilon=1e-8, precondition_every=3,
                  start_preconditioning_step=0, block_size=64, grafting="sgd",
                  merge_small_axes=False, weight_decay=0.01, clipnorm=1.0)  # fmt: skip
    again = Shampoo.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, Shampoo) and restored.get_config() == opt.get_config()
    assert Shampoo().get_config()["start_preconditioning_step"] is None

    x, t = _regression(n=16)
    model = _fit64(_small(precondition_every=3), epochs=1, x=x, t=t)  # 4 steps: roots at 1
    summary = {k: np.asarray(v) for k, v in model.optimizer.curvature_summary().items()}
    assert summary["root_updates"] == 1.0 and summary["skipped_steps"] == 0.0
    np.testing.assert_allclose(summary["preconditioned_fraction"], (60 + 15) / (60 + 5 + 15 + 3))
    condition = summary["statistics_log10_condition_per_variable"]
    assert condition.shape == (4,) and condition[1] == condition[3] == 0.0
    for index in (0, 2):
        values = [
            np.linalg.eigvalsh(s.numpy()) for b in model.optimizer.statistics[index] for s in b
        ]
        expected = max(np.log10(v[-1] / max(v[0], 1e-6 * v[-1])) for v in values)
        np.testing.assert_allclose(condition[index], expected, rtol=1e-5)
        assert 0.5 < condition[index] <= 6.0


# ------------------------------------------------------------------- distribution


@pytest.mark.slow
def test_two_replicas_equal_one_device_in_a_fresh_process():
    """MirroredStrategy over 2 logical CPUs == 1 device on the same global batches.

    The statistics are built from the all-reduced gradient, so both replicas hold the same
    statistics and roots. Tolerances: float64 tight; float32 and mixed precision to the
    roots' accuracy u / ε (see the case script) and the policies' rounding.
    """
    script = os.path.join(os.path.dirname(__file__), "_shampoo_distributed_case.py")
    tolerance = {
        "shampoo_f64": 1e-12, "shampoo_sgd_weighted_decay": 1e-12,
        "shampoo_loss_scaled_f64": 1e-12, "shampoo_f32": 1e-4,
        "shampoo_mixed_float16": 1e-2, "shampoo_mixed_bfloat16": 0.1,
    }  # fmt: skip
    # Two processes side by side (tracing dominates).
    groups = [[c for c in tolerance if "f64" in c or "decay" in c]]
    groups.append([c for c in tolerance if c not in groups[0]])
    report = {}
    for part in json_reports(script, groups, timeout=900):
        report.update(part)
    assert set(report) == set(tolerance)
    for case, result in report.items():
        assert result["num_replicas"] == 2 and result["iterations"] == [6, 6], case
        assert result["replicas_agree"] and result["finite"], case
        assert result["moved"] > 0.05, case
        assert result["abs"] < tolerance[case] * max(1.0, result["moved"]), (case, result)


def test_gradient_whose_square_overflows_is_skipped_in_eager_apply_gradients():
    """1e20 is finite in float32, 1e40 (its square) is not: the statistics would be inf."""
    w = tf.Variable(tf.ones((3, 2)))
    opt = Shampoo(0.1, start_preconditioning_step=0)
    opt.apply_gradients([(tf.fill((3, 2), 1e20), w)])
    assert int(opt.skipped_steps) == 1 and int(opt.iterations) == 0
    np.testing.assert_array_equal(w.numpy(), np.ones((3, 2)))
    assert all(np.all(np.asarray(s) == 0) for s in opt.statistics[0][0])
    opt.apply_gradients([(tf.constant([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), w)])
    assert int(opt.iterations) == 1 and not np.allclose(w.numpy(), 1.0)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in opt.variables)


# ------------------------------------------------------------------ the proof


@pytest.mark.slow
def test_rotated_kronecker_quadratic_far_below_tuned_adam():
    """Hessian Σₓ ⊗ MMᵀ of condition 1e4 with random eigenvectors; 40 full-gradient steps.

    Best over learning rates 10^(-1..2) (7) and beta_1 in {0, 0.5, 0.9} for each. Measured
    on this grid: Adam 2.0e4, Shampoo at its default schedule 2.0e3, with roots every step
    1.7, from 5.9e6 (the full grid of benchmarks/shampoo.py: 1.5e4, 79 and 0.0125).
    """
    from benchmarks.shampoo import quadratic

    rates = tuple(float(r) for r in np.logspace(-1, 2, 7))
    result = quadratic(learning_rates=rates, beta_1s=(0.0, 0.5, 0.9), log=lambda *_: None)
    best = {name: row["best_loss"] for name, row in result["rows"].items()}
    assert result["initial_loss"] > 1e6 and 0.9e4 < result["hessian_condition"] < 1.1e4
    assert best["adam"] < 0.01 * result["initial_loss"]  # Adam is tuned, it does progress
    assert best["shampoo"] < 0.2 * best["adam"]
    assert best["shampoo_every_step"] < 1e-3 * best["adam"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_defaults_train_every_zoo_model(name):
    """One epoch at Shampoo's defaults: the training loss goes down, nothing blows up.

    Measured (final / initial): mlp 2.151/2.347, cnn 2.171/2.299, batchnorm_cnn
    2.3015/2.3025 (its eval-mode loss moves with the BatchNorm statistics; Adam's is the
    same), transformer 1.229/1.458, lstm 1.375/1.386, two_input 2.216/2.383.
    """
    result = first_epoch(name, Shampoo())
    assert np.isfinite(result["final"]) and result["final"] < result["initial"], result
    assert result["max_weight_change"] < 1.0, result
