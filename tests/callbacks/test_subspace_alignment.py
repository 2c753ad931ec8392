"""SubspaceAlignment against NumPy oracles, its summaries, and the no-interference guarantee."""

import importlib.util
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
from keras_curv.curvature import class_gradients
from tests.callbacks.conftest import (
    NUM_CLASSES,
    dense_spectrum,
    mean_xent,
    read_events,
    tiny_data,
    tiny_model,
)
from tests.curvature.helpers import flat_params, unflat

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def numpy_measures(directions, eigvecs, gradient):
    """Independent transcriptions: brute-force assignment, QR overlap, SVD rank of [Q_v, Q_e]."""
    v = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    e = eigvecs.T
    cos = np.abs(v @ e.T)
    c = len(v)
    best = max(np.mean(cos[np.arange(c), list(p)]) for p in itertools.permutations(range(c)))
    qv, _ = np.linalg.qr(v.T)
    qe, _ = np.linalg.qr(e.T)
    # Singular values sqrt(1 ± cos φ) of [Q_v, Q_e]: counted above sqrt(1 - 0.9).
    sigma = np.linalg.svd(np.concatenate([qv, qe], axis=1), compute_uv=False)
    return {
        "alignment": best,
        "subspace_overlap": np.sum((qv.T @ qe) ** 2) / c,
        "combined_rank": float(np.sum(sigma > np.sqrt(1 - 0.9))),
        "gradient_fraction": np.sum((e @ gradient) ** 2) / (gradient @ gradient),
    }


def probe_gradient(model, x, y):
    theta = flat_params(model)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        non_trainable = [v.value for v in model.non_trainable_variables]
        out, _ = model.stateless_call(unflat(model, theta), non_trainable, tf.constant(x))
        loss = mean_xent(y)(out)
    return tape.gradient(loss, theta).numpy()


class DirectionsSGD(keras.optimizers.SGD):
    """An optimizer implementing the class_directions() protocol with fixed rows."""

    rows = None

    def class_directions(self):
        return tf.constant(self.rows)


def test_logged_measures_match_numpy_oracles(tmp_path, needs_tensorboard):
    x, y = tiny_data()
    probe = (x[:36], y[:36])
    model = tiny_model()
    optimizer = DirectionsSGD(0.1)
    dim = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    optimizer.rows = np.random.default_rng(3).standard_normal((NUM_CLASSES, dim))
    model.compile(loss=XENT, optimizer=optimizer)
    cb = SubspaceAlignment(probe, every_n_epochs=1, log_dir=str(tmp_path), tol=1e-10)
    history = model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[cb])

    _, vectors, _ = dense_spectrum(model, *probe)
    top = vectors[:, :NUM_CLASSES]
    g = probe_gradient(model, *probe)
    classes = class_gradients(model, *probe).numpy()
    expected = numpy_measures(classes, top, g)
    for name, value in expected.items():
        assert history.history[name][-1] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    opt = numpy_measures(optimizer.rows, top, g)
    q, _ = np.linalg.qr(optimizer.rows.T)
    opt["gradient_fraction"] = np.sum((q.T @ g) ** 2) / (g @ g)
    for name, value in opt.items():
        logged = history.history["optimizer_" + name][-1]
        assert logged == pytest.approx(value, rel=1e-6, abs=1e-9), name

    events = read_events(tmp_path / "curvature")
    logged = [float(v) for _, _, v in events["alignment/assignment_cosine"]]
    np.testing.assert_allclose(logged, history.history["alignment"], rtol=1e-6)
    for tag in ("subspace_overlap", "combined_rank", "gradient_fraction"):
        assert [s for s, _, _ in events[f"alignment/{tag}"]] == [0, 1]
        assert [s for s, _, _ in events[f"alignment/optimizer_{tag}"]] == [0, 1]
    assert events["alignment/principal_angles"][0][1] == "histograms"
    assert events["alignment/cosine_matrix"][0][1] == "images"
    assert events["alignment/optimizer_cosine_matrix"][0][1] == "images"


def test_a_regression_model_is_rejected_before_training():
    x = np.random.default_rng(0).standard_normal((20, 4))
    y = np.zeros(20)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    with pytest.raises(ValueError, match="C-way classifier"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SubspaceAlignment((x, y))])


