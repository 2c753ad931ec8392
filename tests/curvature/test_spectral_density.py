"""Stochastic Lanczos quadrature against known spectra."""

import numpy as np
import pytest
from scipy.integrate import trapezoid  # np.trapezoid is NumPy 2 only; the floor is 1.23.5

from keras_curv.curvature import DenseOperator, spectral_density


def known_operator(eigenvalues, seed=0):
    """DenseOperator(Q diag(lam) Q^T) with a random orthogonal Q, in float64."""
    lam = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return DenseOperator((q * lam) @ q.T)


def hutchinson_std(b, num_probes):
    """Std of the mean of v^T B v / d over Rademacher probes: Var = 2 sum_{i!=j} B_ij^2 / d^2."""
    d = b.shape[0]
    off = b - np.diag(np.diag(b))
    return np.sqrt(2.0 * np.sum(off**2) / d**2 / num_probes)


def test_shapes_weights_and_cost():
    op = known_operator(np.linspace(-1.0, 3.0, 80))
    sd = spectral_density(op, 20, 6, seed=0, grid_size=300)
    assert sd.nodes.shape == sd.weights.shape == (6, 20)
    assert sd.grid.shape == sd.density.shape == (300,)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    assert sd.num_matvecs == 120
    assert np.all(sd.nodes >= -1.0 - 1e-9) and np.all(sd.nodes <= 3.0 + 1e-9)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_moments_and_normalisation(probe):
    lam = np.random.default_rng(1).uniform(-2.0, 6.0, 150)
    op = known_operator(lam, seed=1)
    a = op.matrix.numpy()
    sd = spectral_density(op, 30, 40, seed=2, probe=probe)
    for power, b in ((1, a), (2, a @ a)):
        exact = np.trace(b) / lam.size
        # Gaussian probes normalised to the sphere have a similar variance; 5 sigma.
        assert abs(sd.moment(power) - exact) <= 5 * hutchinson_std(b, 40), (power, probe)
    assert abs(trapezoid(sd.density, sd.grid) - 1.0) <= 1e-2


def test_quadrature_is_exact_for_low_degree_per_probe():
    # Gauss quadrature with m nodes integrates polynomials of degree <= 2m - 1 exactly:
    # sum_i w_i theta_i^p = v^T A^p v / ||v||^2 for p <= 2m - 1. Reproduce the probe.
    lam = np.linspace(0.5, 4.0, 50)
    op = known_operator(lam, seed=3)
    a = op.matrix.numpy()
    sd = spectral_density(op, 3, 1, seed=11)
    v = np.random.default_rng(11).choice(np.array([-1.0, 1.0]), size=50)
    v /= np.linalg.norm(v)
    for p in range(6):
        exact = v @ np.linalg.matrix_power(a, p) @ v
        np.testing.assert_allclose(sd.moment(p), exact, rtol=1e-10)


def test_outlier_mass():
    # Bulk of 196 eigenvalues in [0, 1] and 4 outliers near 50: 2% of the mass.
    lam = np.concatenate([np.linspace(0.0, 1.0, 196), [48.0, 49.0, 50.0, 51.0]])
    op = known_operator(lam, seed=4)
    sd = spectral_density(op, 40, 10, seed=0)
    near = np.abs(sd.grid - 49.5) < 4.0
    dx = sd.grid[1] - sd.grid[0]
    outlier_mass = np.sum(sd.density[near]) * dx
    assert abs(outlier_mass - 4 / 200) < 0.01, outlier_mass
    bulk_mass = np.sum(sd.density[sd.grid < 2.0]) * dx
    assert abs(bulk_mass - 196 / 200) < 0.02, bulk_mass
    # Nodes resolve the outliers themselves, not just their mass.
    top = sd.nodes.max(axis=1)
    np.testing.assert_allclose(top, 51.0, rtol=1e-6)
    assert sd.density[np.abs(sd.grid - 25.0) < 10].max() < 1e-3


def test_breakdown_pads_with_zero_weights():
    # Three distinct eigenvalues: every Krylov space is invariant after 3 steps.
    op = known_operator(np.repeat([1.0, 2.0, 5.0], 10), seed=5)
    sd = spectral_density(op, 8, 3, seed=0)
    assert sd.num_matvecs == 9
    np.testing.assert_array_equal(sd.weights[:, 3:], 0.0)
    np.testing.assert_allclose(np.sort(sd.nodes[:, :3], axis=1), [[1.0, 2.0, 5.0]] * 3, rtol=1e-10)
    np.testing.assert_allclose(sd.moment(1), 8 / 3, atol=3 * hutchinson_std(op.matrix.numpy(), 3))


def test_explicit_sigma():
    op = known_operator(np.linspace(0.0, 1.0, 20))
    sd = spectral_density(op, 10, 2, seed=0, sigma=0.05)
    assert sd.sigma == 0.05
    assert abs(trapezoid(sd.density, sd.grid) - 1.0) <= 1e-2


def test_seed_reproducible():
    op = known_operator(np.linspace(0.0, 1.0, 30))
    a = spectral_density(op, 10, 3, seed=4)
    b = spectral_density(op, 10, 3, seed=4)
    np.testing.assert_array_equal(a.density, b.density)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 21}, r"num_steps=21.*dim=20"),
        ({"num_probes": 0}, "num_probes"),
        ({"grid_size": 1}, "grid_size"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "`sigma` must be a number > 0 or None"),
        ({"num_probes": 2.0}, "`num_probes` must be an int >= 1"),
        ({"probe": "uniform"}, r"`probe` must be one of \('rademacher', 'gaussian'\)"),
    ],
)
def test_bad_input(kwargs, match):
    op = known_operator(np.arange(20.0))
    args = {"num_steps": 5, "num_probes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        spectral_density(op, **args)
