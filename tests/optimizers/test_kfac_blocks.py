"""KFAC's factors against independent oracles: per-sample gradients from tapes, NumPy patches."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import KFAC

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def _factors_after_one_step(model, x, y, *, fisher="empirical", loss=SCCE, jit_compile=False,
                            **kwargs):  # fmt: skip
    """The optimizer after one step that only measures (lr 0, EMA off)."""
    optimizer = KFAC(
        learning_rate=0.0, ema_decay=0.0, momentum=0.0, norm_constraint=None, fisher=fisher,
        **kwargs,
    )  # fmt: skip
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return optimizer


def _eager_forward(model, x, y, watch):
    """Layer inputs and per-sample ``∂NLL_n/∂s`` (``s`` the output of each layer in ``watch``).

    The sum of the per-sample losses is differentiated: a row of ``∂/∂s`` is then one
    sample's gradient. Independent of KFAC's layer taps.
    """
    inputs, outputs = {}, {}
    with tf.GradientTape() as tape:
        h = tf.convert_to_tensor(x)
        for layer in model.layers:
            if layer.name in watch:
                inputs[layer.name] = h
            h = layer(h)
            if layer.name in watch:
                tape.watch(h)
                outputs[layer.name] = h
        nll = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, h, from_logits=True))
    grads = tape.gradient(nll, outputs)
    return {k: v.numpy() for k, v in inputs.items()}, {k: v.numpy() for k, v in grads.items()}


def _f32(a):
    """Float32-exact values: Keras's data adapter casts float64 arrays to floatx."""
    return np.asarray(a, np.float32).astype(np.float64)


def _data(shape, n, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return _f32(rng.normal(size=(n, *shape))), rng.integers(0, classes, n)


# ----------------------------------------------------------------------- Dense


def test_dense_block_is_the_hand_built_kronecker_block():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(5, dtype="float64", name="hidden"),
            keras.layers.Activation("tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64", name="out"),
        ]
    )
    x, y = _data((4,), 9)
    inputs, grads = _eager_forward(model, x, y, {"hidden", "out"})
    optimizer = _factors_after_one_step(model, x, y)
    for name in ("hidden", "out"):
        a = np.c_[inputs[name], np.ones(len(x))]
        g = grads[name]
        factors = optimizer.factors(name)
        np.testing.assert_allclose(factors["a"], a.T @ a / len(x), rtol=1e-12)
        np.testing.assert_allclose(factors["g"], g.T @ g / len(x), rtol=1e-12, atol=1e-15)
    assert [b["kind"] for b in optimizer.blocks] == ["kronecker", "kronecker"]


def test_dense_block_of_one_sample_is_the_exact_fisher_block():
    """For one sample the per-sample gradient is a gᵀ, whose outer product is exactly A ⊗ G."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(4, dtype="float64", name="d")]
    )
    x, y = _data((3,), 1)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    kernel, bias = tape.gradient(loss, model.trainable_variables)
    flat = np.vstack([kernel.numpy(), bias.numpy()[None]]).ravel()  # vec([W; b]), row-major
    factors = _factors_after_one_step(model, x, y).factors("d")
    np.testing.assert_allclose(
        np.kron(factors["a"], factors["g"]), np.outer(flat, flat), rtol=1e-12, atol=1e-15
    )


# ----------------------------------------------------------------------- convolutions


def _same_padding(size, kernel, stride, dilation):
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2


def _numpy_patches(x, kernel, strides, dilation, padding):
    """im2col by explicit loops, channels last: ``(N, positions, kh·kw·C)``."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    if padding == "same":
        oh, ph = _same_padding(h, kh, sh, dh)
        ow, pw = _same_padding(w, kw, sw, dw)
    else:
        oh, ph = (h - (kh - 1) * dh - 1) // sh + 1, 0
        ow, pw = (w - (kw - 1) * dw - 1) // sw + 1, 0
    out = np.zeros((n, oh * ow, kh * kw * c))
    for i in range(oh):
        for j in range(ow):
            patch = np.zeros((n, kh, kw, c))
            for a in range(kh):
                for b in range(kw):
                    r, s = i * sh - ph + a * dh, j * sw - pw + b * dw
                    if 0 <= r < h and 0 <= s < w:
                        patch[:, a, b] = x[:, r, s]
            out[:, i * ow + j] = patch.reshape(n, -1)
    return out


