"""keras_curv.Shampoo through compile/fit against a NumPy transcription, and Keras's features."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import Shampoo
from tests.conftest import float64_everywhere
from tests.optimizers import _shampoo_reference as reference


class Tensor4(keras.layers.Layer):
    """``y = Σ_ijk x_nijk K_ijko + b``: a linear layer with a rank-4 kernel."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(*input_shape[1:], 5), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(5,), initializer="random_normal")

    def call(self, x):
        return tf.einsum("nijk,ijko->no", x, self.kernel) + self.bias


def _two_layers(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((2, 3, 2)), Tensor4(), keras.layers.Dense(3, bias_initializer="random_normal")]
    )


def _numpy_gradients(weights, x, t):
    """Gradients of ``mean((y - t)²)`` for the two linear layers above."""
    K, b1, W, b2 = weights
    h = np.einsum("nijk,ijko->no", x, K) + b1
    y = h @ W + b2
    dy = 2.0 * (y - t) / y.size
    dh = dy @ W.T
    return [np.einsum("nijk,no->ijko", x, dh), dh.sum(0), h.T @ dy, dy.sum(0)]


_HP = {
    "lr": 0.05, "beta_1": 0.8, "beta_2": 0.9, "epsilon": 1e-6, "every": 2, "start": 1,
    "grafting": "adam", "grafting_epsilon": 1e-8, "weight_decay": 0.0,
}  # fmt: skip
# (block size, merge, the kernel's preconditioner shape as the docs define it, overrides)
_CASES = {
    "matrix": (1024, True, (12, 5), {}),
    "rank4_blocked": (4, True, (2, 3, 2, 5), {}),
    "rank3_merged_sgd": (6, True, (6, 2, 5), {"grafting": "sgd", "start": 3}),
    "rank4_unmerged_none": (1024, False, (2, 3, 2, 5), {"grafting": "none", "every": 1}),
    # 0.125: Keras casts a Python weight decay to the weight's dtype through float32.
    "weight_decay_start0": (1024, True, (12, 5), {"weight_decay": 0.125, "start": 0, "every": 3}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_golden_values_through_fit(case):
    block_size, merge, layout, overrides = _CASES[case]
    hp = {**_HP, **overrides}
    steps, batch = 7, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 2, 3, 2))
    t = rng.normal(size=(steps * batch, 3))
    with float64_everywhere():
        model = _two_layers()
        w = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        opt = Shampoo(
            hp["lr"], beta_1=hp["beta_1"], beta_2=hp["beta_2"], epsilon=hp["epsilon"],
            precondition_every=hp["every"], start_preconditioning_step=hp["start"],
            block_size=block_size, grafting=hp["grafting"], merge_small_axes=merge,
            weight_decay=hp["weight_decay"] or None,
        )  # fmt: skip
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, t, batch_size=batch, shuffle=False, verbose=0)
        got = [v.numpy() for v in model.trainable_variables]
    layouts = [layout, None, (5, 3), None]
    assert opt.preconditioner_shapes() == layouts
    states = [reference.VariableState(v.shape, lay, block_size) for v, lay in zip(w, layouts)]
    for s in range(steps):
        rows = slice(s * batch, (s + 1) * batch)
        grads = _numpy_gradients(w, x[rows], t[rows])
        w = [reference.step(st, wi, g, s, hp) for st, wi, g in zip(states, w, grads)]
    moved = max(np.max(np.abs(a - b.numpy())) for a, b in zip(w, _two_layers().weights))
    assert moved > 0.1
    for expected, actual in zip(w, got):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)
    # The roots the optimizer holds are those of the transcription.
    for state, roots in zip(states, opt.inverse_roots):
        for block, held in zip(state.blocks, roots):
            for r, h in zip(block["roots"], held):
                np.testing.assert_allclose(h.numpy(), r, rtol=1e-9, atol=1e-12)
