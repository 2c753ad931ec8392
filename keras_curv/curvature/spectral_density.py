r"""Eigenvalue density by stochastic Lanczos quadrature (SLQ).

For a unit probe :math:`v` and ``m`` Lanczos steps from it, :math:`T_m = S \Theta
S^\top` gives a Gauss quadrature rule for the spectral measure of :math:`A` seen
from :math:`v`:

.. math::
    v^\top f(A)\, v = \sum_j (u_j^\top v)^2 f(\lambda_j)
    \approx \sum_{i=1}^{m} w_i f(\theta_i), \qquad w_i = S_{1i}^2,

exact for polynomials of degree :math:`\le 2m - 1`. With :math:`v` Rademacher or
Gaussian, :math:`\mathbb{E}[d\, v^\top f(A) v] = \operatorname{tr} f(A)`, so the
average over probes of these rules estimates :math:`\frac{1}{d}\sum_j
\delta(t - \lambda_j)`, which is then smoothed by Gaussian kernels (Ubaru, Chen &
Saad 2017; Ghorbani, Krishnan & Xiao 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_curv._internal.validation import choice, integer, positive
from keras_curv.curvature.lanczos import lanczos
from keras_curv.curvature.operators import LinearOperator

PROBES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed eigenvalue density and the quadrature rules behind it.

    Attributes:
        grid: ``(grid_size,)`` evaluation points, spanning the nodes plus ``6 sigma``.
        density: ``(grid_size,)`` smoothed density on ``grid``; integrates to ~1.
        nodes: ``(num_probes, m)`` Ritz values per probe (rows padded with weight 0
            when a probe's Krylov space became invariant before ``m`` steps).
        weights: ``(num_probes, m)`` quadrature weights; each row sums to 1.
        sigma: Width of the Gaussian kernels.
        num_matvecs: Operator products spent.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    num_matvecs: int

    def moment(self, power: int) -> float:
        r"""Quadrature estimate of :math:`\operatorname{tr}(A^p)/d`, averaged over probes."""
        return float(np.mean(np.sum(self.weights * self.nodes**power, axis=1)))


def spectral_density(
    op: LinearOperator,
    num_steps: int,
    num_probes: int,
    seed: int | None = None,
    grid_size: int = 1000,
    sigma: float | None = None,
    probe: str = "rademacher",
) -> SpectralDensity:
    r"""Estimates the eigenvalue density of ``op`` by stochastic Lanczos quadrature.

    .. math::
        \rho(t) \approx \frac{1}{P} \sum_{p=1}^{P} \sum_{i=1}^{m} w_{p,i}\,
        \frac{1}{\sigma\sqrt{2\pi}} \exp\!\Big(-\frac{(t - \theta_{p,i})^2}{2\sigma^2}\Big)

    Costs ``num_probes * num_steps`` matvecs (fewer if a probe breaks down).

    Args:
        op: The symmetric operator.
        num_steps: Lanczos steps per probe ``m``, in ``[1, dim]``; the quadrature
            resolves about ``m`` distinct features of the spectrum.
        num_probes: Number of random probes ``P >= 1``.
        seed: Seed of the probes, for reproducible results.
        grid_size: Number of grid points (``>= 2``).
        sigma: Kernel width; default ``0.01 * (max node - min node)`` (or
            ``0.01 * max(|node|, 1)`` for a single-point spectrum).
        probe: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ValueError: a count out of range, a non-positive ``sigma``, or an unknown probe.

    Example:
        >>> sd = spectral_density(op, num_steps=80, num_probes=4, seed=0)
        >>> plt.semilogy(sd.grid, sd.density)
    """
    dim = op.dim
    num_probes = integer(num_probes, "num_probes", minimum=1)
    grid_size = integer(grid_size, "grid_size", minimum=2)
    num_steps = integer(num_steps, "num_steps", minimum=1)
    if num_steps > dim:
        raise ValueError(
            f"`num_steps` must lie in [1, dim]; got num_steps={num_steps} for an operator "
            f"of dim={dim}."
        )
    sigma = positive(sigma, "sigma", allow_none=True)
    choice(probe, "probe", PROBES)

    rng = np.random.default_rng(seed)
    start = op.num_matvecs
    nodes = np.zeros((num_probes, num_steps))
    weights = np.zeros((num_probes, num_steps))
    for p in range(num_probes):
        if probe == "rademacher":
            v = rng.choice(np.array([-1.0, 1.0]), size=dim)
        else:
            v = rng.standard_normal(dim)
        # No restarts: at a breakdown the rule is already exact for this probe.
        dec = lanczos(op, v, num_steps)
        theta, s = dec.eigh()
        m = len(theta)
        nodes[p, :m] = theta
        nodes[p, m:] = theta[-1]
        weights[p, :m] = s[0, :] ** 2

    live = nodes[weights > 0]
    low, high = float(live.min()), float(live.max())
    if sigma is None:
        spread = high - low
        sigma = 0.01 * (spread if spread > 0 else max(abs(high), 1.0))
    grid = np.linspace(low - 6 * sigma, high + 6 * sigma, grid_size)
    # (grid, probes*m) kernel matrix; probes*m is small (hundreds to thousands).
    diff = (grid[:, None] - nodes.reshape(-1)[None, :]) / sigma
    kernel = np.exp(-0.5 * diff**2) / (sigma * np.sqrt(2.0 * np.pi))
    density = kernel @ weights.reshape(-1) / num_probes
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        num_matvecs=op.num_matvecs - start,
    )