def _conv_model():
    keras.utils.set_random_seed(2)
    f64 = {"dtype": "float64"}
    return keras.Sequential(
        [
            keras.Input((5, 6, 2), dtype="float64"),
            keras.layers.Conv2D(3, (2, 3), strides=(1, 2), padding="same", name="c1", **f64),
            keras.layers.Activation("tanh", **f64),
            keras.layers.Conv2D(2, 2, dilation_rate=2, use_bias=False, name="c2", **f64),
            keras.layers.Flatten(**f64),
            keras.layers.Dense(3, name="out", **f64),
        ]
    )


_CONV_LAYERS = {  # name: (kernel, strides, dilation, padding, bias) of _conv_model
    "c1": ((2, 3), (1, 2), (1, 1), "same", True),  # 5 x 3 = 15 positions
    "c2": ((2, 2), (1, 1), (2, 2), "valid", False),  # 3 x 1 = 3 positions
}


def _conv_oracle(model, x, y):
    """Per layer of ``_CONV_LAYERS``: the patch rows ``(N, positions, P)`` and the exact factors."""
    inputs, grads = _eager_forward(model, x, y, set(_CONV_LAYERS))
    out = {}
    for name, (kernel, strides, dilation, padding, bias) in _CONV_LAYERS.items():
        patches = _numpy_patches(inputs[name], kernel, strides, dilation, padding)
        if bias:
            patches = np.concatenate([patches, np.ones((*patches.shape[:2], 1))], axis=-1)
        rows = patches.reshape(-1, patches.shape[-1])
        g = grads[name].reshape(-1, grads[name].shape[-1])
        out[name] = (patches, rows.T @ rows / len(rows), g.T @ g / len(x))
    return out


def test_conv2d_factors_match_explicit_patch_extraction():
    model = _conv_model()
    x, y = _data((5, 6, 2), 4)
    oracle = _conv_oracle(model, x, y)
    optimizer = _factors_after_one_step(model, x, y, max_patches_per_example=None)
    for name, (_, a, g) in oracle.items():
        factors = optimizer.factors(name)
        np.testing.assert_allclose(factors["a"], a, rtol=1e-12)
        np.testing.assert_allclose(factors["g"], g, rtol=1e-12, atol=1e-15)


def test_patch_sampled_input_factor_is_unbiased_and_leaves_g_exact():
    """2 of each example's patches, 300 steps on one batch (lr 0): the EMA of the sampled
    ``A`` against explicit patch extraction, within 5 standard errors.

    One step's estimate is ``(1/(N q)) Σ_n Σ_j y_{n,i_j}`` per entry (``i_j`` uniform), of
    variance ``Σ_n Var_p(y_{n,p}) / (N² q)``; the bias-corrected EMA weighs step ``t``
    by ``w_t ∝ ε^(T−t)``, so its variance is ``Σ_t w_t²`` times that. ``G`` is exact.
    """
    model = _conv_model()
    x, y = _data((5, 6, 2), 4)
    oracle = _conv_oracle(model, x, y)
    steps, decay, q = 300, 0.99, 2
    optimizer = KFAC(learning_rate=0.0, ema_decay=decay, momentum=0.0, norm_constraint=None,
                     fisher="empirical", max_patches_per_example=q, seed=0)  # fmt: skip
    model.compile(optimizer=optimizer, loss=SCCE)
    model.fit(np.tile(x, (steps, 1, 1, 1)), np.tile(y, steps), batch_size=len(x), epochs=1,
              shuffle=False, verbose=0)  # fmt: skip
    w = (1 - decay) * decay ** np.arange(steps) / (1 - decay**steps)
    for name, (patches, a, g) in oracle.items():
        outer = patches[..., :, None] * patches[..., None, :]  # (N, positions, P, P)
        variance = outer.var(axis=1).sum(axis=0) / (len(x) ** 2 * q) * np.sum(w**2)
        error = np.abs(optimizer.factors(name)["a"].numpy() - a)
        assert np.all(error <= 5 * np.sqrt(variance) + 1e-12), name
        assert np.max(error) > 1e-6  # sampled, not exact
        np.testing.assert_allclose(optimizer.factors(name)["g"], g, rtol=1e-11, atol=1e-15)


