"""Unwrapping the optimizer a model trains with."""

from types import SimpleNamespace

import keras

from keras_curv._internal.optimizer import model_optimizer, unwrap


def test_a_loss_scale_optimizer_is_unwrapped():
    inner = keras.optimizers.Adam()
    wrapped = keras.optimizers.LossScaleOptimizer(inner)
    assert unwrap(wrapped) is inner
    assert model_optimizer(SimpleNamespace(optimizer=wrapped)) is inner


def test_anything_else_passes_through():
    sgd = keras.optimizers.SGD()
    assert unwrap(sgd) is sgd and unwrap(None) is None
    assert model_optimizer(SimpleNamespace(optimizer=sgd)) is sgd
    assert model_optimizer(object()) is None  # no optimizer attribute: not compiled


def test_a_compiled_mixed_precision_model():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model_optimizer(model), keras.optimizers.SGD)
