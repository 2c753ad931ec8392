"""The loss a diagnostic differentiates: the given one, else the model's compiled loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv._internal.losses import PerSampleLoss, model_loss, replica_share


def _model(dtype="float32"):
    return keras.Sequential([keras.Input((3,), dtype=dtype), keras.layers.Dense(2, dtype=dtype)])


def test_loss_resolution():
    model = _model()
    with pytest.raises(ValueError, match="HessianSpectrum needs a loss: the model is not compiled"):
        model_loss(model, None, "HessianSpectrum")
    model.compile(loss=["mse", "mse"], optimizer="sgd")
    with pytest.raises(ValueError, match="one per output.*pass `loss=`"):
        model_loss(model, None, "HessianSpectrum")
    assert model_loss(model, "mse", "HessianSpectrum") == "mse"


@pytest.mark.parametrize(
    "compiled", ["mse", keras.losses.MeanSquaredError(), keras.losses.mean_squared_error]
)
def test_keras_losses_are_used_as_compiled(compiled):
    model = _model()
    model.compile(loss=compiled, optimizer="sgd")
    assert model_loss(model, None, "owner") is compiled


def test_a_plain_function_is_averaged_per_sample_in_the_model_dtype():
    def per_sample(y_true, y_pred):
        return keras.ops.sum((y_true - y_pred) ** 2, axis=-1)

    model = _model("float64")
    model.compile(loss=per_sample, optimizer="sgd")
    loss = model_loss(model, None, "owner")
    assert isinstance(loss, PerSampleLoss) and loss.fn is per_sample
    assert loss.dtype == "float64"
    y_true, y_pred = np.zeros((2, 2)), np.array([[1.0, 1.0], [0.0, 2.0]])
    assert float(loss(y_true, y_pred)) == pytest.approx((2.0 + 4.0) / 2)


def test_replica_share_divides_by_the_replicas_in_the_loss_dtype():
    value = tf.constant(1.0, tf.float64)
    assert replica_share(value, 1) is value
    share = replica_share(value, 3)
    assert share.dtype == tf.float64 and share.numpy() == 1.0 / 3.0