@pytest.mark.slow
def test_patch_sample_is_reproducible_and_exact_when_the_patches_fit():
    """A seed fixes the sample (also under XLA); ``q`` ≥ the positions gives the exact
    ``A``, statically and for a dynamic spatial size (every patch once)."""
    x, y = _data((5, 6, 2), 4)
    oracle = _conv_oracle(_conv_model(), x, y)

    def factor(q, seed=0, **compile_kwargs):
        optimizer = _factors_after_one_step(_conv_model(), x, y, max_patches_per_example=q,
                                            seed=seed, **compile_kwargs)  # fmt: skip
        return optimizer.factors("c1")["a"].numpy()

    first = factor(2, seed=3)
    np.testing.assert_array_equal(factor(2, seed=3), first)
    np.testing.assert_allclose(factor(2, seed=3, jit_compile=True), first, rtol=1e-12)
    assert np.max(np.abs(factor(2, seed=4) - first)) > 1e-3
    assert np.max(np.abs(first - oracle["c1"][1])) > 1e-3
    np.testing.assert_allclose(factor(15), oracle["c1"][1], rtol=1e-12)
    # Spatial sizes unknown to the trace: q ≥ the positions takes every one (weight 1) and
    # padding (weight 0); q = 2 the same draws as with static sizes.
    spec = (tf.TensorSpec((None, None, None, 2), tf.float64), tf.TensorSpec((None,), tf.int64))
    data = tf.data.Dataset.from_generator(lambda: iter([(x, y)]), output_signature=spec)

    def dynamic_factor(q, seed=0):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([
            keras.Input((None, None, 2), dtype="float64"),
            keras.layers.Conv2D(3, (2, 3), strides=(1, 2), padding="same", name="c1",
                                dtype="float64"),
            keras.layers.GlobalAveragePooling2D(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ])  # fmt: skip
        optimizer = KFAC(learning_rate=0.0, ema_decay=0.0, momentum=0.0, norm_constraint=None,
                         fisher="empirical", max_patches_per_example=q, seed=seed)  # fmt: skip
        model.compile(optimizer=optimizer, loss=SCCE)
        model.fit(data.repeat(), steps_per_epoch=1, epochs=1, shuffle=False, verbose=0)
        return optimizer.factors("c1")["a"].numpy()

    np.testing.assert_allclose(dynamic_factor(20), oracle["c1"][1], rtol=1e-12)
    np.testing.assert_allclose(dynamic_factor(2, seed=3), first, rtol=1e-12)


def test_conv1d_causal_and_depthwise_factors():
    keras.utils.set_random_seed(3)
    f64 = {"dtype": "float64"}
    model = keras.Sequential(
        [
            keras.Input((7, 2), dtype="float64"),
            keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2, name="c", **f64),
            keras.layers.Activation("tanh", **f64),
            keras.layers.DepthwiseConv1D(2, depth_multiplier=2, name="dw", **f64),
            keras.layers.Flatten(**f64),
            keras.layers.Dense(3, name="out", **f64),
        ]
    )
    x, y = _data((7, 2), 5)
    inputs, grads = _eager_forward(model, x, y, {"c", "dw"})
    optimizer = _factors_after_one_step(model, x, y)
    # Causal: left padding by dilation·(k−1), then a valid 1-D convolution.
    padded = np.pad(inputs["c"], [(0, 0), (4, 0), (0, 0)])[:, None]
    rows = _numpy_patches(padded, (1, 3), (1, 1), (1, 2), "valid").reshape(-1, 6)
    rows = np.c_[rows, np.ones(len(rows))]
    g = grads["c"].reshape(-1, 3)
    np.testing.assert_allclose(optimizer.factors("c")["a"], rows.T @ rows / len(rows), rtol=1e-12)
    np.testing.assert_allclose(optimizer.factors("c")["g"], g.T @ g / len(x), rtol=1e-12)
    # Depthwise: per input channel c, its 2 patch entries (+1) against its 2 outputs.
    patches = _numpy_patches(inputs["dw"][:, None], (1, 2), (1, 1), (1, 1), "valid")
    patches = patches.reshape(-1, 2, 3)  # (rows, k, C)
    g = grads["dw"].reshape(-1, 3, 2)  # (rows, C, M): output channel c·M + m
    factors = optimizer.factors("dw")
    assert factors["a"].shape == (3, 3, 3) and factors["g"].shape == (3, 2, 2)
    for c in range(3):
        a = np.c_[patches[:, :, c], np.ones(len(patches))]
        np.testing.assert_allclose(factors["a"][c], a.T @ a / len(a), rtol=1e-12)
        np.testing.assert_allclose(factors["g"][c], g[:, c].T @ g[:, c] / len(x), rtol=1e-12)


