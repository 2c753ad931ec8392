"""Which class-gradient path ClassSubspaceNewton takes for a model (fast: no fit)."""

import keras

from keras_curv import models
from keras_curv.optimizers.class_statistics import class_gradient_path_of


def test_class_gradient_path_of():
    # Per-sample logits independent of the rest of the batch: per-class sub-batches.
    assert class_gradient_path_of(models.mlp((8, 8, 1), 10)) == "partition"
    # BatchNormalization couples the samples, Dropout draws random numbers: the Jacobian.
    assert class_gradient_path_of(models.batchnorm_resnet((16, 16, 3), 10)) == "jacobian"
    dropout = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dropout(0.1), keras.layers.Dense(3)]
    )
    assert class_gradient_path_of(dropout) == "jacobian"


def _lstm_run(monkeypatch, partition: bool):
    import numpy as np

    from keras_curv.optimizers import ClassSubspaceNewton, class_statistics

    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 7, (30, 5)), rng.integers(0, 3, 30)
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 3, dtype="float64"),
            keras.layers.LSTM(4, dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    assert class_gradient_path_of(model) == "partition"
    if not partition:
        monkeypatch.setattr(class_statistics, "can_partition", lambda b: False)
    optimizer = ClassSubspaceNewton(learning_rate=0.05, damping=0.5)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
    return [w.copy() for w in model.get_weights()], optimizer.class_curvatures.numpy()


def test_lstm_without_dropout_partitions_and_equals_the_jacobian(monkeypatch):
    """An LSTM keeps a seed generator but draws nothing at dropout 0: sub-batches are exact."""
    import numpy as np

    fast, fast_curvature = _lstm_run(monkeypatch, partition=True)
    with monkeypatch.context() as patch:
        exact, exact_curvature = _lstm_run(patch, partition=False)
    np.testing.assert_allclose(fast_curvature, exact_curvature, rtol=1e-9)
    for a, b in zip(fast, exact):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    dropped = keras.Sequential([keras.Input((5,)), keras.layers.Embedding(7, 3),
                                keras.layers.LSTM(4, recurrent_dropout=0.1)])  # fmt: skip
    assert class_gradient_path_of(dropped) == "jacobian"
