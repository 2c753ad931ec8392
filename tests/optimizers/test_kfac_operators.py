"""KFAC's optimizer protocol against its own update and dense float64 oracles.

A tiny float64 model with every block kind (Conv2D, DepthwiseConv2D, Dense, LayerNorm, an
untapped EinsumDense in the isotropic fallback): ``η P⁻¹ g`` is the step the optimizer
actually takes (stale eigendecompositions included), ``P`` and ``F̂`` equal the dense
Kronecker products of the stored factors placed by hand, and ``HessianSpectrum`` logs the
dense ``λ₁(P^{-1/2} H P^{-1/2})``.
"""

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from keras_curv import KFAC
from keras_curv.callbacks import HessianSpectrum
from keras_curv.curvature import DiagonalOperator, IdentityOperator, PermutedOperator
from keras_curv.optimizers import kfac_math as km
from keras_curv.optimizers.kfac_operators import flat_operator
from tests.callbacks.conftest import mean_xent
from tests.curvature.helpers import dense_ggn, dense_hessian

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
F64 = {"dtype": "float64"}


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5, 5, 1)), rng.integers(0, 3, n)


def model_with_every_block():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5, 5, 1), **F64),
            keras.layers.Conv2D(2, 3, activation="tanh", **F64),
            keras.layers.DepthwiseConv2D(2, depth_multiplier=2, activation="tanh", **F64),
            keras.layers.Flatten(**F64),
            keras.layers.Dense(4, activation="tanh", **F64),
            keras.layers.LayerNormalization(**F64),
            keras.layers.EinsumDense("ab,bc->ac", (4,), activation="tanh", **F64),
            keras.layers.Dense(3, **F64),
        ]
    )


def trained(steps=4, **kwargs):
    x, y = data()
    model = model_with_every_block()
    options = {"momentum": 0.0, "norm_constraint": None, "inverse_update_every": 3, "seed": 0}
    model.compile(optimizer=KFAC(0.05, **{**options, **kwargs}), loss=XENT)
    model.fit(x[: 8 * steps], y[: 8 * steps], batch_size=8, shuffle=False, verbose=0)
    return model, x, y


def damped(values, vectors, shift):
    basis = np.eye(values.shape[-1]) if vectors is None else vectors
    return (basis * (values + shift)) @ basis.T


def dense_kfac(optimizer, damping):
    """P (or F̂ for damping 0) placed by hand from the stored eigendecompositions/factors."""
    variables = optimizer._trainable_variables
    starts = np.cumsum([0] + [int(np.prod(v.shape)) for v in variables])
    dense = np.zeros((starts[-1], starts[-1]))
    root = np.sqrt(damping)
    for block, entry, slots, eigen in zip(
        optimizer._blocks, optimizer.blocks, optimizer._factors, optimizer._eigens
    ):
        e = {k: v.numpy() for k, v in eigen.items()}
        f = {k: v.numpy() for k, v in slots.items()}
        if entry["kind"] in ("kronecker", "depthwise"):
            pi = km.pi_adjustment(e["a_values"], e["g_values"]).numpy()
            a, g = e["a_values"], e["g_values"]
            if entry["kind"] == "kronecker":
                # [kernel; bias] as one (n_in + 1, n_out) row-major matrix.
                lo = starts[block.indices[0]]
                a_d = damped(a, e.get("a_vectors"), pi * root)
                g_d = damped(g, e.get("g_vectors"), root / pi)
                dense[
                    lo : lo + a_d.shape[0] * g_d.shape[0], lo : lo + a_d.shape[0] * g_d.shape[0]
                ] = np.kron(a_d, g_d)
                continue
            # Depthwise: kernel (k, C, M) and bias (C, M); channel c's rows are kernel[:, c]
            # then bias[c].
            kernel, bias = block.indices
            k, c_count, m = int(np.prod(block.kernel_shape[:-2])), block.channels, block.g_dim
            for c in range(c_count):
                rows = [starts[kernel] + (p * c_count + c) * m for p in range(k)]
                rows.append(starts[bias] + c * m)
                index = np.concatenate([np.arange(r, r + m) for r in rows])
                a_vectors, g_vectors = (e.get(f"{s}_vectors") for s in "ag")
                a_d = damped(a[c], None if a_vectors is None else a_vectors[c], pi[c] * root)
                g_d = damped(g[c], None if g_vectors is None else g_vectors[c], root / pi[c])
                dense[np.ix_(index, index)] = np.kron(a_d, g_d)
        else:
            for i, name in zip(block.indices, f):  # roles (gamma, beta) or d0, d1, ...
                d = f[name].reshape(-1)
                if entry.get("isotropic"):
                    d = np.full_like(d, d.mean())
                lo, hi = starts[i], starts[i + 1]
                dense[lo:hi, lo:hi] = np.diag(d + damping)
    return dense