# ----------------------------------------------------------------------- Embedding, norms


def test_embedding_and_layer_norm_blocks():
    keras.utils.set_random_seed(4)
    f64 = {"dtype": "float64"}
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 3, name="emb", **f64),
            keras.layers.LayerNormalization(name="ln", **f64),
            keras.layers.GlobalAveragePooling1D(**f64),
            keras.layers.Dense(3, name="out", **f64),
        ]
    )
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 7, size=(6, 5)), rng.integers(0, 3, 6)
    _, grads = _eager_forward(model, x, y, {"emb"})
    optimizer = _factors_after_one_step(model, x, y)
    counts = np.bincount(x.ravel(), minlength=7)
    factors = optimizer.factors("emb")
    np.testing.assert_allclose(factors["a"], counts / x.size, rtol=1e-12)
    g = grads["emb"].reshape(-1, 3)
    np.testing.assert_allclose(factors["g"], g.T @ g / len(x), rtol=1e-12)
    # LayerNorm: per-sample gradients of gamma and beta from the tape's Jacobian.
    ln = model.get_layer("ln")
    with tf.GradientTape() as tape:
        per_sample = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    jac_gamma, jac_beta = tape.jacobian(per_sample, [ln.gamma, ln.beta])
    factors = optimizer.factors("ln")
    np.testing.assert_allclose(factors["gamma"], np.mean(jac_gamma.numpy() ** 2, 0), rtol=1e-10)
    np.testing.assert_allclose(factors["beta"], np.mean(jac_beta.numpy() ** 2, 0), rtol=1e-10)
    kinds = {b["layer"]: b["kind"] for b in optimizer.blocks}
    assert kinds == {"emb": "kronecker", "ln": "norm", "out": "kronecker"}


