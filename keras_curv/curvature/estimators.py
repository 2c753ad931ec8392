r"""Randomised trace and diagonal estimators for curvature operators.

Both estimators see the operator only through products with random sign vectors
(Rademacher probes, entries :math:`\pm 1` with probability :math:`1/2` each), so
they work for Hessians and GGNs far too large to form. Probes are sent to the
operator in blocks through ``op.matmat``; every reduction is done in float64,
whatever the operator's dtype, so that averaging many float32 products does not
lose digits.

Cost is counted in matrix-vector products ("matvecs"): a block of ``k`` probes
costs ``k``. Each estimator spends exactly ``num_samples`` of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.validation import choice, integer, is_int

_METHODS = ("hutchinson", "hutch++")
_DEFAULT_BLOCK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of ``tr(A)`` with its error bar.

    ``float(result)`` gives :attr:`estimate`, so the object can be used where a
    number is expected.

    Attributes:
        estimate: The trace estimate.
        std_error: Standard error of the stochastic (Hutchinson) part: the sample
            standard deviation of the per-probe quadratic forms divided by the
            square root of their number. ``nan`` when that part used a single probe.
            It covers sampling error only, not rounding in the operator's dtype.
        num_matvecs: Matrix-vector products spent (equal to ``num_samples``).
        method: ``"hutchinson"`` or ``"hutch++"``.
        parts: With ``ranges``: the estimate's share in each block of flat indices, an
            estimate of the trace of that principal block (over blocks that tile the
            space they add up to :attr:`estimate`); else ``None``.
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    parts: tuple[float, ...] | None = None

    def __float__(self) -> float:
        return float(self.estimate)


@dataclasses.dataclass(frozen=True)
class DiagonalEstimate:
    """A stochastic estimate of ``diag(A)`` with per-entry error bars.

    ``np.asarray(result)`` gives :attr:`diagonal`, so the object can be passed to
    NumPy functions directly.

    Attributes:
        diagonal: float64 array of shape ``(dim,)``, the diagonal estimate.
        std_error: float64 array of shape ``(dim,)``: per entry, the sample standard
            deviation of the per-probe values divided by ``sqrt(num_samples)``
            (``nan`` for a single probe).
        num_matvecs: Matrix-vector products spent (equal to ``num_samples``).
    """

    diagonal: np.ndarray
    std_error: np.ndarray
    num_matvecs: int

    def __array__(self, dtype=None, copy=None):
        if dtype is None:
            return self.diagonal.copy() if copy else self.diagonal
        return self.diagonal.astype(dtype)

    def __len__(self) -> int:
        return len(self.diagonal)


def hutchinson_trace(
    op: Any,
    num_samples: int,
    seed: int | np.random.Generator | None = None,
    method: str = "hutch++",
    *,
    block_size: int = _DEFAULT_BLOCK_SIZE,
    ranges: Any = None,
) -> TraceEstimate:
    r"""Estimates the trace of a symmetric operator from ``num_samples`` matvecs.

    ``"hutchinson"`` averages quadratic forms of Rademacher probes :math:`z_i`:

    .. math::
        \operatorname{tr}(A) \approx \frac{1}{m} \sum_{i=1}^{m} z_i^\top A z_i,
        \qquad \operatorname{Var}[z^\top A z] = 2\Big(\|A\|_F^2 - \sum_j A_{jj}^2\Big).

    ``"hutch++"`` (Meyer, Musco, Musco & Woodruff, 2021) first captures the top of
    the spectrum exactly and runs Hutchinson only on what is left. With
    :math:`s = \min(\lfloor m/3 \rfloor, \text{dim})` and :math:`g = m - 2s`:

    .. math::
        Q = \operatorname{orth}(A S), \quad
        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
        + \frac{1}{g} \sum_{i=1}^{g} z_i^\top (I - QQ^\top) A (I - QQ^\top) z_i,

    where ``S`` holds ``s`` probes. The budget splits as ``s`` matvecs for ``A S``,
    ``s`` for ``A Q`` and the remaining ``g >= s`` for the deflated Hutchinson part,
    so exactly ``m`` in total; the minimum budget is ``m = 3``. For an operator of
    rank below ``s`` the result is exact up to rounding.

    The default is ``"hutch++"``: curvature matrices of networks have a few large
    outlier eigenvalues on top of a bulk, which is where deflation pays most (error
    :math:`O(1/m)` instead of :math:`O(1/\sqrt{m})` for fast-decaying spectra). On a
    flat spectrum it can cost up to about a factor ``sqrt(3)`` in standard error,
    since only a third of the probes go to the stochastic part; pick
    ``"hutchinson"`` for such operators or for budgets below 3.

    Both estimates are sums over flat indices :math:`i` of per-index terms,
    :math:`z_i (Az)_i` and :math:`(Q (AQ)^\top)_{ii} + p_i (A p)_i` with
    :math:`p = (I - QQ^\top) z`, whose expectations are :math:`A_{ii}`. Summed over a
    block of indices (``ranges``) they estimate the trace of that principal block, for
    no extra product (the per-layer traces of ``HessianSpectrum(blocks=...)``); where
    the sketch spans the whole space they are exact.

    Args:
        op: A :class:`~keras_curv.curvature.LinearOperator` (anything with ``dim``,
            ``dtype`` and ``matmat``). Assumed symmetric.
        num_samples: Total matvec budget ``m``: a positive int, at least 3 for
            ``"hutch++"``.
        seed: An int (or ``numpy.random.Generator``) making the probes
            reproducible; ``None`` draws fresh entropy.
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        block_size: Probes sent to ``op.matmat`` per call; bounds the memory of a
            ``(dim, block_size)`` block without changing the result.
        ranges: Optional blocks of flat indices, each a list of ``(start, stop)``
            pairs; their traces come back in :attr:`TraceEstimate.parts`.

    Returns:
        A :class:`TraceEstimate` with ``estimate``, ``std_error``, ``num_matvecs``.

    Raises:
        ValueError: bad ``num_samples``, ``method``, ``block_size`` or ``op``.

    Example:
        >>> op = DenseOperator(np.diag(np.arange(1.0, 101.0)))
        >>> result = hutchinson_trace(op, num_samples=30, seed=0, method="hutchinson")
        >>> round(float(result))  # zᵀDz = tr(D) for every sign vector z
        5050
        >>> result.num_matvecs
        30
    """
    choice(method, "method", _METHODS)
    if method == "hutch++" and is_int(num_samples) and num_samples < 3:
        raise ValueError(
            "hutch++ needs `num_samples` >= 3 (a third each for the sketch, its products "
            f"and the residual probes); got {num_samples}. Raise it, or use "
            "method='hutchinson'."
        )
    num_samples = integer(num_samples, "num_samples", minimum=1)
    block_size = integer(block_size, "block_size", minimum=1)
    dim, dtype = _check_operator(op)
    rng = np.random.default_rng(seed)

    blocks = _block_ranges(ranges, dim)

    if method == "hutchinson":
        forms, terms = _quadratic_forms(op, dim, dtype, num_samples, rng, block_size, basis=None)
        estimate, std_error = _mean_and_error(forms)
        return TraceEstimate(estimate, std_error, num_samples, method, _parts(terms, blocks))

    sketch_size = min(num_samples // 3, dim)
    sketch = _rademacher(rng, (dim, sketch_size))
    a_sketch = _as_float64(op.matmat(tf.constant(sketch, dtype)))
    # Householder QR gives orthonormal columns even when A S is rank deficient, and
    # tr(QᵀAQ) + tr((I-QQᵀ)A(I-QQᵀ)) = tr(A) holds for any orthonormal Q.
    basis, _ = tf.linalg.qr(a_sketch)
    a_basis = _as_float64(op.matmat(tf.cast(basis, dtype)))
    exact_terms = tf.reduce_sum(basis * a_basis, axis=1).numpy()  # diag(Q (AQ)ᵀ)
    forms, terms = _quadratic_forms(
        op, dim, dtype, num_samples - 2 * sketch_size, rng, block_size, basis=basis
    )
    remainder, std_error = _mean_and_error(forms)
    parts = _parts(exact_terms + terms, blocks)
    return TraceEstimate(
        float(np.sum(exact_terms)) + remainder, std_error, num_samples, method, parts
    )


def _block_ranges(ranges: Any, dim: int) -> list[list[tuple[int, int]]] | None:
    """``ranges`` as one list of ``(start, stop)`` pairs per block (validated)."""
    if ranges is None:
        return None
    blocks = []
    for block in ranges:
        pairs = [(int(a), int(b)) for a, b in block]
        if not pairs or any(not 0 <= a < b <= dim for a, b in pairs):
            raise ValueError(
                f"`ranges` must be blocks of non-empty (start, stop) ranges within [0, {dim}); "
                f"got {block!r}."
            )
        blocks.append(pairs)
    return blocks


def _parts(terms: np.ndarray, blocks: list | None) -> tuple[float, ...] | None:
    if blocks is None:
        return None
    return tuple(float(sum(np.sum(terms[a:b]) for a, b in block)) for block in blocks)


def hutchinson_diagonal(
    op: Any,
    num_samples: int,
    seed: int | np.random.Generator | None = None,
    *,
    block_size: int = _DEFAULT_BLOCK_SIZE,
) -> DiagonalEstimate:
    r"""Estimates the diagonal of a symmetric operator from ``num_samples`` matvecs.

    .. math::
        \operatorname{diag}(A) \approx \frac{1}{m} \sum_{i=1}^{m} z_i \odot A z_i,
        \qquad \operatorname{Var}[(z \odot A z)_j] = \sum_{k \ne j} A_{jk}^2,

    with Rademacher probes :math:`z_i`. Unbiased; exact for a diagonal matrix with
    any number of probes, since :math:`z \odot D z = z \odot z \odot d = d`.

    Args:
        op: A :class:`~keras_curv.curvature.LinearOperator` (anything with ``dim``,
            ``dtype`` and ``matmat``).
        num_samples: Number of probes ``m`` (= matvecs): a positive int.
        seed: An int (or ``numpy.random.Generator``) making the probes
            reproducible; ``None`` draws fresh entropy.
        block_size: Probes sent to ``op.matmat`` per call; bounds memory without
            changing the result.

    Returns:
        A :class:`DiagonalEstimate`: ``diagonal`` and per-entry ``std_error`` as
        float64 arrays of shape ``(dim,)``, and ``num_matvecs``.
        ``np.asarray(result)`` is the diagonal.

    Raises:
        ValueError: bad ``num_samples``, ``block_size`` or ``op``.

    Example:
        >>> op = DenseOperator(np.array([[2.0, 1.0], [1.0, 3.0]]))
        >>> result = hutchinson_diagonal(op, num_samples=2000, seed=0)
        >>> np.round(result.diagonal, 1)
        array([2., 3.])
    """
    num_samples = integer(num_samples, "num_samples", minimum=1)
    block_size = integer(block_size, "block_size", minimum=1)
    dim, dtype = _check_operator(op)
    rng = np.random.default_rng(seed)

    # Per-block mean and sum of squared deviations, merged pairwise (Chan et al.):
    # memory stays O(dim) for any budget, and no large sum of squares is
    # differenced, which would cancel when the diagonal dominates the noise.
    count = 0
    mean = tf.zeros([dim], tf.float64)
    squares = tf.zeros([dim], tf.float64)
    for size in _block_sizes(num_samples, block_size):
        probes = _rademacher(rng, (dim, size))
        products = _as_float64(op.matmat(tf.constant(probes, dtype)))
        values = tf.constant(probes, tf.float64) * products
        block_mean = tf.reduce_mean(values, axis=1)
        block_squares = tf.reduce_sum(tf.square(values - block_mean[:, None]), axis=1)
        delta = block_mean - mean
        merged = count + size
        mean += delta * (size / merged)
        squares += block_squares + tf.square(delta) * (count * size / merged)
        count = merged
    mean = mean.numpy()
    if num_samples > 1:
        std_error = np.sqrt(squares.numpy() / (num_samples - 1) / num_samples)
    else:
        std_error = np.full(dim, np.nan)
    return DiagonalEstimate(mean, std_error, num_samples)


def _rademacher(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Independent ±1 entries with probability 1/2 each, as float64."""
    # Drawn probe-major and transposed, so that probe i is the same vector whatever
    # the block size. Comparing a uniform draw with 1/2 (rather than, say,
    # `integers(0, 1)`, whose upper bound is exclusive and yields only -1 probes, a
    # bug public samplers have shipped) gives each sign with probability 1/2, and
    # consumes the bit stream identically however the draws are chunked.
    dim, count = shape
    signs = np.where(rng.random((count, dim)) < 0.5, 1.0, -1.0)
    return np.ascontiguousarray(signs.T)


