"""Alignment measures against hand-built subspaces with known answers."""

import numpy as np
import pytest
import tensorflow as tf

from keras_curv.curvature.alignment import (
    best_assignment,
    combined_rank,
    cosine_matrix,
    gradient_fraction,
    principal_angles,
    subspace_overlap,
)

DIM, C = 40, 4


def orthonormal_rows(k, dim=DIM, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, k)))
    return q.T


def test_identical_subspaces_with_different_bases():
    e = orthonormal_rows(C)
    mix = np.random.default_rng(1).standard_normal((C, C))  # invertible: same span
    v = mix @ e * 3.0
    np.testing.assert_allclose(principal_angles(v, e), np.zeros(C), atol=1e-7)
    assert subspace_overlap(v, e) == pytest.approx(1.0, abs=1e-12)
    assert combined_rank(v, e) == C
    # Same vectors (up to sign and scale) give assignment cosine 1.
    assert best_assignment(cosine_matrix(-2.0 * e, e)).mean_cosine == pytest.approx(1.0)


def test_orthogonal_subspaces():
    q = orthonormal_rows(2 * C)
    v, e = q[:C] * np.arange(1, C + 1)[:, None], q[C:]
    cos = cosine_matrix(v, e)
    np.testing.assert_allclose(cos, np.zeros((C, C)), atol=1e-12)
    assert best_assignment(cos).mean_cosine == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(principal_angles(v, e), np.full(C, np.pi / 2), atol=1e-12)
    assert subspace_overlap(v, e) == pytest.approx(0.0, abs=1e-12)
    assert combined_rank(v, e) == 2 * C


def test_rotation_by_known_angles():
    # v_i = cos(t_i) e_i + sin(t_i) w_i with w orthogonal to every e: angles are t_i.
    q = orthonormal_rows(2 * C, seed=3)
    e, w = q[:C], q[C:]
    t = np.array([0.1, 0.4, 0.9, 1.3])
    v = np.cos(t)[:, None] * e + np.sin(t)[:, None] * w
    np.testing.assert_allclose(np.diag(cosine_matrix(v, e)), np.cos(t), atol=1e-12)
    np.testing.assert_allclose(cosine_matrix(v, e)[~np.eye(C, dtype=bool)], 0.0, atol=1e-12)
    np.testing.assert_allclose(principal_angles(v, e), np.sort(t), atol=1e-10)
    assert subspace_overlap(v, e) == pytest.approx(np.mean(np.cos(t) ** 2), abs=1e-12)
    assert best_assignment(cosine_matrix(v, e)).mean_cosine == pytest.approx(np.mean(np.cos(t)))
    # cos t = 0.995, 0.921, 0.622, 0.267: the tolerance decides which angles are shared.
    assert combined_rank(v, e) == 2 * C - 2
    assert combined_rank(v, e, cos_tol=0.95) == 2 * C - 1
    assert combined_rank(v, e, cos_tol=0.999) == 2 * C
    assert combined_rank(v, e, cos_tol=0.2) == C


def test_hungarian_recovers_a_permutation():
    e = orthonormal_rows(6, seed=4)
    perm = np.array([3, 0, 5, 1, 4, 2])
    noise = 0.05 * np.random.default_rng(5).standard_normal((6, DIM))
    v = e[perm] * np.array([1, -1, 2, 1, -3, 1])[:, None] + noise
    result = best_assignment(cosine_matrix(v, e))
    np.testing.assert_array_equal(result.rows, np.arange(6))
    np.testing.assert_array_equal(result.cols, perm)
    assert result.mean_cosine > 0.9
    np.testing.assert_allclose(result.cosines, cosine_matrix(v, e)[np.arange(6), perm])


def test_assignment_beats_greedy():
    # Greedy would take 0.9 then be forced to 0.0; the optimum is 0.8 + 0.8.
    m = np.array([[0.9, 0.8], [0.8, 0.0]])
    result = best_assignment(m)
    np.testing.assert_array_equal(result.cols, [1, 0])
    assert result.mean_cosine == pytest.approx(0.8)


