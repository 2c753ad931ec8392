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
