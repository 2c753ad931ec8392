r"""The randomized Nyström approximation and the Nyström preconditioner.

For a symmetric positive semi-definite :math:`A` and an orthonormal test matrix
:math:`Q \in \mathbb{R}^{n \times r}` (a Gaussian sketch orthonormalised), the sketch
:math:`Y = A Q` gives :math:`\hat A = Y (Q^\top Y)^{+} Y^\top = U \hat\Lambda U^\top`
(Tropp, Yurtsever, Udell & Cevher 2017); Frangella, Tropp & Udell (2023, Alg. 2.1)
compute it stably with a shift :math:`\nu`, and use it as the preconditioner

.. math::
    P = \frac{1}{\hat\lambda_r + \mu} U (\hat\Lambda + \mu I) U^\top + (I - U U^\top),
    \qquad
    P^{-1} = (\hat\lambda_r + \mu) U (\hat\Lambda + \mu I)^{-1} U^\top + (I - U U^\top)

for :math:`(A + \mu I) x = b`. :func:`nystrom_approximation` is the pure core (tensors
in, tensors out; traceable), used by :class:`~keras_curv.NysNewtonCG` inside the train
step; :func:`randomized_nystrom` runs it on any
:class:`~keras_curv.curvature.LinearOperator`, and :class:`PreconditionedOperator` is
:math:`P^{-1/2} A P^{-1/2}`, whose spectrum shows what the preconditioner does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.numerics import exact_cast
from keras_curv._internal.validation import integer, non_negative
from keras_curv._internal.validation import seed as check_seed
from keras_curv.curvature.operators import LinearOperator


def nystrom_approximation(test_matrix: tf.Tensor, sketch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``U, λ̂`` with ``U diag(λ̂) Uᵀ ≈ A`` from ``Q`` and ``Y = A Q`` (Frangella et al., Alg. 2.1).

    ```
    ν = √n · eps · ‖Y‖_F,   Y_ν = Y + ν Q,   C = chol(Qᵀ Y_ν + s I),   B = (Y_ν + s Q) C⁻ᵀ
    U Σ Vᵀ = svd(B),   λ̂ = max(0, Σ² − ν − s)
    ```

    ``s`` is 0 for a positive semi-definite ``A`` (``Qᵀ Y_ν`` is then positive
    definite); for an indefinite one (a non-convex loss's Hessian) ``s = ν − 2 λ_min(Qᵀ
    Y_ν)`` shifts the sketch of ``A + sI`` until its core is safely positive definite,
    so that the result approximates ``A`` shifted up, with ``s`` taken off again,
    instead of failing in the Cholesky factorisation (the authors' PINN code shifts
    the core alone by ``2 |λ_min|``).

    Args:
        test_matrix: ``Q``, ``(n, r)`` with orthonormal columns.
        sketch: ``Y = A Q``, ``(n, r)``.

    Returns:
        ``(U, λ̂)``: ``(n, r)`` orthonormal columns and ``(r,)`` non-negative values in
        descending order.
    """
    dtype = sketch.dtype
    q = tf.cast(test_matrix, dtype)
    n = tf.cast(tf.shape(sketch)[0], dtype)
    eps = exact_cast(float(np.finfo(dtype.as_numpy_dtype).eps), dtype)
    nu = tf.sqrt(n) * eps * tf.norm(sketch)
    shifted = sketch + nu * q
    core = tf.matmul(q, shifted, transpose_a=True)
    core = 0.5 * (core + tf.transpose(core))
    smallest = tf.reduce_min(tf.linalg.eigvalsh(core))
    # Twice the most negative eigenvalue: the shifted core's smallest is then |λ_min|,
    # far from singular (a shift to exactly 0 would blow up B).
    extra = tf.where(smallest > 0.0, tf.zeros_like(smallest), nu - 2.0 * smallest)
    rank = tf.shape(core)[0]
    lower = tf.linalg.cholesky(core + extra * tf.eye(rank, dtype=dtype))
    # B = Y_s C⁻ᵀ, i.e. Bᵀ = C⁻¹ Y_sᵀ with C lower triangular.
    b = tf.transpose(tf.linalg.triangular_solve(lower, tf.transpose(shifted + extra * q)))
    sigma, u, _ = tf.linalg.svd(b)
    return u, tf.maximum(sigma * sigma - nu - extra, 0.0)


