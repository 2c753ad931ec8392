r"""Top eigenpairs of a curvature operator: Lanczos, block subspace iteration, power iteration.

All three solvers see the operator only through products, count them, and report
residuals :math:`r_i = \lVert A u_i - \theta_i u_i \rVert` so a caller can judge
both the cost and the accuracy of what comes back. :func:`nystrom_factors` is the
randomized Nyström approximation from one block of products, as a pure function of
tensors (graph-safe: ``SketchySGD`` builds it inside the train step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.validation import choice, integer, positive
from keras_curv.curvature.lanczos import lanczos, tridiagonal_eigh
from keras_curv.curvature.operators import LinearOperator

METHODS = ("lanczos", "nystrom", "power")


def nystrom_factors(test_matrix: tf.Tensor, sketch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    r"""The eigendecomposition of the randomized Nyström approximation of a PSD ``A``.

    ```
    Â = Y (Ωᵀ Y)⁺ Yᵀ = U diag(λ) Uᵀ,      Y = A Ω
    ```

    by the numerically stable shifted algorithm (Tropp, Yurtsever, Udell, Cevher 2017,
    Alg. 3): ``Y_ν = Y + ν Ω`` with ``ν = √dim · eps · ‖Y‖_F``, ``B = Y_ν C^{-1/2}``
    for the core ``C = Ωᵀ Y_ν``, ``B = U Σ Vᵀ`` (thin SVD), ``λ = max(Σ² − ν, 0)``.
    The core's inverse square root comes from its eigendecomposition rather than a
    Cholesky factor, restricted to its positive eigenvalues: identical for PSD ``A``,
    and no failure (a PSD approximation of the positive part) for an indefinite one.
    ``Â ⪯ A`` and rank ``Â ≤ s``; costs ``O(dim · s²)`` beyond the ``s`` products.

    Args:
        test_matrix: ``Ω``, shape ``(dim, s)``, orthonormal columns (the QR factor of a
            Gaussian block).
        sketch: ``Y = A Ω``, shape ``(dim, s)``, same dtype.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(s,)`` non-negative and descending, and
        ``(dim, s)`` orthonormal columns.

    Example:
        >>> omega, _ = tf.linalg.qr(tf.random.normal((100, 12), dtype=tf.float64))
        >>> vals, vecs = nystrom_factors(omega, a @ omega)
    """
    sketch = tf.convert_to_tensor(sketch)
    test_matrix = tf.cast(test_matrix, sketch.dtype)
    dim, size = sketch.shape[0], sketch.shape[1]
    eps = np.finfo(sketch.dtype.as_numpy_dtype).eps
    shift = tf.cast(np.sqrt(dim) * eps, sketch.dtype) * tf.norm(sketch)
    shifted = sketch + shift * test_matrix
    core = tf.linalg.matmul(test_matrix, shifted, transpose_a=True)
    values, vectors = tf.linalg.eigh(0.5 * (core + tf.transpose(core)))
    keep = values > tf.cast(size * eps, values.dtype) * tf.reduce_max(tf.abs(values))
    ones = tf.ones_like(values)
    inverse_sqrt = tf.where(keep, tf.math.rsqrt(tf.where(keep, values, ones)), 0 * ones)
    factor = tf.linalg.matmul(shifted, vectors) * inverse_sqrt
    singular, left, _ = tf.linalg.svd(factor, full_matrices=False)
    return tf.nn.relu(tf.square(singular) - shift), left


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs plus what they cost; unpacks as ``(eigenvalues, eigenvectors)``.

    Attributes:
        eigenvalues: ``(k,)`` float64, in descending algebraic order.
        eigenvectors: ``(dim, k)`` float64 with unit columns, matching ``eigenvalues``.
        residuals: ``(k,)`` residual norms :math:`\\lVert A u_i - \\theta_i u_i \\rVert`
            (for Lanczos the estimate :math:`|\\beta_m s_{m,i}|`, exact in exact arithmetic).
        converged: Whether every pair met the stopping rule within ``max_iters``.
        num_matvecs: Operator products spent (a block of ``b`` counts ``b``).
        num_iters: Lanczos steps, subspace iterations, or power steps summed over pairs.
        method: The solver used.

    Example:
        >>> vals, vecs = top_eigenpairs(op, 3)
        >>> result = top_eigenpairs(op, 3); result.num_matvecs, result.converged
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    converged: bool
    num_matvecs: int
    num_iters: int
    method: str

    def __iter__(self):
        yield self.eigenvalues
        yield self.eigenvectors

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        return (self.eigenvalues, self.eigenvectors)[index]


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iters: int | None = None,
    seed: int | None = None,
    init: Any = None,
    oversampling: int = 10,
) -> EigenResult:
    r"""The ``k`` leading eigenpairs of a symmetric operator.

    Methods:

    * ``"lanczos"`` (default): Lanczos with full reorthogonalisation from one start
      vector. After step ``m`` the Ritz pairs :math:`(\theta_i, Q_m s_i)` of
      :math:`T_m = S \Theta S^\top` have residual :math:`|\beta_m s_{m,i}|`; it stops
      once the ``k`` *largest algebraic* Ritz values all satisfy
      :math:`|\beta_m s_{m,i}| \le tol \cdot |\theta_i|`. ``max_iters`` bounds the
      Krylov dimension (default ``min(dim, max(100, 20 k))``; the basis costs
      ``max_iters * dim * 8`` bytes).
    * ``"nystrom"``: randomized block subspace iteration with Rayleigh–Ritz, block
      size ``b = k + oversampling``: :math:`Y = A Q`, :math:`H = Q^\top Y = S \Theta
      S^\top`, exact residuals :math:`\lVert Y s_i - \theta_i Q s_i \rVert`, then
      :math:`Q \leftarrow \mathrm{qr}(Y)`. It converges to the ``k`` eigenvalues of
      *largest magnitude* (returned sorted algebraically), at the rate
      :math:`|\lambda_{b+1} / \lambda_k|` per pass of ``b`` matvecs. Its first pass is
      the randomized range finder behind the randomized Nyström approximation
      :math:`A \approx Y (Q^\top Y)^{+} Y^\top`, which is only defined for PSD ``A``;
      Rayleigh–Ritz uses the same products, works for indefinite ``A`` and yields
      computable residuals, so it is what is used here. ``max_iters`` counts passes
      (default 100).
    * ``"power"``: deflated power iteration, the baseline of PyHessian-style tools:
      for each ``i``, iterate :math:`v \leftarrow P A v / \lVert P A v \rVert` with
      :math:`P` projecting out the eigenvectors already found, until the Rayleigh
      quotient changes by at most ``tol`` relative. It converges to the
      *largest-magnitude* eigenvalues at rate :math:`|\lambda_{i+1}/\lambda_i|`,
      slowly for clustered spectra. ``max_iters`` is per eigenvalue (default 100).

    For a positive semi-definite operator (a GGN) all three target the same
    eigenvalues. For an indefinite Hessian, Lanczos returns the top algebraic ones,
    the other two the largest in magnitude (which may include negative ones).

    Args:
        op: The symmetric operator.
        k: Number of eigenpairs, in ``[1, op.dim]``.
        method: ``"lanczos"``, ``"nystrom"`` or ``"power"``.
        tol: Relative tolerance of the stopping rule (see above).
        max_iters: Iteration cap (meaning depends on ``method``, see above).
        seed: Seed of the random start vectors, for reproducible results.
        init: Optional warm start, ``(dim,)`` or ``(dim, j)``, e.g. the eigenvectors
            of a previous call. Lanczos starts from the sum of its unit columns,
            subspace iteration puts them in its first block, power iteration starts
            pair ``i`` from column ``i``.
        oversampling: Extra block columns for ``"nystrom"``.

    Returns:
        An :class:`EigenResult`; ``vals, vecs = top_eigenpairs(op, k)`` also works.

    Raises:
        ValueError: ``k`` outside ``[1, dim]``, an unknown ``method``, a bad ``init``,
            or non-positive ``tol``/``max_iters``/negative ``oversampling``.

    Example:
        >>> op = DenseOperator(np.diag([5.0, 3.0, 1.0, -2.0]))
        >>> vals, vecs = top_eigenpairs(op, 2, seed=0)
        >>> np.round(vals, 6)
        array([5., 3.])
    """
    choice(method, "method", METHODS)
    dim = op.dim
    k = integer(k, "k", minimum=1)
    if k > dim:
        raise ValueError(
            f"`k` must lie in [1, dim]; got k={k} for an operator of dim={dim}. "
            "Ask for at most dim eigenpairs."
        )
    tol = positive(tol, "tol")
    max_iters = integer(max_iters, "max_iters", minimum=1, allow_none=True)
    oversampling = integer(oversampling, "oversampling", minimum=0)
    init_block = _check_init(init, dim)
    rng = np.random.default_rng(seed)
    start = op.num_matvecs
    if method == "lanczos":
        out = _lanczos(op, k, tol, max_iters, rng, init_block)
    elif method == "nystrom":
        out = _subspace(op, k, tol, max_iters, rng, init_block, oversampling)
    else:
        out = _power(op, k, tol, max_iters, rng, init_block)
    vals, vecs, residuals, converged, iters = out
    order = np.argsort(-vals, kind="stable")
    return EigenResult(
        eigenvalues=vals[order],
        eigenvectors=vecs[:, order],
        residuals=residuals[order],
        converged=bool(converged),
        num_matvecs=op.num_matvecs - start,
        num_iters=int(iters),
        method=method,
    )


def _check_init(init: Any, dim: int) -> np.ndarray | None:
    if init is None:
        return None
    block = np.asarray(init, dtype=np.float64)
    if block.ndim == 1:
        block = block[:, None]
    if block.ndim != 2 or block.shape[0] != dim or block.shape[1] == 0:
        raise ValueError(
            f"`init` must have shape ({dim},) or ({dim}, j) with j >= 1; got "
            f"{np.shape(init)}. Pass previous eigenvectors as columns."
        )
    if not np.all(np.isfinite(block)):
        raise ValueError("`init` contains NaN or infinite values.")
    norms = np.linalg.norm(block, axis=0)
    if np.any(norms == 0):
        raise ValueError("`init` has an all-zero column; drop it or pass None.")
    return block / norms


def _matmat64(op: LinearOperator, block: tf.Tensor) -> tf.Tensor:
    return tf.cast(op.matmat(tf.cast(block, op.dtype)), tf.float64)


def _lanczos(op, k, tol, max_iters, rng, init):
    dim = op.dim
    steps = min(dim, max(100, 20 * k)) if max_iters is None else min(dim, int(max_iters))
    steps = max(steps, k)
    start = rng.standard_normal(dim) if init is None else init.sum(axis=1)
    if np.linalg.norm(start) == 0.0:  # e.g. init = [u, -u]: fall back to its first column
        start = init[:, 0]
    eps = np.finfo(op.dtype.as_numpy_dtype).eps
    state = {"converged": False}

    def check(alphas, betas, broke):
        m = len(alphas)
        if m < k:
            return False
        theta, s = tridiagonal_eigh(alphas, betas[:-1])
        top = np.argsort(-theta, kind="stable")[:k]
        residuals = np.abs(betas[-1] * s[-1, top])
        floor = eps * np.max(np.abs(theta))
        # At a breakdown the residuals are exactly zero, but larger eigenvalues may
        # still lie outside the invariant Krylov space: keep going unless it is all of R^dim.
        done = bool(np.all(residuals <= tol * np.maximum(np.abs(theta[top]), floor)))
        state["converged"] = done and (not broke or m == dim)
        return state["converged"]

    dec = lanczos(op, start, steps, return_basis=True, restart_rng=rng, stop=check)
    m = dec.num_steps
    theta, s = dec.eigh()
    top = np.argsort(-theta, kind="stable")[:k]
    coeffs = tf.constant(s[:, top], tf.float64)
    vecs = tf.linalg.matmul(dec.basis, coeffs, transpose_a=True)
    vecs = (vecs / tf.norm(vecs, axis=0, keepdims=True)).numpy()
    residuals = np.abs(dec.betas[-1] * s[-1, top])
    converged = state["converged"] or m == dim
    return theta[top], vecs, residuals, converged, m


def _subspace(op, k, tol, max_iters, rng, init, oversampling):
    dim = op.dim
    iters = 100 if max_iters is None else int(max_iters)
    b = min(dim, k + oversampling)
    block = rng.standard_normal((dim, b))
    if init is not None:
        j = min(b, init.shape[1])
        block[:, :j] = init[:, :j]
    q, _ = tf.linalg.qr(tf.constant(block, tf.float64))
    eps = np.finfo(op.dtype.as_numpy_dtype).eps
    for it in range(1, iters + 1):
        y = _matmat64(op, q)
        h = tf.linalg.matmul(q, y, transpose_a=True).numpy()
        theta, s = np.linalg.eigh(0.5 * (h + h.T))
        top = np.argsort(-np.abs(theta), kind="stable")[:k]
        s_top = tf.constant(s[:, top], tf.float64)
        vecs = tf.linalg.matmul(q, s_top)
        # A u_i = Y s_i exactly, so the residuals cost no extra products.
        resid = tf.linalg.matmul(y, s_top) - vecs * tf.constant(theta[top], tf.float64)
        residuals = tf.norm(resid, axis=0).numpy()
        floor = eps * np.max(np.abs(theta))
        converged = bool(np.all(residuals <= tol * np.maximum(np.abs(theta[top]), floor)))
        if converged or it == iters:
            break
        q, _ = tf.linalg.qr(y)
    return theta[top], vecs.numpy(), residuals, converged or b == dim, it


def _power(op, k, tol, max_iters, rng, init):
    dim = op.dim
    iters = 100 if max_iters is None else int(max_iters)
    eps = np.finfo(op.dtype.as_numpy_dtype).eps
    found = tf.zeros((dim, 0), tf.float64)
    vals, residuals, all_converged, total = [], [], True, 0

    def deflate(w):
        for _ in range(2):
            w = w - tf.linalg.matvec(found, tf.linalg.matvec(found, w, transpose_a=True))
        return w

    for i in range(k):
        start = init[:, i] if init is not None and i < init.shape[1] else rng.standard_normal(dim)
        v = deflate(tf.constant(start, tf.float64))
        if float(tf.norm(v)) <= eps:  # warm start lies in the span already found
            v = deflate(tf.constant(rng.standard_normal(dim), tf.float64))
        v = v / tf.norm(v)
        theta_prev, converged = None, False
        for _ in range(iters):
            total += 1
            av = tf.cast(op.matvec(tf.cast(v, op.dtype)), tf.float64)
            theta = float(tf.tensordot(v, av, 1))
            residual = float(tf.norm(av - theta * v))
            if theta_prev is not None and abs(theta - theta_prev) <= tol * max(
                abs(theta_prev), eps
            ):
                converged = True
                break
            theta_prev = theta
            w = deflate(av)
            norm = float(tf.norm(w))
            if norm == 0.0:  # v spans an invariant subspace: theta is exact
                converged = True
                break
            v = w / norm
        vals.append(theta)
        residuals.append(residual)
        all_converged &= converged
        found = tf.concat([found, v[:, None]], axis=1)
    return np.array(vals), found.numpy(), np.array(residuals), all_converged, total