def test_every_block_kind_and_a_stale_inverse():
    model, _, _ = trained()
    optimizer = model.optimizer
    kinds = [entry["kind"] for entry in optimizer.blocks]
    assert kinds == ["kronecker", "depthwise", "kronecker", "norm", "kronecker", "diagonal"]
    # Step 4 updated the factors but reused step 3's eigendecompositions.
    assert int(optimizer.inverse_updates.numpy()) == 2
    assert int(optimizer.curvature_updates.numpy()) == 4


# max_factor_size=3 keeps every input factor A and the 4-wide Dense's G as diagonals (their
# eigenbasis is the identity); the output factors of sides 2 and 3 stay full.
FACTOR_SIZES = pytest.mark.parametrize("max_factor_size", [2048, 3], ids=["full", "diagonal"])


def assert_next_step_is_lr_p_inverse_g(model, batch_x, batch_y):
    """θ₀ − θ₁ = ν η P⁻¹ g for the next step's gradient g (momentum 0; ν the norm constraint's
    scale, which stays out of P)."""
    optimizer = model.optimizer
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = XENT(batch_y, model(batch_x, training=True))
    g = np.concatenate(
        [
            tf.convert_to_tensor(t).numpy().reshape(-1)
            for t in tape.gradient(loss, model.trainable_variables)
        ]
    )
    model.train_on_batch(batch_x, batch_y)
    step = np.concatenate(
        [(b - v.numpy()).reshape(-1) for b, v in zip(before, model.trainable_variables)]
    )
    lr = float(optimizer.learning_rate.numpy())
    nu = float(optimizer._last["norm_constraint_scale"].numpy())  # float64, not the summary's
    predicted = nu * lr * optimizer.preconditioner().power(-1).matvec(g).numpy()
    np.testing.assert_allclose(step, predicted, rtol=1e-11, atol=1e-13 * np.abs(step).max())
    return nu


@FACTOR_SIZES
def test_preconditioner_reproduces_the_step_it_takes(max_factor_size):
    model, x, y = trained(max_factor_size=max_factor_size)
    assert_next_step_is_lr_p_inverse_g(model, x[-8:], y[-8:])
    # Iteration 4: no inverse update (every 3), so P's eigendecompositions were stale.
    assert int(model.optimizer.inverse_updates.numpy()) == 2


def test_the_norm_constraint_stays_out_of_the_preconditioner():
    model, x, y = trained(norm_constraint=1e-7)
    assert assert_next_step_is_lr_p_inverse_g(model, x[-8:], y[-8:]) < 0.1


def test_embedding_block_with_its_diagonal_input_factor():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 7, (24, 3)), rng.integers(0, 3, 24)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(7, 2, **F64),
            keras.layers.Flatten(**F64),
            keras.layers.Dense(3, **F64),
        ]
    )
    model.compile(optimizer=KFAC(0.05, momentum=0.0, norm_constraint=None, seed=0), loss=XENT)
    model.fit(x[:16], y[:16], batch_size=8, shuffle=False, verbose=0)
    assert [b["kind"] for b in model.optimizer.blocks] == ["kronecker", "kronecker"]
    assert "a_vectors" not in model.optimizer._eigens[0]  # the token frequencies
    assert_next_step_is_lr_p_inverse_g(model, x[16:], y[16:])
    p = model.optimizer.preconditioner()
    np.testing.assert_allclose(
        p.to_dense(), dense_kfac(model.optimizer, float(model.optimizer.current_damping.numpy())),
        rtol=1e-10, atol=1e-13,
    )  # fmt: skip