def test_batch_norm_block_uses_the_normalized_inputs():
    keras.utils.set_random_seed(5)
    f64 = {"dtype": "float64"}
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2), dtype="float64"),
            keras.layers.BatchNormalization(name="bn", **f64),
            keras.layers.Flatten(**f64),
            keras.layers.Dense(3, name="out", **f64),
        ]
    )
    x, y = _data((4, 4, 2), 6)
    x = _f32(3.0 * x + 1.0)
    with tf.GradientTape() as tape:
        bn_out = model.get_layer("bn")(x, training=True)
        tape.watch(bn_out)
        logits = model.get_layer("out")(tf.reshape(bn_out, [len(x), -1]))
        nll = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, True))
    g = tape.gradient(nll, bn_out).numpy()
    optimizer = _factors_after_one_step(model, x, y)
    layer = model.get_layer("bn")
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    normalized = (x - mean) / np.sqrt(var + layer.epsilon)
    gamma = (normalized * g).sum((1, 2))  # per-sample, batch statistics held fixed
    beta = g.sum((1, 2))
    factors = optimizer.factors("bn")
    np.testing.assert_allclose(factors["gamma"], np.mean(gamma**2, 0), rtol=1e-10)
    np.testing.assert_allclose(factors["beta"], np.mean(beta**2, 0), rtol=1e-10)


# ----------------------------------------------------------------------- sharing, fallback


def test_a_shared_layer_sums_the_statistics_of_its_calls():
    keras.utils.set_random_seed(6)
    shared = keras.layers.Dense(3, activation="tanh", dtype="float64", name="shared")
    head = keras.layers.Dense(3, dtype="float64", name="out")
    inputs = keras.Input((3,), dtype="float64")
    model = keras.Model(inputs, head(shared(shared(inputs))))
    x, y = _data((3,), 7)
    kernel, bias = shared.kernel, shared.bias
    with tf.GradientTape() as tape:
        s1 = tf.matmul(x, kernel) + bias
        tape.watch(s1)
        h1 = tf.tanh(s1)
        s2 = tf.matmul(h1, kernel) + bias
        tape.watch(s2)
        logits = head(tf.tanh(s2))
        nll = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, True))
    g1, g2 = (g.numpy() for g in tape.gradient(nll, [s1, s2]))
    a1, a2 = np.c_[x, np.ones(7)], np.c_[np.tanh(s1.numpy()), np.ones(7)]
    optimizer = _factors_after_one_step(model, x, y)
    factors = optimizer.factors("shared")
    np.testing.assert_allclose(factors["a"], (a1.T @ a1 + a2.T @ a2) / 14, rtol=1e-12)
    np.testing.assert_allclose(factors["g"], (g1.T @ g1 + g2.T @ g2) / 7, rtol=1e-12)


def test_untapped_layers_fall_back_to_the_diagonal_fisher():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,), dtype="float64")
    hidden = keras.layers.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c", name="einsum",
                                      dtype="float64")(inputs)  # fmt: skip
    model = keras.Model(inputs, keras.layers.Dense(3, name="out", dtype="float64")(hidden))
    x, y = _data((4,), 1)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer = _factors_after_one_step(model, x, y)
    fallback = [b for b in optimizer.blocks if b["kind"] == "diagonal"]
    assert fallback == [
        {
            "layer": "<diagonal>",
            "kind": "diagonal",
            "variables": ["einsum/kernel", "einsum/bias"],
            "factor_shapes": {"d0": (4, 3), "d1": (3,)},
            "reasons": ["untapped layer", "untapped layer"],
            "isotropic": True,
        }
    ]
    # One sample: (ε g)² = g², the diagonal empirical Fisher exactly.
    diagonal = optimizer.factors("<diagonal>")
    np.testing.assert_allclose(diagonal["d0"], grads[0].numpy() ** 2, rtol=1e-12)
    np.testing.assert_allclose(diagonal["d1"], grads[1].numpy() ** 2, rtol=1e-12)


