"""ClassSubspaceNewton's math as pure functions, against NumPy (fast: no fit)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_curv
from keras_curv.optimizers import ClassSubspaceNewton
from keras_curv.optimizers import class_subspace_math as csm
from tests.optimizers.test_class_subspace_newton import C, _data, _linear_model, _theta, numpy_csn


def _state(rng, num=3, shapes=((4, 3), (3,))):
    sums = [tf.constant(rng.normal(size=(num, *s))) for s in shapes]
    return sums, tf.constant(rng.uniform(0.1, 2.0, num)), tf.constant([2.0, 0.0, 5.0], tf.float64)


def test_absorb_and_derived_follow_eq_16_17():
    rng = np.random.default_rng(0)
    sums, sq, steps = _state(rng)
    batch = [tf.constant(rng.normal(size=s.shape)) for s in sums]
    curvature = tf.constant([0.5, 1.5, 2.5], tf.float64)
    present = tf.constant([True, True, False])
    new_sums, new_sq, new_steps = csm.absorb(sums, sq, steps, batch, curvature, present, 0.9)
    for m, b, out in zip(sums, batch, new_sums):
        expected = m.numpy().copy()
        expected[:2] = 0.9 * expected[:2] + 0.1 * b.numpy()[:2]
        np.testing.assert_allclose(out, expected, rtol=1e-13)
    np.testing.assert_allclose(new_sq[:2], 0.9 * sq[:2] + 0.1 * curvature[:2] ** 2, rtol=1e-13)
    assert new_sq[2] == sq[2] and list(new_steps.numpy()) == [3.0, 1.0, 5.0]

    means, lam, directions, alive = csm.derived(new_sums, new_sq, new_steps, 0.9)
    correction = 1 - 0.9 ** new_steps.numpy()
    flat_means = np.concatenate([m.numpy().reshape(3, -1) for m in new_sums], 1)
    flat_means /= correction[:, None]
    np.testing.assert_allclose(
        np.concatenate([m.numpy().reshape(3, -1) for m in means], 1), flat_means, rtol=1e-14
    )
    np.testing.assert_allclose(lam, np.sqrt(new_sq.numpy() / correction), rtol=1e-14)
    rows = csm.flat_directions(directions, 3).numpy()
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-14)
    assert alive.numpy().all()


def test_an_unseen_class_has_unit_curvature_and_no_direction():
    sums = [tf.zeros((2, 3), tf.float64)]
    _, lam, directions, alive = csm.derived(
        sums, tf.zeros(2, tf.float64), tf.constant([0.0, 0.0], tf.float64), 0.9
    )
    np.testing.assert_array_equal(lam, [1.0, 1.0])
    np.testing.assert_array_equal(directions[0], np.zeros((2, 3)))
    assert not alive.numpy().any()


def test_coefficients_against_dense_linear_algebra():
    rng = np.random.default_rng(1)
    V = rng.normal(size=(3, 7))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    g = rng.normal(size=7)
    lam = np.array([0.5, 2.0, 4.0])
    lr = 0.1
    projections = tf.constant(V @ g)
    diagonal = csm.diagonal_coefficients(tf.constant(lam), projections, tf.constant(lr, tf.float64))
    np.testing.assert_allclose(diagonal, (1 / lam - lr) * (V @ g), rtol=1e-15)
    # inverse="exact": the step lr g + V a equals lr P g + (V diag(lam) V^T)^+ g.
    gram = tf.constant(V @ V.T)
    exact = csm.coefficients(
        csm.exact_parts(gram, tf.constant(lam), projections), tf.constant(lr, tf.float64)
    )
    projector = np.eye(7) - V.T @ np.linalg.pinv(V @ V.T) @ V
    expected = lr * projector @ g + np.linalg.pinv(V.T @ np.diag(lam) @ V) @ g
    np.testing.assert_allclose(lr * g + V.T @ exact.numpy(), expected, rtol=1e-9, atol=1e-12)
    # projected_newton: Newton on the C x C block K, damped by 0.3 in parameter space.
    K = rng.normal(size=(3, 3))
    K = K @ K.T
    projected = csm.coefficients(
        csm.projected_newton_parts(gram, tf.constant(K), tf.constant(0.3, tf.float64), projections),
        tf.constant(lr, tf.float64),
    )
    newton = V.T @ np.linalg.inv(K + 0.3 * V @ V.T) @ V @ g
    np.testing.assert_allclose(
        lr * g + V.T @ projected.numpy(), lr * projector @ g + newton, rtol=1e-9, atol=1e-12
    )


def _projected_newton_step(V, g, K, damping, lr):
    """The whole step ``lr g + V a`` of ``"projected_newton"`` (rows of V: unit directions)."""
    parts = csm.projected_newton_parts(
        tf.constant(V @ V.T), tf.constant(K), tf.constant(damping, V.dtype), tf.constant(V @ g)
    )
    return lr * g + V.T @ csm.coefficients(parts, tf.constant(lr, V.dtype)).numpy()


def test_projected_newton_is_the_proximal_step_in_parameter_space():
    """It minimises gᵀd + ½ dᵀ(G + δI)d over d in span(V) (+ the SGD part outside), the
    dense oracle: Newton on G + δI restricted to the span, with G = V⁺ᵀ K V⁺."""
    rng = np.random.default_rng(2)
    V = rng.normal(size=(4, 9))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    g = rng.normal(size=9)
    A = rng.normal(size=(4, 4))
    K = A @ A.T
    basis, _ = np.linalg.qr(V.T)  # orthonormal columns spanning the directions
    inverse = np.linalg.inv(basis.T @ V.T)  # V = basis R: K = Rᵀ (basisᵀ G basis) R
    curvature = inverse.T @ K @ inverse  # G on the span, in the orthonormal basis
    inside = basis @ np.linalg.solve(curvature + 0.5 * np.eye(4), basis.T @ g)
    outside = 0.1 * (g - basis @ (basis.T @ g))
    np.testing.assert_allclose(
        _projected_newton_step(V, g, K, 0.5, 0.1), outside + inside, rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_projected_newton_with_equal_directions_is_no_longer_than_sgd(dtype):
    """Ten nearly equal class directions (a BatchNorm network at initialisation) and no
    curvature: with δ = 1/η the step is the SGD step, not ten times it."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=50)
    V = base + 1e-4 * rng.normal(size=(10, 50))
    V = (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(dtype)
    g = rng.normal(size=50).astype(dtype)
    step = _projected_newton_step(V, g, np.zeros((10, 10), dtype), 1 / 0.1, 0.1)
    assert np.all(np.isfinite(step))
    np.testing.assert_allclose(np.linalg.norm(step), 0.1 * np.linalg.norm(g), rtol=1e-3)


def test_subspace_step_and_effective_curvature():
    direction = tf.constant([[[1.0, 0.0]], [[0.0, 2.0]]], tf.float64)  # (C=2, 1, 2)
    step = csm.subspace_step(tf.constant([[1.0, 1.0]]), tf.constant([3.0, -1.0]), direction, 0.5)
    np.testing.assert_allclose(step, [[3.5, -1.5]])
    capped = csm.effective_curvature(tf.constant([1e-9, 2.0]), tf.constant(0.0), 10.0)
    np.testing.assert_allclose(capped, [0.1, 2.0], rtol=1e-7)


def test_pseudo_inverse_is_robust():
    spd = np.array([[2.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(csm.sym_pinv(tf.constant(spd)), np.linalg.inv(spd), rtol=1e-12)
    broken = np.array([[np.nan, 1.0], [1.0, np.inf]])
    assert np.all(np.isfinite(csm.sym_pinv(tf.constant(broken)).numpy()))


@pytest.mark.parametrize("curvature", ["paper", "gauss_newton"])
def test_one_curvature_step_and_config_round_trip(curvature):
    """Like Keras's adam_test: one step on a linear model against the NumPy reference."""
    x, y = _data(n=6)
    model = _linear_model()
    theta0 = _theta(model)
    optimizer = ClassSubspaceNewton(0.1, curvature=curvature)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    keras_curv.curvature_step(model, optimizer, loss, x, y)
    lr32 = float(np.float32(0.1))
    reference = {"curvature": curvature} if curvature != "paper" else {}
    expected, _ = numpy_csn(theta0, [(x, y, None)], lr=lr32, log_prob=False, **reference)
    np.testing.assert_allclose(_theta(model), expected, rtol=1e-9, atol=1e-12)
    assert optimizer.class_curvatures.shape == (C,)
    config = optimizer.get_config()
    assert config["curvature"] == curvature and config["num_classes"] == C
    assert ClassSubspaceNewton.from_config(config).get_config() == config


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"momentum": 1.0}, "momentum"),
        ({"curvature": "newton"}, "curvature"),
        ({"inverse": "full"}, "inverse"),
        ({"damping": -1.0}, "damping"),
        ({"max_inverse_curvature": 0.0}, "max_inverse_curvature"),
        ({"update_each": 2.0}, "update_each"),
        ({"num_classes": True}, "num_classes"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ClassSubspaceNewton(**kwargs)


def test_direction_overlap_against_numpy():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(4, 9)) + 2.0  # a shared component: far from orthogonal
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    gram = rows @ rows.T
    max_cosine, min_eigenvalue = csm.direction_overlap(tf.constant(gram))
    off = np.abs(gram - np.diag(np.diag(gram)))
    np.testing.assert_allclose(max_cosine, off.max(), rtol=1e-14)
    dense = np.eye(9) - rows.T @ rows  # I - sum_k v_k v_k^T in R^9
    np.testing.assert_allclose(min_eigenvalue, np.linalg.eigvalsh(dense).min(), atol=1e-12)
    assert float(min_eigenvalue) < -1.0  # no projection: the "SGD part" climbs here
    q, _ = np.linalg.qr(rng.normal(size=(9, 4)))
    _, orthonormal = csm.direction_overlap(tf.constant(q.T @ q))
    np.testing.assert_allclose(orthonormal, 0.0, atol=1e-12)


def _split(rows, shapes=((3, 2), (4,))):
    """(C, 10) rows -> per-variable (C, 3, 2) and (C, 4) tensors (the optimizer's layout)."""
    return [tf.constant(rows[:, :6].reshape(-1, *shapes[0])), tf.constant(rows[:, 6:])]


def _join(tensors):
    return np.concatenate([np.reshape(t, (t.shape[0], -1)) for t in tensors], 1)


def test_orthonormal_rows_spans_the_rows_and_drops_lost_rank():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3, 10))
    rows[2] = rows[0] - 2 * rows[1]  # rank 2
    out, alive = csm.orthonormal_rows(_split(rows), tf.float64)
    basis = _join(out)
    assert alive.numpy().sum() == 2
    np.testing.assert_allclose(basis @ basis.T, np.diag(alive.numpy().astype(float)), atol=1e-12)
    # Same span: projecting the input rows onto the basis reproduces them.
    np.testing.assert_allclose(rows @ basis.T @ basis, rows, atol=1e-10)