def test_bad_class_directions_shape():
    class Bad(keras.optimizers.SGD):
        def class_directions(self):
            return np.ones((3, 5))

    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer=Bad())
    with pytest.raises(ValueError, match="class_directions"):
        model.fit(
            x, y, epochs=1, verbose=0, callbacks=[SubspaceAlignment((x, y), every_n_epochs=1)]
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": "x"}, "probe data"),
        ({"top_k": -1}, "top_k"),
        ({"rank_cos_tol": 1.5}, r"`rank_cos_tol` must be a number in \(0, 1\)"),
        ({"rank_cos_tol": 1.0}, "rank_cos_tol"),
        ({"method": "eigh"}, "`method` must be one of"),
        ({"max_overhead": None}, "Nothing is scheduled"),
        ({"every_n_batches": 1.5}, "every_n_batches"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    kwargs.setdefault("data", tiny_data())
    with pytest.raises(ValueError, match=match):
        SubspaceAlignment(**kwargs)


def bn_dropout_model():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def train(with_callbacks, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, 96)
    keras.utils.set_random_seed(1)
    model = bn_dropout_model()
    model.compile(loss=XENT, optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    callbacks = []
    if with_callbacks:
        probe = (x[:32], y[:32])
        # Summaries are part of what must not interfere, when tensorboard is there to write them.
        log_dir = str(tmp_path) if importlib.util.find_spec("tensorboard") else None
        callbacks = [
            HessianSpectrum(
                probe,
                every_n_batches=2,
                log_dir=log_dir,
                density=True,
                density_steps=5,
                training=True,
            ),
            SubspaceAlignment(probe, every_n_epochs=1, log_dir=log_dir),
            # Budget mode with room for everything: calibration, every epoch, train end.
            HessianSpectrum(probe, max_overhead=1e9, trace_samples=3),
        ]
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=callbacks)
    return model


@pytest.mark.slow
def test_training_is_bit_for_bit_unchanged(tmp_path):
    plain = train(False, tmp_path)
    probed = train(True, tmp_path)
    assert len(plain.variables) == len(probed.variables)
    for a, b in zip(plain.variables, probed.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert len(plain.optimizer.variables) == len(probed.optimizer.variables)
    for a, b in zip(plain.optimizer.variables, probed.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # The BatchNorm moving statistics did move (so the comparison is not vacuous).
    moving_mean = [v for v in probed.variables if "moving_mean" in v.path][0]
    assert np.any(moving_mean.numpy() != 0)


def test_class_subspace_newton_state_reaches_logs_and_tensorboard(tmp_path):
    """End to end: the optimizer's own directions and curvature reach the diagnostics."""
    pytest.importorskip("tensorboard")
    import keras_curv
    from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype("float32"), np.arange(60) % 3
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    optimizer = keras_curv.ClassSubspaceNewton(learning_rate=0.05, curvature="gauss_newton")
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    history = model.fit(
        x,
        y,
        batch_size=30,
        epochs=2,
        verbose=0,
        callbacks=[
            HessianSpectrum((x, y), every_n_epochs=1, log_dir=str(tmp_path)),
            SubspaceAlignment((x, y), every_n_epochs=1, log_dir=str(tmp_path)),
        ],
    )
    assert "optimizer_alignment" in history.history
    assert 0.0 <= history.history["optimizer_alignment"][-1] <= 1.0 + 1e-9
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "curvature"), size_guidance={"tensors": 0}).Reload()
    tags = set(events.Tags()["tensors"])
    assert {"optimizer/curvature_1", "optimizer/inverse_curvature_3"} <= tags
    logged = events.Tensors("optimizer/curvature_2")[-1]
    value = float(tf.make_ndarray(logged.tensor_proto))
    np.testing.assert_allclose(value, float(optimizer.class_curvatures[1]), rtol=1e-5)


def test_degenerate_model_logs_nan_instead_of_stopping_training():
    """Zero class directions (a zero network without biases) must not abort fit."""
    from keras_curv.callbacks import SubspaceAlignment

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)).astype("float32"), np.arange(30) % 3
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="relu", kernel_initializer="zeros", use_bias=False),
            keras.layers.Dense(3, kernel_initializer="zeros", use_bias=False),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    callback = SubspaceAlignment((x, y), every_n_epochs=1, top_k=3)
    with pytest.warns(UserWarning, match="degenerate"):
        history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert len(history.history["loss"]) == 2
    assert np.isnan(history.history["alignment"]).all()
