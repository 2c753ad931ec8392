"""Bad input fails early, with an error that names the problem and the fix."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
from keras_curv.curvature import DenseOperator, top_eigenpairs
from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton

_XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype("float32"), rng.integers(0, 3, n)


def _model(outputs=3, activation=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(outputs, activation=activation),
        ]
    )


class _Batches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


def _fit(model, loss, y, optimizer=None, callbacks=()):
    """Fits one epoch; returns how many batches ran before the error (via the raise)."""
    x, _ = _data()
    model.compile(optimizer=optimizer or ClassSubspaceNewton(0.1), loss=loss)
    batches = _Batches()
    try:
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[*callbacks, batches])
    finally:
        _fit.batches = batches.count


# -------------------------------------------------------------- ClassSubspaceNewton


@pytest.mark.parametrize(
    "outputs, activation, loss, target",
    [
        (1, None, "mse", "regression"),
        (1, "sigmoid", "binary_crossentropy", "sigmoid"),
    ],
    ids=["regression", "single_sigmoid"],
)
def test_csn_refuses_models_without_classes(outputs, activation, loss, target):
    x, y = _data()
    labels = (y > 0).astype("float32")[:, None] if target == "sigmoid" else x[:, :1]
    model = _model(outputs, activation)
    weights = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=r"C-way classifier.*\(batch, C\).*single-sigmoid"):
        _fit(model, loss, labels)
    assert _fit.batches == 0  # raised while the first step was traced
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_csn_refuses_multi_output_models():
    x, y = _data()
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3)(hidden), keras.layers.Dense(3)(hidden)])
    model.compile(optimizer=ClassSubspaceNewton(0.1), loss=[_XENT, _XENT])
    with pytest.raises(ValueError, match="has 2 outputs.*Multi-output"):
        model.fit(x, (y, y), batch_size=8, verbose=0)


@pytest.mark.parametrize("loss", ["mse", keras.losses.Huber(), "categorical_hinge"])
def test_csn_refuses_a_non_classification_loss_on_a_classifier(loss):
    _, y = _data()
    with pytest.raises(ValueError, match="softmax cross-entropy.*sparse_categorical_crossentropy"):
        _fit(_model(), loss, np.eye(3)[y].astype("float32"))
    assert _fit.batches == 0


def test_csn_accepts_one_hot_labels_with_categorical_crossentropy():
    """The control of the tests above: the same classifier, the right loss."""
    _, y = _data()
    model = _model()
    _fit(model, keras.losses.CategoricalCrossentropy(from_logits=True), np.eye(3)[y])
    assert _fit.batches == 2
    assert int(model.optimizer.class_counts.numpy().sum()) > 0


_OPTIMIZERS = {"csn": lambda: ClassSubspaceNewton(0.1), "adahessian": lambda: AdaHessian(0.1)}
_SPARSE = r"sparse labels that are not whole numbers in \[0, 3\).*Remap the labels"
_ONE_HOT = r"one-hot labels whose rows are not distributions.*to_categorical"
_CCE = keras.losses.CategoricalCrossentropy(from_logits=True)


def _bad_labels(kind):
    _, y = _data()
    one_hot = np.eye(3, dtype="float32")[y]
    return {
        "above": (_XENT, y + 3, _SPARSE),
        "negative": (_XENT, y - 1, _SPARSE),
        "fractional": (_XENT, y + 0.5, _SPARSE),
        "one_hot_scaled": (_CCE, 3 * one_hot, _ONE_HOT),
        "one_hot_negative": (_CCE, -one_hot, _ONE_HOT),
    }[kind]


_KINDS = ["above", "negative", "fractional", "one_hot_scaled", "one_hot_negative"]


@pytest.mark.parametrize(
    "name, kind",
    [("csn", kind) for kind in _KINDS]
    + [("adahessian", "above"), ("adahessian", "one_hot_scaled")],
)
def test_invalid_training_labels_fail_at_the_first_batch(name, kind):
    # Before: TensorFlow's own kernel error for out-of-range labels (NaN on GPU), and
    # silent truncation or a loss of the wrong sign and scale for the other cases.
    loss, labels, message = _bad_labels(kind)
    model = _model()
    weights = [w.numpy().copy() for w in model.weights]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _fit(model, loss, labels, optimizer=_OPTIMIZERS[name]())
    assert _fit.batches == 0
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())


@pytest.mark.parametrize("name", ["csn"])
def test_invalid_labels_are_named_with_steps_per_execution(name):
    """The train step runs inside a loop: the check still runs before the loss kernel."""
    x, y = _data()
    model = _model()
    model.compile(optimizer=_OPTIMIZERS[name](), loss=_XENT, steps_per_execution=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=_SPARSE):
        model.fit(x, y + 3, batch_size=4, verbose=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kind", [("csn", "above"), ("csn", "one_hot_scaled"), ("adahessian", "fractional")]
)
def test_invalid_training_labels_skip_the_step_under_xla(name, kind):
    """XLA compiles no assertions: a batch with invalid labels is skipped and counted."""
    loss, labels, _ = _bad_labels(kind)
    x, _ = _data()
    model = _model()
    weights = [w.numpy().copy() for w in model.weights]
    optimizer = _OPTIMIZERS[name]()
    model.compile(optimizer=optimizer, loss=loss, jit_compile=True)
    model.fit(x, labels, batch_size=8, verbose=0)
    assert int(optimizer.skipped_steps) == 2
    assert int(optimizer.iterations) == 0
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name, jit", [("csn", True), ("adahessian", False)])
def test_valid_soft_and_float_labels_pass_the_label_check(name, jit):
    """The control: float whole-number sparse labels and soft (mixup-like) rows train."""
    x, y = _data()
    soft = 0.7 * np.eye(3)[y] + 0.3 * np.eye(3)[(y + 1) % 3]
    for loss, labels in ((_XENT, y.astype("float32")[:, None]), (_CCE, soft)):
        model = _model()
        optimizer = _OPTIMIZERS[name]()
        model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)
        model.fit(x, labels, batch_size=8, verbose=0)
        assert int(optimizer.skipped_steps) == 0
        assert int(optimizer.iterations) == 2


def test_a_nan_one_hot_row_is_left_to_the_non_finite_step_skip():
    """NaN labels give a NaN loss: skipped and counted (docs/hardening.md), not refused."""
    x, y = _data()
    labels = np.eye(3, dtype="float32")[y]
    labels[9, 1] = np.nan  # second batch of 8
    model = _model()
    optimizer = ClassSubspaceNewton(0.1)
    model.compile(optimizer=optimizer, loss=_CCE)
    model.fit(x, labels, batch_size=8, verbose=0)
    assert int(optimizer.skipped_steps) == 1
    assert int(optimizer.iterations) == 1


def test_adahessian_does_not_check_labels_of_other_losses():
    """AdaHessian works with any loss: regression targets are not class labels."""
    x, y = _data()
    model = _model()
    optimizer = AdaHessian(0.1)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, 10.0 * np.eye(3)[y] - 4.0, batch_size=8, verbose=0)
    assert int(optimizer.iterations) == 2


def test_labels_of_the_wrong_shape_fail_when_the_step_is_traced():
    _, y = _data()
    with pytest.raises(ValueError, match=r"target.shape=\(8, 2\)"):
        _fit(_model(), _XENT, np.stack([y, y], 1))
    assert _fit.batches == 0


# ---------------------------------------------------------------------- callbacks


@pytest.mark.parametrize("callback", [HessianSpectrum, SubspaceAlignment])
@pytest.mark.parametrize("data", [None, "x_only", "single"], ids=["none", "x_only", "tuple1"])
def test_callbacks_refuse_missing_data_at_construction(callback, data):
    x, y = _data()
    value = {"x_only": x, "single": (x,)}.get(data)
    with pytest.raises(ValueError, match=r"needs probe data as `\(x, y\)`"):
        callback(value, every_n_epochs=1)


@pytest.mark.parametrize("callback", [HessianSpectrum, SubspaceAlignment])
def test_callbacks_refuse_mismatched_rows_at_construction(callback):
    x, y = _data()
    with pytest.raises(ValueError, match="`x` has 16 rows but `y` has 5"):
        callback((x, y[:5]), every_n_epochs=1)


@pytest.mark.parametrize("callback", [HessianSpectrum, SubspaceAlignment])
def test_callbacks_name_probe_inputs_that_do_not_fit_the_model(callback):
    x, y = _data()
    probe = (np.zeros((8, 5), "float32"), y[:8])
    with pytest.raises(ValueError, match="probe inputs do not fit the model.*shaped like"):
        _fit(_model(), _XENT, y, optimizer="sgd", callbacks=[callback(probe, every_n_epochs=1)])
    assert _fit.batches == 0  # at on_train_begin, not at the first measurement


@pytest.mark.parametrize(
    "labels, message",
    [
        ("out_of_range", r"probe targets do not fit the loss.*valid range"),
        ("wrong_shape", r"probe targets do not fit the loss.*target.ndim - 1"),
    ],
)
def test_hessian_spectrum_names_probe_targets_that_do_not_fit_the_loss(labels, message):
    x, y = _data()
    bad = y + 3 if labels == "out_of_range" else np.stack([y, y], 1)
    callback = HessianSpectrum((x, bad), top_k=2, every_n_epochs=1)
    with pytest.raises(ValueError, match=message):
        _fit(_model(), _XENT, y, optimizer="sgd", callbacks=[callback])
    assert _fit.batches == 0


@pytest.mark.parametrize(
    "labels, message",
    [
        ("out_of_range", r"class labels.*\[0, 3\).*from 3 to 5"),
        ("wrong_shape", r"class labels.*one-hot of shape \(n, 3\); got shape \(16, 2\)"),
    ],
)
def test_subspace_alignment_needs_class_labels(labels, message):
    x, y = _data()
    bad = y + 3 if labels == "out_of_range" else np.stack([y, y], 1)
    callback = SubspaceAlignment((x, bad), every_n_epochs=1)
    with pytest.raises(ValueError, match=message):
        _fit(_model(), _XENT, y, optimizer="sgd", callbacks=[callback])
    assert _fit.batches == 0


def test_subspace_alignment_refuses_a_regression_model():
    x, _ = _data()
    target = x[:, :1]
    callback = SubspaceAlignment((x, target), every_n_epochs=1)
    with pytest.raises(ValueError, match=r"C-way classifier.*size 1"):
        _fit(_model(1), "mse", target, optimizer="sgd", callbacks=[callback])


@pytest.mark.parametrize(
    "callback, noun",
    [(HessianSpectrum, "eigenvalues"), (SubspaceAlignment, "eigenvectors")],
)
def test_callbacks_refuse_top_k_beyond_the_parameter_count(callback, noun):
    x, y = _data()
    dim = 3 * 4 + 4 + 4 * 3 + 3
    with pytest.raises(ValueError, match=rf"`top_k`={dim + 1} exceeds.*\({dim}\).*{noun}"):
        _fit(
            _model(),
            _XENT,
            y,
            optimizer="sgd",
            callbacks=[callback((x, y), top_k=dim + 1, every_n_epochs=1)],
        )
    assert _fit.batches == 0


@pytest.mark.parametrize("method", ["lanczos", "power", "nystrom"])
def test_top_eigenpairs_refuses_k_beyond_the_dimension(method):
    op = DenseOperator(np.diag([3.0, 2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match=r"k=5 for an operator of dim=4.*at most dim"):
        top_eigenpairs(op, 5, method=method)
    # The boundary k = dim is allowed, and right.
    result = top_eigenpairs(op, 4, method="lanczos", seed=0)
    np.testing.assert_allclose(np.sort(result.eigenvalues)[::-1], [3.0, 2.0, 1.0, 0.5])
