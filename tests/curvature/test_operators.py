import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import DenseOperator, GGNOperator, HessianOperator
from tests.curvature.helpers import dense_ggn, dense_hessian


def mlp(dtype="float64", out_activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(5, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, activation=out_activation, dtype=dtype),
        ]
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(37, 4)), rng.integers(0, 3, 37), rng.uniform(0.2, 2.0, 37)


def ce_mean(y, weights=None):
    def fn(out):
        losses = keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
        if weights is not None:
            losses = losses * weights
        return tf.reduce_mean(losses)

    return fn


def test_hessian_matches_dense_oracle_across_batches(data):
    x, y, _ = data
    model = mlp()
    op = HessianOperator(
        model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y, batch_size=16
    )
    np.testing.assert_allclose(op.to_dense(), dense_hessian(model, ce_mean(y), x), atol=1e-12)
    assert op.dim == 4 * 5 + 5 + 5 * 3 + 3
    assert op.num_matvecs == op.dim


def test_loss_name_and_sample_weights(data):
    x, y, w = data
    model = mlp()
    op = HessianOperator(model, "sparse_categorical_crossentropy", x, y, sample_weight=w)

    # A loss name gives probabilities semantics; the model outputs logits, so compare with the
    # same function of the outputs.
    def oracle(out):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out) * w)

    np.testing.assert_allclose(op.to_dense(), dense_hessian(model, oracle, x), atol=1e-10)


def test_dataset_equals_arrays(data):
    x, y, _ = data
    model = mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    v = np.random.default_rng(1).normal(size=HessianOperator(model, loss, x, y).dim)
    from_arrays = HessianOperator(model, loss, x, y, batch_size=7).matvec(v).numpy()
    from_dataset = HessianOperator(model, loss, dataset).matvec(v).numpy()
    np.testing.assert_allclose(from_dataset, from_arrays, rtol=1e-12, atol=1e-14)


def test_ggn_matches_dense_oracle_and_is_psd(data):
    x, y, _ = data
    model = mlp()
    op = GGNOperator(
        model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y, batch_size=16
    )
    ggn = op.to_dense()
    np.testing.assert_allclose(ggn, dense_ggn(model, ce_mean(y), x), atol=1e-12)
    assert np.linalg.eigvalsh(ggn).min() > -1e-12


def test_ggn_equals_hessian_for_linear_model(data):
    x, y, _ = data
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64")]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(
        GGNOperator(model, loss, x, y).to_dense(),
        HessianOperator(model, loss, x, y).to_dense(),
        atol=1e-12,
    )


def test_float32_operator_close_to_float64_oracle(data):
    x, y, _ = data
    model = mlp(dtype="float32")
    op = HessianOperator(
        model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x.astype("float32"), y
    )
    assert op.dtype == tf.float32
    model64 = mlp(dtype="float64")
    model64.set_weights([w.astype("float64") for w in model.get_weights()])
    oracle = dense_hessian(model64, ce_mean(y), x.astype("float32").astype("float64"))
    np.testing.assert_allclose(op.to_dense(), oracle, atol=1e-5)


def test_no_retracing_per_matvec(data):
    x, y, _ = data
    op = HessianOperator(mlp(), "mse", x, np.eye(3)[y], batch_size=16)
    for seed in range(5):
        op.matvec(np.random.default_rng(seed).normal(size=op.dim))
    assert op.tracing_count <= 2  # full batches and the remainder batch


def test_stateless_in_training_mode_with_batchnorm_and_dropout(data):
    x, y, _ = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(6, dtype="float64"),
            keras.layers.BatchNormalization(dtype="float64"),
            keras.layers.Dropout(0.3, dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    before = [v.numpy().copy() for v in model.variables]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    op = HessianOperator(model, loss, x, y, training=True)
    v = np.random.default_rng(0).normal(size=op.dim)
    first, second = op.matvec(v).numpy(), op.matvec(v).numpy()
    np.testing.assert_array_equal(first, second)  # same dropout mask: a fixed operator
    for old, new in zip(before, [v.numpy() for v in model.variables]):
        np.testing.assert_array_equal(old, new)  # no BatchNorm or RNG state touched
    inference = HessianOperator(model, loss, x, y).matvec(v).numpy()
    assert not np.allclose(first, inference)


def test_matmat_equals_matvecs(data):
    x, y, _ = data
    op = HessianOperator(mlp(), keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y)
    block = np.random.default_rng(2).normal(size=(op.dim, 3))
    product = op.matmat(block).numpy()
    for i in range(3):
        np.testing.assert_allclose(product[:, i], op.matvec(block[:, i]).numpy(), atol=1e-14)


def test_dense_operator_and_counter():
    op = DenseOperator(np.diag([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(op.matvec(np.ones(3)).numpy(), [3.0, 2.0, 1.0])
    op.matmat(np.ones((3, 2)))
    assert op.num_matvecs == 3
    op.reset_counter()
    assert op.num_matvecs == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.zeros((0, 4)), y=np.zeros(0)), "empty"),
        (dict(x=np.zeros((5, 4)), y=np.zeros(4)), "rows"),
        (dict(x=np.zeros((5, 4)), y=np.zeros(5), loss=lambda y, p: tf.reduce_sum(p, 1)), "scalar"),
        (dict(x=np.zeros((5, 4)), y=None), "targets"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    loss = kwargs.pop("loss", "mse")
    with pytest.raises(ValueError, match=message):
        HessianOperator(mlp(), loss, kwargs["x"], kwargs["y"])


def test_bad_vectors_and_data():
    op = DenseOperator(np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(np.ones(4))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(np.ones(3))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(np.ones((2, 3)))
    infinite = tf.data.Dataset.from_tensor_slices((np.zeros((4, 4)), np.zeros(4))).batch(2).repeat()
    with pytest.raises(ValueError, match="infinite"):
        HessianOperator(mlp(), "mse", infinite)
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 4)), np.zeros(0))).batch(2)
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(mlp(), "mse", empty)


def test_gradient_of_the_mean_probe_loss_matches_one_tape(data):
    x, y, w = data
    model = mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    op = HessianOperator(model, loss, x, y, sample_weight=w, batch_size=10)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True) * w
        ) / len(y)
    grads = tape.gradient(value, model.trainable_variables)
    expected = np.concatenate([g.numpy().ravel() for g in grads])
    np.testing.assert_allclose(op.gradient().numpy(), expected, rtol=1e-12, atol=1e-15)
