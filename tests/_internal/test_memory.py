"""The memory check that refuses optimizer state that cannot fit."""

import keras
import numpy as np
import pytest

from keras_curv._internal import memory
from keras_curv.optimizers import ClassSubspaceNewton


def test_state_bytes_counts_every_element_in_its_dtype():
    variables = [
        keras.Variable(np.zeros((3, 4), "float32")),
        keras.Variable(np.zeros(5, "float64")),
    ]
    assert memory.state_bytes(7, variables) == 7 * (12 * 4 + 5 * 8)
    assert memory.available_bytes() is None or memory.available_bytes() > 0


def test_ensure_fits_raises_with_the_size_and_the_fix(monkeypatch):
    variables = [keras.Variable(np.zeros((1024, 256), "float32"))]  # 1 MiB
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 2**20)
    assert memory.ensure_fits(10, variables, "thing", "fix") == 10 * 2**20
    with pytest.raises(MemoryError, match=r"thing needs 11 parameter-sized.*Use less"):
        memory.ensure_fits(11, variables, "thing", "Use less.")


def test_class_subspace_newton_refuses_c_times_p_before_allocating(monkeypatch):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(100)])  # P = 6,500
    # (C + 1) P float32 values: 101 * 6500 * 4 bytes = 2.5 MiB; leave 1 MiB.
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    optimizer = ClassSubspaceNewton(num_classes=100)
    with pytest.raises(MemoryError, match="C = 100 classes.*fewer classes"):
        optimizer.build(model.trainable_variables)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    ClassSubspaceNewton(num_classes=100).build(model.trainable_variables)
