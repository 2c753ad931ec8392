"""Pins every Keras / TensorFlow private (or convention) keras-curv relies on.

All of them are wrapped in ``keras_curv._internal.keras_privates``; when a Keras or
TensorFlow upgrade moves one, the test named after it fails here.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv._internal import keras_privates as kp


def test_under_xla():
    assert not kp.under_xla()
    seen = []

    @tf.function(jit_compile=True)
    def compiled(x):
        seen.append(kp.under_xla())
        return x + 1

    @tf.function
    def plain(x):
        seen.append(kp.under_xla())
        return x + 1

    compiled(tf.constant(1.0))
    plain(tf.constant(1.0))
    assert seen == [True, False]


def test_strategy_needs_merge_call():
    assert not kp.strategy_needs_merge_call()
    assert callable(tf.__internal__.distribute.strategy_supports_no_merge_call)


def test_maybe_merge_call_runs_updates_without_a_strategy():
    variable = tf.Variable(1.0)

    def update(strategy, value):
        strategy.extended.update(variable, lambda v, x: v.assign_add(x), args=(value,))

    kp.maybe_merge_call(update, tf.constant(2.0))
    assert float(variable.numpy()) == 3.0
    assert callable(tf.__internal__.distribute.interim.maybe_merge_call)


def test_flatten_layers_reaches_nested_layers():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="inner_dense")])
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="outer")(inner(inputs)))
    names = [layer.name for layer in kp.flatten_layers(model)]
    assert "inner_dense" in names and "outer" in names and model.name not in names


def test_call_takes_training():
    class WithTraining(keras.Model):
        def call(self, x, training=None):
            return x

    class Without(keras.Model):
        def call(self, x):
            return x

    assert kp.call_takes_training(WithTraining())
    assert not kp.call_takes_training(Without())


def test_has_random_state():
    assert kp.has_random_state(keras.layers.Dropout(0.5))
    assert kp.has_random_state(keras.layers.GaussianNoise(0.1))
    assert not kp.has_random_state(keras.layers.Dense(2))
    # RNN cells own a generator always and draw only with dropout (DropoutRNNCell).
    for rnn in (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN):
        quiet, noisy, recurrent = rnn(3), rnn(3, dropout=0.2), rnn(3, recurrent_dropout=0.1)
        assert quiet.cell._seed_generators and isinstance(quiet.cell, kp.DropoutRNNCell)
        assert not kp.has_random_state(quiet.cell)
        assert kp.has_random_state(noisy.cell) and kp.has_random_state(recurrent.cell)


def test_softmax_logits_are_kept_on_softmax_outputs():
    logits = tf.constant([[1.0, 2.0, 0.5]])
    seen = []

    @tf.function
    def forward(z):
        out = keras.activations.softmax(z)
        seen.append(kp.softmax_logits(out) is not None)
        return out

    forward(logits)
    assert seen == [True]


def test_cross_entropy_reads_the_logits_given_to_probabilities():
    logits = tf.constant([[1.0, 2.0, 0.5]])
    loss = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def gradient(z):
        tagged = kp.with_softmax_logits(tf.stop_gradient(tf.nn.softmax(z)), z)
        return tf.gradients(loss(tf.constant([1]), tagged), z)[0]

    expected = tf.nn.softmax(logits) - tf.one_hot([1], 3)
    np.testing.assert_allclose(gradient(logits).numpy(), expected.numpy(), rtol=1e-6)


def test_run_before_adds_a_control_input():
    @tf.function
    def graph(x):
        y = x * 2.0
        guard = tf.no_op()
        assert kp.run_before(y.op, guard)
        assert guard in y.op.control_inputs
        return y

    graph(tf.constant(1.0))


def test_optimizer_privates():
    variables = [keras.Variable(np.ones(3)), keras.Variable(np.ones(2))]
    optimizer = keras.optimizers.SGD(clipnorm=1.0)
    optimizer.build(variables)
    assert kp.variable_index(optimizer, variables[1]) == 1
    extra = keras.Variable(np.zeros(1), trainable=False)
    kp.track_optimizer_variable(optimizer, extra)
    assert any(v is extra for v in optimizer.variables)
    clipped = kp.clipped_gradients(optimizer, [tf.constant([3.0, 4.0, 0.0]), tf.ones(2)])
    np.testing.assert_allclose(np.linalg.norm(clipped[0]), 1.0, rtol=1e-6)


def test_stateless_seed_reproduces_keras_random_draws():
    # Two generators in the same state: keras.random's draw, and a stateless draw from
    # the seed pair, must agree (the convention of Keras's TF backend, `_cast_seed`).
    ours = keras.random.SeedGenerator(2**40 + 5)
    theirs = keras.random.SeedGenerator(2**40 + 5)
    seed = kp.stateless_seed(ours.next())
    assert seed.dtype == tf.int32
    mine = tf.random.stateless_uniform((3, 7), seed=seed, minval=0, maxval=2, dtype=tf.int32)
    expected = keras.random.randint((3, 7), 0, 2, dtype="int32", seed=theirs)
    np.testing.assert_array_equal(mine.numpy(), np.asarray(expected))
    uniform = tf.random.stateless_uniform((4,), seed=kp.stateless_seed(ours.next()))
    expected = keras.random.uniform((4,), seed=theirs)
    np.testing.assert_array_equal(uniform.numpy(), np.asarray(expected))
    np.testing.assert_array_equal(ours.state.numpy(), theirs.state.numpy())


def test_calling_models_finds_the_model_among_callers():
    class Model(keras.Model):
        def probe(self):
            return list(kp.calling_models(start_depth=1))

    model = Model()
    assert any(found is model for found in model.probe())


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: keras.layers.Dense(3, activation="relu"), (2, 4)),
        (lambda: keras.layers.Conv2D(2, 2, activation="relu"), (1, 4, 4, 1)),
        (lambda: keras.layers.DepthwiseConv2D(2, activation="relu"), (1, 4, 4, 2)),
        (lambda: keras.layers.Conv1D(2, 2, activation="relu"), (1, 4, 2)),
    ],
)
def test_layers_apply_their_activation_last(make, shape):
    """Layer taps run ``call`` with ``activation=None`` to see the pre-activation output."""
    keras.utils.set_random_seed(0)  # the layer is made here: its weights follow the seed
    layer = make()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    out = layer(x).numpy()
    activation = layer.activation
    object.__setattr__(layer, "activation", None)
    try:
        pre = layer(x).numpy()
    finally:
        object.__setattr__(layer, "activation", activation)
    np.testing.assert_allclose(out, np.maximum(pre, 0.0), rtol=1e-6)
    assert np.any(pre < 0)


def test_train_steps_call_compute_loss():
    """The recorder wraps ``model.compute_loss``, which every Keras train step calls."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from keras.src.trainers.trainer import Trainer

    assert "self._compute_loss(" in inspect.getsource(TensorFlowTrainer.train_step)
    assert "self.compute_loss(" in inspect.getsource(Trainer._compute_loss)
    assert hasattr(Trainer, "stateless_compute_loss")