def _quadratic_forms(op, dim, dtype, count, rng, block_size, basis):
    """Per-probe ``zᵀ P A P z`` in float64, with ``P = I - QQᵀ`` (or ``I`` if no basis),
    and the per-index terms ``(Pz)_i (APz)_i`` averaged over the probes, ``(dim,)``."""
    forms, terms = [], np.zeros(dim)
    for size in _block_sizes(count, block_size):
        probes = tf.constant(_rademacher(rng, (dim, size)), tf.float64)
        if basis is not None:
            probes -= tf.matmul(basis, tf.matmul(basis, probes, transpose_a=True))
        products = _as_float64(op.matmat(tf.cast(probes, dtype)))
        forms.append(tf.reduce_sum(probes * products, axis=0))
        terms += tf.reduce_sum(probes * products, axis=1).numpy()
    return tf.concat(forms, axis=0).numpy(), terms / max(count, 1)


def _mean_and_error(samples: np.ndarray) -> tuple[float, float]:
    mean = float(np.mean(samples))
    if samples.size < 2:
        return mean, math.nan
    return mean, float(np.std(samples, ddof=1) / math.sqrt(samples.size))


def _block_sizes(total: int, block_size: int):
    for start in range(0, total, block_size):
        yield min(block_size, total - start)


def _as_float64(tensor) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(tensor), tf.float64)


def _check_operator(op: Any) -> tuple[int, tf.DType]:
    if not all(hasattr(op, attr) for attr in ("dim", "dtype", "matmat")):
        raise ValueError(
            "`op` must be a curvature operator with `dim`, `dtype` and `matmat` (e.g. "
            f"keras_curv.curvature.DenseOperator); got {type(op).__name__}. Wrap a "
            "matrix with DenseOperator(matrix)."
        )
    dtype = tf.as_dtype(op.dtype)
    if not dtype.is_floating:
        raise ValueError(f"The operator must have a floating dtype; got {dtype.name}.")
    return int(op.dim), dtype
