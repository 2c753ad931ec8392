import numpy as np
import pytest
import tensorflow as tf

from keras_curv._internal.data import class_targets, probe_data


def test_arrays_are_batched_exactly():
    data = probe_data(np.arange(10.0)[:, None], np.arange(10), np.ones(10), batch_size=4)
    assert [b.size for b in data.batches] == [4, 4, 2]
    assert data.num_samples == 10
    np.testing.assert_array_equal(data.batches[2].x.numpy().ravel(), [8.0, 9.0])


def test_dataset_with_weights_and_nested_inputs():
    x = {"a": np.zeros((5, 2)), "b": np.ones((5, 3))}
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(5), np.ones(5))).batch(2)
    data = probe_data(ds)
    assert data.num_samples == 5 and data.batches[0].sample_weight is not None
    with pytest.raises(ValueError, match="inside the dataset"):
        probe_data(ds, np.arange(5))


def test_class_targets():
    np.testing.assert_array_equal(
        class_targets(np.array([[2], [0]]), 3, tf.float32), np.eye(3)[[2, 0]]
    )
    np.testing.assert_array_equal(class_targets(np.eye(3)[[1]], 3, tf.float32), [[0, 1, 0]])
    with pytest.raises(ValueError, match="whole numbers"):
        class_targets(np.array([0.5]), 3, tf.float32)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_targets(np.array([-1, 1]), 3, tf.float32)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros((3, 2)), np.zeros(2)), "rows"),
        ((np.zeros((3, 2)), np.zeros(3), np.zeros(4)), "sample_weight"),
        ((np.zeros(()), np.zeros(3)), "batch axis"),
        (({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, np.zeros(3)), "different numbers"),
        (("not a dataset tuple",), "targets"),
        ((np.zeros((3, 2)), np.zeros(3), None, 0), "`batch_size` must be an int >= 1 or None"),
        ((np.zeros((3, 2)), np.zeros(3), None, 2.0), "batch_size"),
    ],
)
def test_errors(args, message):
    with pytest.raises(ValueError, match=message):
        probe_data(*args)


def test_dataset_of_bad_elements():
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((4, 2))).batch(2)
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        probe_data(ds)