def test_rayleigh_ritz_against_dense_eigh():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 10))
    a = a + a.T
    q, _ = np.linalg.qr(rng.normal(size=(10, 3)))
    basis = _split(q.T)
    products = _split(q.T @ a)  # rows (A q_k)^T
    theta, ritz, ritz_products = csm.rayleigh_ritz(basis, products, tf.float64)
    expected = np.linalg.eigvalsh(q.T @ a @ q)
    np.testing.assert_allclose(theta, expected[np.argsort(-np.abs(expected))], rtol=1e-12)
    u = _join(ritz)
    np.testing.assert_allclose(np.einsum("kd,de,ke->k", u, a, u), theta, rtol=1e-10)
    np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(_join(ritz_products), u @ a, atol=1e-12)


def test_subspace_iteration_with_these_pieces_finds_the_top_eigenvectors():
    """orth -> product -> Rayleigh-Ritz, repeated: the top-3 eigenpairs of a known spectrum."""
    rng = np.random.default_rng(5)
    vectors, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    values = np.array([9.0, 7.0, 5.0] + [0.5] * 7)
    a = vectors @ np.diag(values) @ vectors.T
    block = _split(rng.normal(size=(3, 10)))
    for _ in range(25):
        basis, _ = csm.orthonormal_rows(block, tf.float64)
        products = _split(_join(basis) @ a)
        theta, ritz, ritz_products = csm.rayleigh_ritz(basis, products, tf.float64)
        block = ritz_products
    np.testing.assert_allclose(theta, [9.0, 7.0, 5.0], rtol=1e-9)
    np.testing.assert_allclose(np.abs(_join(ritz) @ vectors[:, :3]), np.eye(3), atol=1e-6)


