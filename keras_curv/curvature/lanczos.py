r"""The Lanczos tridiagonalisation shared by the eigensolver and spectral density.

Given a symmetric operator :math:`A` and a start vector :math:`q_1`, ``m`` steps of

.. math::
    \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},
    \qquad \alpha_j = q_j^\top A q_j, \quad \beta_j = \lVert \cdot \rVert

build an orthonormal basis :math:`Q_m = [q_1, \dots, q_m]` of the Krylov space
:math:`\mathcal{K}_m(A, q_1)` with :math:`Q_m^\top A Q_m = T_m`, the symmetric
tridiagonal matrix with diagonal :math:`\alpha` and off-diagonal :math:`\beta`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import tensorflow as tf

from keras_curv._internal.validation import integer
from keras_curv.curvature.operators import LinearOperator

# beta_j <= _BREAKDOWN * eps(op dtype) * ||T|| counts as an invariant subspace.
_BREAKDOWN = 1e3


@dataclass(frozen=True)
class LanczosDecomposition:
    """The output of :func:`lanczos`.

    Attributes:
        alphas: ``(m,)`` diagonal of :math:`T_m`.
        betas: ``(m,)`` off-diagonal; ``betas[j]`` couples ``q_j`` and ``q_{j+1}``, and
            ``betas[-1]`` is the norm of the residual after the last step (the
            :math:`\\beta_m` in the Ritz residual :math:`|\\beta_m s_{m,i}|`). A zero entry
            marks a breakdown (an invariant subspace was found).
        basis: ``(m, dim)`` float64 tensor whose rows are :math:`q_1, \\dots, q_m`, or
            ``None`` when not requested.
        num_restarts: How often a breakdown was followed by a fresh random direction.
        breakdown: Whether the last step ended in an invariant subspace.
    """

    alphas: np.ndarray
    betas: np.ndarray
    basis: tf.Tensor | None
    num_restarts: int
    breakdown: bool

    @property
    def num_steps(self) -> int:
        return int(self.alphas.shape[0])

    def tridiagonal(self) -> np.ndarray:
        """The ``(m, m)`` matrix :math:`T_m` as a dense float64 array."""
        return tridiagonal(self.alphas, self.betas[:-1])

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of :math:`T_m`; see :func:`tridiagonal_eigh`."""
        return tridiagonal_eigh(self.alphas, self.betas[:-1])


def tridiagonal(alphas: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Dense symmetric tridiagonal matrix from its diagonal and off-diagonal."""
    t = np.diag(np.asarray(alphas, np.float64))
    if len(off):
        t += np.diag(off, 1) + np.diag(off, -1)
    return t


def tridiagonal_eigh(alphas: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a symmetric tridiagonal matrix, in O(m^2) by LAPACK's stemr.

    Much cheaper than a dense ``eigh`` of :func:`tridiagonal` (which also spins up BLAS
    threads that compete with TensorFlow's): it runs after every Lanczos step.

    Returns:
        ``(theta, s)``: ascending eigenvalues and the matching unit eigenvectors (columns).
    """
    alphas = np.asarray(alphas, np.float64)
    if len(alphas) == 1:
        return alphas.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alphas, np.asarray(off, np.float64))


def _orthogonalise(w: tf.Tensor, basis: tf.Tensor) -> tf.Tensor:
    # Classical Gram–Schmidt applied twice ("twice is enough", Giraud et al. 2005):
    # keeps Q orthonormal to working precision at two matrix-vector products each.
    # Rows of `basis` not yet filled are zero and contribute nothing.
    for _ in range(2):
        w = w - tf.linalg.matvec(basis, tf.linalg.matvec(basis, w), transpose_a=True)
    return w


@tf.function(reduce_retracing=True)
def _three_term_step(w, q, q_prev, beta_prev, basis):
    """alpha_j, and the reorthogonalised residual of step j (one traced graph)."""
    alpha = tf.tensordot(q, w, 1)
    w = _orthogonalise(w - alpha * q - beta_prev * q_prev, basis)
    return alpha, w, tf.norm(w)