def test_tf_function_retraces_a_first_call_that_creates_variables():
    """Why a first trace without a record never runs (keras_curv/optimizers/contract.py)."""
    traces, runs = [], []
    created = []

    @tf.function
    def step():
        traces.append(1)
        if not created:
            created.append(tf.Variable(0.0))
        tf.py_function(lambda: runs.append(len(traces)), [], [])
        return tf.constant(0.0)

    step()
    assert len(traces) == 2 and runs == [2]


def test_loss_scale_optimizer_calls_the_inner_optimizer_in_a_merge_call():
    """With merge_call, TrainBatch.replicas sums the statistics in the step graph."""
    source = inspect.getsource(keras.optimizers.LossScaleOptimizer._tf_apply)
    assert "merge_call" in source and "call_for_each_replica" in source


def test_applied_steps_counts_every_applied_batch_under_accumulation():
    variable = keras.Variable(np.ones(2, "float32"))
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    optimizer.build([variable])
    for _ in range(3):
        optimizer.apply([tf.ones(2)], [variable])
    assert int(kp.applied_steps(optimizer).numpy()) == 3
    assert int(optimizer.iterations.numpy()) == 1


def test_loss_scale_optimizer_skips_without_advancing_the_step_counter():
    variable = keras.Variable(np.ones(2, "float32"))
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    optimizer.build([variable])
    optimizer.apply([tf.constant([np.inf, 1.0])], [variable])
    optimizer.apply([tf.ones(2)], [variable])
    assert int(kp.applied_steps(optimizer.inner_optimizer).numpy()) == 1
    assert optimizer.iterations is optimizer.inner_optimizer.iterations