def test_against_numpy_transcription_on_random_data():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((3, 12)), rng.standard_normal((5, 12))
    expect = np.abs(a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(cosine_matrix(a, b), expect, rtol=1e-12)
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    sigma = np.linalg.svd(qa.T @ qb, compute_uv=False)
    np.testing.assert_allclose(np.cos(principal_angles(a, b)), np.sort(sigma)[::-1], atol=1e-10)
    assert subspace_overlap(a, b) == pytest.approx(np.sum((qa.T @ qb) ** 2) / 3, rel=1e-10)
    g = rng.standard_normal(12)
    assert gradient_fraction(g, b) == pytest.approx(np.sum((qb.T @ g) ** 2) / (g @ g), rel=1e-10)
    # Tensors work too.
    assert gradient_fraction(tf.constant(g), tf.constant(b)) == pytest.approx(
        gradient_fraction(g, b)
    )


def test_gradient_fraction_known_values():
    e = orthonormal_rows(C, seed=8)
    assert gradient_fraction(e[0] * 5.0, e) == pytest.approx(1.0)
    w = np.random.default_rng(10).standard_normal(DIM)
    w = w - e.T @ (e @ w)  # orthogonal to the span of e
    assert gradient_fraction(w, e) == pytest.approx(0.0, abs=1e-12)
    g = 3.0 * e[1] + 4.0 * w / np.linalg.norm(w)
    assert gradient_fraction(g, e) == pytest.approx(9.0 / 25.0)
    assert np.isnan(gradient_fraction(np.zeros(DIM), e))


def test_zero_rows_are_ignored_by_subspace_measures():
    e = orthonormal_rows(C, seed=9)
    v = e.copy()
    v[2] = 0.0  # a class absent from the probe data
    assert combined_rank(v, e) == C
    assert len(principal_angles(v, e)) == C - 1
    assert subspace_overlap(v, e) == pytest.approx(1.0)
    assert cosine_matrix(v, e)[2].tolist() == [0.0] * C


def test_combined_rank_tolerance():
    e = np.array([[1.0, 0.0, 0.0]])
    tilted = np.array([[np.cos(0.3), np.sin(0.3), 0.0]])  # 17.2 degrees, cos 0.955
    assert combined_rank(tilted, e) == 1
    assert combined_rank(tilted, e, cos_tol=0.96) == 2


@pytest.mark.parametrize("shared", [0, 1, 2, 3, 4])
def test_combined_rank_counts_a_known_intersection(shared):
    """Spans of C directions meeting in a subspace of dimension ``shared``, plus small noise."""
    q = orthonormal_rows(2 * C, seed=11)
    a = q[:C]
    b = np.concatenate([q[:shared], q[C : 2 * C - shared]])
    rng = np.random.default_rng(12)
    mix = rng.standard_normal((C, C))  # another basis of each span, not orthonormal
    noise = 1e-3 * rng.standard_normal((C, DIM))
    assert combined_rank(mix @ a, mix.T @ b + noise) == 2 * C - shared
    # Without a tolerance (cos_tol near 1) the noise makes every set of 2C vectors full rank.
    assert combined_rank(mix @ a, mix.T @ b + noise, cos_tol=1 - 1e-12) == 2 * C


def test_combined_rank_counts_dependent_directions_within_a_set_once():
    e = orthonormal_rows(2)
    doubled = np.concatenate([e, e.sum(axis=0, keepdims=True)])  # three rows, rank 2
    assert combined_rank(doubled, e) == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: cosine_matrix(np.zeros((0, 3)), np.eye(3)),
        lambda: cosine_matrix(np.eye(3), np.eye(4)),
        lambda: cosine_matrix(np.ones((2, 2, 2)), np.eye(2)),
        lambda: principal_angles(np.zeros((2, 3)), np.eye(3)),
        lambda: combined_rank(np.eye(3), np.eye(3), cos_tol=0.0),
        lambda: combined_rank(np.eye(3), np.eye(3), cos_tol=1.0),
        lambda: gradient_fraction(np.ones(3), np.eye(4)),
        lambda: gradient_fraction(np.ones((3, 1)), np.eye(3)),
        lambda: best_assignment(np.array([[np.nan]])),
        lambda: cosine_matrix([[np.inf, 0.0]], [[1.0, 0.0]]),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