@pytest.mark.parametrize("fallback", ["isotropic", "diagonal"])
def test_fallback_step_divides_by_the_diagonal_or_its_mean(fallback):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,), dtype="float64")
    hidden = keras.layers.EinsumDense("ab,bc->ac", output_shape=3, name="einsum",
                                      dtype="float64")(inputs)  # fmt: skip
    model = keras.Model(inputs, keras.layers.Dense(3, name="out", dtype="float64")(hidden))
    x, y = _data((4,), 1)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    g = tape.gradient(loss, model.trainable_variables)[0].numpy()
    before = model.get_weights()[0]
    optimizer = KFAC(1.0, damping=0.1, momentum=0.0, ema_decay=0.0, norm_constraint=None,
                     fisher="empirical", fallback=fallback)  # fmt: skip
    model.compile(optimizer=optimizer, loss=SCCE)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    # One sample: diag F = g² exactly; the isotropic block uses its mean over the kernel.
    curvature = np.mean(g**2) if fallback == "isotropic" else g**2
    np.testing.assert_allclose(before - model.get_weights()[0], g / (curvature + 0.1), rtol=1e-10)
    assert optimizer.blocks[-1]["isotropic"] is (fallback == "isotropic")


# ----------------------------------------------------------------------- the Fisher


def test_exact_fisher_gives_the_analytic_softmax_factor_and_model_samples_approach_it():
    """``G`` of a softmax regression is (1/N) Σ_n (diag p_n − p_n p_nᵀ) exactly."""
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(4, dtype="float64", name="d")]
    )
    base, _ = _data((3,), 4)
    p = _softmax(base @ model.get_weights()[0] + model.get_weights()[1])
    expected = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
    exact = _factors_after_one_step(model, base, np.zeros(4, int), fisher="exact").factors("d")
    np.testing.assert_allclose(exact["g"], expected, rtol=1e-12, atol=1e-15)
    # One label per sample drawn from the model: 2000 copies of the 4 inputs.
    copies = 2000
    x = np.tile(base, (copies, 1))
    sampled = _factors_after_one_step(model, x, np.zeros(len(x), int), fisher="model", seed=3)
    got = sampled.factors("d")["g"].numpy()
    # Per entry, the standard error of a mean of (p − e_y)(p − e_y)ᵀ entries (all |.| ≤ 1).
    assert np.max(np.abs(got - expected)) < 5 / np.sqrt(len(x))
    assert np.max(np.abs(got - expected)) > 0  # sampled, not the exact expectation


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("loss", ["mse", "binary"])
def test_exact_fisher_of_regression_and_sigmoid_outputs(loss):
    keras.utils.set_random_seed(9)
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"), keras.layers.Dense(2, dtype="float64", name="d")]
    )
    x, _ = _data((3,), 5)
    y = np.random.default_rng(0).integers(0, 2, (5, 2)).astype("float64")
    if loss == "mse":
        keras_loss, expected = keras.losses.MeanSquaredError(dtype="float64"), np.eye(2)  # 2/K
    else:
        keras_loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64")
        p = 1 / (1 + np.exp(-(x @ model.get_weights()[0] + model.get_weights()[1])))
        expected = np.diag(np.mean(p * (1 - p), 0)) / 2  # Keras averages over the K = 2 outputs
    factors = _factors_after_one_step(model, x, y, fisher="exact", loss=keras_loss).factors("d")
    np.testing.assert_allclose(factors["g"], expected, rtol=1e-12, atol=1e-15)


def test_one_exact_undamped_step_solves_a_linear_least_squares_problem():
    """A linear model with squared error: K-FAC is the Gauss–Newton matrix, exactly."""
    rng = np.random.default_rng(10)
    x = _f32(rng.normal(size=(32, 4)) * [1.0, 10.0, 0.1, 3.0])
    y = _f32(x @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(32, 2)) + [2.0, -1.0])
    keras.utils.set_random_seed(10)
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), keras.layers.Dense(2, dtype="float64")]
    )
    optimizer = KFAC(1.0, damping=0.0, momentum=0.0, norm_constraint=None, fisher="exact")
    model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError(dtype="float64"))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    solution, *_ = np.linalg.lstsq(np.c_[x, np.ones(32)], y, rcond=None)
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(np.vstack([kernel, bias]), solution, rtol=1e-9, atol=1e-10)