@pytest.mark.parametrize(
    "optimizer, kind, slots",
    [
        (keras.optimizers.Adam(amsgrad=True), "adam", ("velocity", "velocity_hat")),
        (keras.optimizers.AdamW(), "adam", ("velocity",)),
        (keras.optimizers.RMSprop(centered=True), "rmsprop", ("velocity", "average_gradient")),
    ],
)
def test_optimizer_slots_follow_the_variables(optimizer, kind, slots):
    variables = [keras.Variable(np.ones(3, "float32")), keras.Variable(np.ones(2, "float32"))]
    optimizer.build(variables)
    optimizer.apply([tf.fill([3], 2.0), tf.fill([2], 3.0)], variables)
    for slot in slots:
        found = kp.optimizer_slots(optimizer, kind, slot)
        assert [tuple(v.shape) for v in found] == [(3,), (2,)]
    velocity = kp.optimizer_slots(optimizer, kind, "velocity")
    rho = optimizer.beta_2 if kind == "adam" else optimizer.rho
    np.testing.assert_allclose(velocity[1].numpy(), (1 - rho) * 9.0, rtol=1e-6)


def test_multi_worker_fit_workaround_targets():
    """keras-team/keras#20585: what ``work_around_multi_worker_fit`` works around.

    ``_maybe_symbolic_build`` reduces the nested input batch, and ``reduce_per_replica``
    reduces the logs along ``axis=0``, under a multi-worker strategy; Keras reads
    ``train_step``/``test_step`` off the instance when it makes its functions. When
    ``tests/optimizers/test_multi_worker.py``'s canary fails, the bug is fixed.
    """
    from keras.src.backend.tensorflow import trainer
    from tensorflow.python.distribute.collective_all_reduce_strategy import (
        CollectiveAllReduceExtended,
    )

    build = trainer.TensorFlowTrainer._maybe_symbolic_build
    assert list(inspect.signature(build).parameters) == ["self", "iterator", "data_batch"]
    source = inspect.getsource(build)
    assert "for _, _, it in iterator:" in source
    assert "self.distribute_strategy.reduce(" in source
    assert "self._symbolic_build(data_batch=data_batch)" in source
    reduce_source = inspect.getsource(trainer.reduce_per_replica)
    assert 'strategy.reduce("MEAN", v, axis=0)' in reduce_source
    assert "_collective_all_reduce_multi_worker(strategy)" in reduce_source
    assert "self._make_function(self.train_step)" in inspect.getsource(
        trainer.TensorFlowTrainer.make_train_function
    )
    assert "self._make_function(self.test_step)" in inspect.getsource(
        trainer.TensorFlowTrainer.make_test_function
    )
    assert callable(CollectiveAllReduceExtended._in_multi_worker_mode)


def test_multi_worker_fit_workaround_is_inert_on_one_worker():
    assert not kp.spans_several_workers(tf.distribute.get_strategy())
    assert not kp.spans_several_workers(tf.distribute.MirroredStrategy(["/cpu:0"]))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    original = model.train_step
    kp.work_around_multi_worker_fit(model)
    kp.work_around_multi_worker_fit(model)  # idempotent: one wrapper, not two
    assert model.train_step.__wrapped__ == original
    assert model._maybe_symbolic_build.__wrapped__ == type(model)._maybe_symbolic_build.__get__(
        model
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.shape(logs["loss"]) == ()  # no replica axis added on one worker
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.shape(history.history["loss"][0]) == ()
