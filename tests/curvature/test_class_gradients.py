import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature import ClassGradients, class_gradients


def classifier(activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, activation=activation, dtype="float64"),
        ]
    )


def per_class_loop(model, x, y, log_probs):
    """Oracle: one tape per sample, averaged per class."""
    rows = []
    for k in range(3):
        total = 0.0
        for i in np.flatnonzero(y == k):
            with tf.GradientTape() as tape:
                out = model(x[i : i + 1])
                score = (tf.math.log(out) if log_probs else out)[0, k]
            grads = tape.gradient(score, model.trainable_variables)
            total = total + np.concatenate([g.numpy().ravel() for g in grads])
        rows.append(total / np.sum(y == k))
    return np.stack(rows)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(23, 4)), rng.integers(0, 3, 23)


@pytest.mark.parametrize("activation", [None, "softmax"])
def test_matches_per_class_loop(data, activation):
    x, y = data
    model = classifier(activation)
    result = class_gradients(model, x, y, batch_size=7).numpy()
    np.testing.assert_allclose(
        result, per_class_loop(model, x, y, activation == "softmax"), atol=1e-12
    )


def test_one_hot_and_dataset_agree(data):
    x, y = data
    model = classifier()
    sparse = class_gradients(model, x, y).numpy()
    one_hot = class_gradients(model, x, np.eye(3)[y]).numpy()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    np.testing.assert_allclose(one_hot, sparse, atol=1e-14)
    np.testing.assert_allclose(class_gradients(model, dataset).numpy(), sparse, atol=1e-13)


def test_missing_class_gives_zero_row(data):
    x, y = data
    keep = y != 2
    result = class_gradients(classifier(), x[keep], y[keep]).numpy()
    assert np.all(result[2] == 0) and np.abs(result[:2]).sum() > 0


def test_errors(data):
    x, y = data
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_gradients(classifier(), x, np.full_like(y, 3))
    with pytest.raises(ValueError, match="shape"):
        class_gradients(classifier(), x, np.zeros((len(y), 2, 2)))
    regression = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="classifier"):
        class_gradients(regression, x, y)


def test_repeated_calls_reuse_one_trace_and_see_current_weights(data):
    from keras_curv.curvature.class_gradients import class_gradients_for

    x, y = data
    model = classifier()
    first = class_gradients(model, x, y).numpy()
    cached = class_gradients_for(model)
    traces = cached.tracing_count
    assert traces >= 1
    for _ in range(3):
        np.testing.assert_array_equal(class_gradients(model, x, y).numpy(), first)
    assert class_gradients_for(model) is cached
    assert cached.tracing_count == traces
    # New weights, same trace: the cached function reads the variables' current values.
    for v in model.trainable_variables:
        v.assign(v * 0.5 + 0.1)
    np.testing.assert_allclose(
        class_gradients(model, x, y).numpy(), per_class_loop(model, x, y, False), atol=1e-12
    )
    assert cached.tracing_count == traces
    # training=True gets its own function; the class gives the same rows as the function.
    assert class_gradients_for(model, training=True) is not cached
    np.testing.assert_array_equal(
        ClassGradients(model)(x, y).numpy(), class_gradients(model, x, y).numpy()
    )


def test_cache_does_not_keep_the_model_alive(data):
    import gc
    import weakref

    x, y = data
    model = classifier()
    class_gradients(model, x, y)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