def lanczos(
    op: LinearOperator,
    start: Any,
    num_steps: int,
    *,
    return_basis: bool = False,
    restart_rng: np.random.Generator | None = None,
    stop: Callable[[np.ndarray, np.ndarray, bool], bool] | None = None,
) -> LanczosDecomposition:
    r"""Runs ``num_steps`` Lanczos steps with full reorthogonalisation.

    The recurrence runs in float64 whatever ``op.dtype`` is; vectors are cast to
    ``op.dtype`` only for ``op.matvec``. Each new direction is reorthogonalised
    against the whole basis (kept on device), so :math:`T_m` has no spurious
    ("ghost") copies of converged eigenvalues. The cost is ``m`` matvecs plus
    :math:`O(m^2 \cdot dim)` flops and ``m * dim * 8`` bytes for the basis.

    When :math:`\beta_j` vanishes (to ``1e3 * eps * ||T||``) the Krylov space is
    invariant under :math:`A`. With ``restart_rng`` the recurrence continues from a
    random direction orthogonal to the basis, leaving :math:`\beta_j = 0` (``T``
    becomes block diagonal, each block exact); without it, it stops early.

    Args:
        op: The symmetric operator.
        start: Start vector of shape ``(dim,)``; normalised here.
        num_steps: Maximum number of steps ``m``, in ``[1, op.dim]``.
        return_basis: Also return the basis :math:`Q_m` (rows).
        restart_rng: Random generator for restarts after a breakdown; ``None`` stops.
        stop: Optional ``stop(alphas, betas, breakdown) -> bool`` called after every
            step with the coefficients so far; returning ``True`` ends the run.

    Returns:
        A :class:`LanczosDecomposition`.

    Raises:
        ValueError: ``num_steps`` outside ``[1, dim]`` or a zero/non-finite start vector.

    Example:
        >>> dec = lanczos(DenseOperator(np.diag([3.0, 2.0, 1.0])), np.ones(3), 3)
        >>> np.allclose(np.linalg.eigvalsh(dec.tridiagonal()), [1.0, 2.0, 3.0])
        True
    """
    dim = op.dim
    num_steps = integer(num_steps, "num_steps", minimum=1)
    if num_steps > dim:
        raise ValueError(
            f"`num_steps` must lie in [1, dim={dim}]; got {num_steps}. A Krylov space of "
            "the operator cannot have more dimensions than the operator itself."
        )
    q = tf.reshape(tf.cast(tf.convert_to_tensor(start), tf.float64), [-1])
    if q.shape[0] != dim:
        raise ValueError(f"The start vector must have shape ({dim},); got {tuple(q.shape)}.")
    norm = float(tf.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("The Lanczos start vector must be finite and non-zero.")
    q = q / norm
    eps = float(np.finfo(op.dtype.as_numpy_dtype).eps)

    basis = tf.Variable(tf.zeros((num_steps, dim), tf.float64), trainable=False)
    alphas: list[float] = []
    betas: list[float] = []
    q_prev, beta_prev = tf.zeros_like(q), 0.0
    t_norm = 0.0
    restarts = 0
    broke = False
    for j in range(num_steps):
        basis[j].assign(q)
        w = tf.cast(op.matvec(tf.cast(q, op.dtype)), tf.float64)
        alpha, w, beta = _three_term_step(w, q, q_prev, tf.constant(beta_prev, tf.float64), basis)
        alpha, beta = float(alpha), float(beta)
        t_norm = max(t_norm, abs(alpha) + beta + beta_prev)
        broke = beta <= _BREAKDOWN * eps * t_norm
        if broke:
            beta = 0.0
        alphas.append(alpha)
        betas.append(beta)
        if stop is not None and stop(np.array(alphas), np.array(betas), broke):
            break
        if j + 1 == num_steps:
            break
        if broke:
            if restart_rng is None:
                break
            fresh = tf.constant(restart_rng.standard_normal(dim), tf.float64)
            fresh = _orthogonalise(fresh, basis)
            fresh_norm = float(tf.norm(fresh))
            if fresh_norm == 0.0:
                break
            q_prev, q, beta_prev = tf.zeros_like(q), fresh / fresh_norm, 0.0
            restarts += 1
        else:
            q_prev, q, beta_prev = q, w / beta, beta

    m = len(alphas)
    return LanczosDecomposition(
        alphas=np.array(alphas),
        betas=np.array(betas),
        basis=tf.convert_to_tensor(basis[:m]) if return_basis else None,
        num_restarts=restarts,
        breakdown=broke,
    )