@FACTOR_SIZES
def test_operators_are_the_dense_kronecker_blocks_and_only_read(max_factor_size):
    model, _, _ = trained(max_factor_size=max_factor_size)
    optimizer = model.optimizer
    full = ["a_vectors" in e for e in optimizer._eigens[:5:2]]  # the Dense/Conv blocks
    assert full == ([True] * 3 if max_factor_size > 3 else [False] * 3)
    before = [np.asarray(v.numpy()).copy() for v in optimizer.variables]
    damping = float(optimizer.current_damping.numpy())
    p = optimizer.preconditioner()
    np.testing.assert_allclose(p.to_dense(), dense_kfac(optimizer, damping), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(
        optimizer.curvature_model().to_dense(), dense_kfac(optimizer, 0.0), rtol=1e-10, atol=1e-13
    )
    root = p.power(-0.5).to_dense()
    np.testing.assert_allclose(root @ p.to_dense() @ root, np.eye(p.dim), atol=1e-9)
    np.testing.assert_allclose(root @ root, p.power(-1).to_dense(), rtol=1e-9, atol=1e-12)
    assert optimizer.stability_threshold() == pytest.approx(2 / 0.05, rel=1e-6)
    assert KFAC(0.1, momentum=0.9).stability_threshold() == pytest.approx(38.0, rel=1e-6)
    for a, b in zip(before, optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b.numpy()))
    undamped = KFAC(0.05, damping=0.0, norm_constraint=None, seed=0)
    fresh = model_with_every_block()
    fresh.compile(optimizer=undamped, loss=XENT)
    assert undamped.preconditioner() is None and undamped.curvature_model() is None


def test_flat_operator_permutes_pieces_that_are_not_adjacent():
    """A piece over variables 0 and 2 (a kernel and its bias with another variable between)."""
    kernel_bias = DiagonalOperator(np.array([1.0, 2.0, 3.0]))  # variable 0 (2), variable 2 (1)
    middle = IdentityOperator(2, 5.0, tf.float64)  # variable 1
    op = flat_operator([((1,), middle), ((0, 2), kernel_bias)], [2, 2, 1])
    assert isinstance(op, PermutedOperator)
    np.testing.assert_allclose(np.diag(op.to_dense()), [1.0, 2.0, 5.0, 5.0, 3.0])
    np.testing.assert_allclose(op.to_dense(), np.diag([1.0, 2.0, 5.0, 5.0, 3.0]))
    adjacent = flat_operator([((1,), middle), ((0,), kernel_bias)], [3, 2])
    np.testing.assert_allclose(
        adjacent.to_dense(), scipy.linalg.block_diag(np.diag([1, 2, 3.0]), 5 * np.eye(2))
    )


def test_hessian_spectrum_logs_kfacs_preconditioned_sharpness():
    x, y = data()
    model = model_with_every_block()
    cb = HessianSpectrum(
        (x, y),
        tol=1e-10,
        every_n_epochs=1,
        model_probes=4,
        seed=3,
        curvature_reference="gauss_newton",
    )
    optimizer = KFAC(0.05, inverse_update_every=3, seed=0)
    model.compile(optimizer=optimizer, loss=XENT)
    history = model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb]
    ).history
    h = dense_hessian(model, mean_xent(y), tf.constant(x))
    p = dense_kfac(optimizer, float(optimizer.current_damping.numpy()))
    values, vectors = np.linalg.eigh(p)
    root = (vectors * values**-0.5) @ vectors.T
    expected = np.linalg.eigvalsh(root @ h @ root)[-1]
    assert history["preconditioned_sharpness"][-1] == pytest.approx(expected, rel=1e-7)
    # The curvature model against the dense Gauss–Newton matrix: Rayleigh ratios on its
    # top-3 eigenvectors.
    ggn = dense_ggn(model, mean_xent(y), tf.constant(x))
    ggn_values, ggn_vectors = np.linalg.eigh(0.5 * (ggn + ggn.T))
    u, top = ggn_vectors[:, ::-1][:, :3], ggn_values[::-1][:3]
    m = dense_kfac(optimizer, 0.0)
    rayleigh = np.sum(u * (m @ u), axis=0) / top
    assert history["curvature_model_rayleigh_ratio"][-1] == pytest.approx(
        np.mean(rayleigh), rel=1e-6
    )
    for key in ("curvature_model_overlap", "curvature_model_relative_error"):
        assert np.isfinite(history[key][-1])