def test_the_parts_add_up_to_the_step():
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(3, 10))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    g = rng.normal(size=10)
    lam = np.array([0.5, 2.0, 4.0])
    newton, projection = csm.diagonal_parts(tf.constant(lam), tf.constant(rows @ g))
    np.testing.assert_allclose(newton, rows @ g / lam, rtol=1e-15)
    directions = _split(rows)
    gradient = _split(g[None])
    full = [
        csm.subspace_step(gr[0], csm.coefficients((newton, projection), 0.1), d, 0.1)
        for gr, d in zip(gradient, directions)
    ]
    newton_part = [csm.newton_step(newton, d) for d in directions]
    np.testing.assert_allclose(_join([n[None] for n in newton_part])[0], (rows @ g / lam) @ rows)
    complement = _join([f[None] - n[None] for f, n in zip(full, newton_part)])[0]
    np.testing.assert_allclose(complement, 0.1 * (g - (rows @ g) @ rows), atol=1e-14)


def test_projected_newton_matrices_never_fail_on_a_non_finite_gram():
    """``eigh`` raises on non-finite input; an overflowed step is skipped elsewhere."""
    broken = tf.constant([[np.nan, 1.0], [1.0, np.inf]], tf.float64)
    newton, projection = csm.projected_newton_matrices(broken, tf.eye(2, dtype=tf.float64), 1.0)
    assert np.all(np.isfinite(newton.numpy())) and np.all(np.isfinite(projection.numpy()))