def nystrom_inverse(
    vectors: tf.Tensor, values: tf.Tensor, mu: Any, residual: tf.Tensor, power: float = 1.0
) -> tf.Tensor:
    """``P^(−power) v`` for the Nyström preconditioner of ``A + μI`` (``power`` 1 or ½).

    ```
    P⁻ᵖ v = (λ̂_r + μ)ᵖ U (Λ̂ + μI)⁻ᵖ Uᵀ v + (v − U Uᵀ v)
    ```

    Costs two ``(n, r)`` products. ``P`` is symmetric positive definite for ``μ > 0``.
    """
    dtype = residual.dtype
    vectors = tf.cast(vectors, dtype)
    values = tf.cast(values, dtype)
    mu = exact_cast(mu, dtype)
    coefficients = tf.linalg.matvec(vectors, residual, transpose_a=True)
    scale = (values[-1] + mu) / (values + mu)
    if power != 1.0:
        scale = tf.pow(scale, exact_cast(power, dtype))
    return residual + tf.linalg.matvec(vectors, (scale - 1.0) * coefficients)


@dataclass(frozen=True)
class NystromApproximation:
    """A rank-``r`` Nyström approximation ``U diag(λ̂) Uᵀ`` and its preconditioner.

    Attributes:
        eigenvectors: ``(n, r)`` orthonormal columns ``U``.
        eigenvalues: ``(r,)`` non-negative ``λ̂``, descending.
        num_matvecs: Operator products spent (``r``).
    """

    eigenvectors: tf.Tensor
    eigenvalues: tf.Tensor
    num_matvecs: int

    def preconditioner(self, mu: float) -> Any:
        """``r -> P⁻¹ r`` for ``A + μI`` (``μ > 0``)."""
        mu = non_negative(mu, "mu")
        return lambda r: nystrom_inverse(self.eigenvectors, self.eigenvalues, mu, r)


def randomized_nystrom(
    op: LinearOperator, rank: int, *, seed: int | None = None
) -> NystromApproximation:
    """The randomized Nyström approximation of ``op`` from ``rank`` products.

    Args:
        op: A symmetric operator (positive semi-definite for the textbook guarantees;
            see :func:`nystrom_approximation` for indefinite ones).
        rank: ``r``, in ``[1, op.dim]``.
        seed: Seed of the Gaussian test matrix.

    Returns:
        A :class:`NystromApproximation`.

    Example:
        >>> approx = randomized_nystrom(HessianOperator(model, "mse", x, y), 10, seed=0)
        >>> precondition = approx.preconditioner(mu=1e-4)
    """
    rank = integer(rank, "rank", minimum=1)
    if rank > op.dim:
        raise ValueError(f"`rank` must lie in [1, dim]; got rank={rank} for dim={op.dim}.")
    rng = np.random.default_rng(check_seed(seed))
    omega = rng.standard_normal((op.dim, rank))
    q, _ = np.linalg.qr(omega)
    test = tf.constant(q, op.dtype)
    start = op.num_matvecs
    u, values = nystrom_approximation(test, op.matmat(test))
    return NystromApproximation(u, values, op.num_matvecs - start)


class PreconditionedOperator(LinearOperator):
    """``P^(−½) A P^(−½)`` for a Nyström preconditioner ``P`` of ``A + μI``.

    Its spectrum is what preconditioned CG sees (for ``A + μI`` add ``μ P⁻¹``): with the
    top ``r`` eigenvalues of ``A`` captured, they collapse to about ``λ̂_r + μ``.

    Args:
        op: The operator ``A``.
        approximation: Its :class:`NystromApproximation`.
        mu: ``μ > 0``.
    """

    def __init__(self, op: LinearOperator, approximation: NystromApproximation, mu: float):
        super().__init__(op.dim, op.dtype)
        self.op = op
        self.approximation = approximation
        self.mu = non_negative(mu, "mu")

    def _half(self, v: tf.Tensor) -> tf.Tensor:
        a = self.approximation
        return nystrom_inverse(a.eigenvectors, a.eigenvalues, self.mu, v, power=0.5)

    def _matvec(self, v):
        return self._half(self.op.matvec(self._half(v)))
