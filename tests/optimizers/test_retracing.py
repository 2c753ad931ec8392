"""No optimizer of the package retraces the train step when an epoch's last batch is short."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv import optimizers as kc

FACTORIES = {
    "adam": lambda: keras.optimizers.Adam(),
    "adahessian": lambda: kc.AdaHessian(),
    "sophia_h": lambda: kc.Sophia(update_every=1),
    "sophia_g": lambda: kc.Sophia(estimator="gauss_newton_bartlett"),
    "class_subspace_newton": lambda: kc.ClassSubspaceNewton(),
    "kfac": lambda: kc.KFAC(),
    "shampoo": lambda: kc.Shampoo(),
    "sketchy_sgd": lambda: kc.SketchySGD(),
    "osgm": lambda: kc.OSGM(),
    "lookahead": lambda: kc.Lookahead(kc.AdaHessian()),
    "lbfgs": lambda: kc.LBFGS(),
    "newton_cg": lambda: kc.NewtonCG(),
}


@pytest.mark.filterwarnings("ignore:.*is a full-batch method")
@pytest.mark.parametrize("pipeline", ["arrays", "dataset"])
@pytest.mark.parametrize("key", list(FACTORIES))
def test_a_short_last_batch_is_not_a_retrace(key, pipeline):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, 4)).astype("float32")  # batches of 8, 8 and 5
    y = rng.integers(0, 3, 21)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, "tanh"), keras.layers.Dense(3)]
    )
    traces = []
    train_step = model.train_step

    def counted(data):  # runs once per trace of the train step
        traces.append(data[0].shape.as_list())
        return train_step(data)

    model.train_step = counted
    model.compile(FACTORIES[key](), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if pipeline == "arrays":
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    else:
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        history = model.fit(data, epochs=3, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # TensorFlow traces a function that creates variables on its first call twice
    # (Keras builds the optimizer there); both traces see a batch dimension of None.
    assert len(traces) <= 2 and all(t == [None, 4] for t in traces), traces
