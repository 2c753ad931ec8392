r"""How well two sets of directions in parameter space line up (Appendix C, class-subspace paper).

The class-subspace quasi-Newton method rests on the claim that the per-class mean logit
gradients :math:`v_1, \dots, v_C` span (nearly) the same subspace as the top-:math:`C`
Hessian eigenvectors :math:`e_1, \dots, e_C`. These pure functions measure that claim.

Every function takes directions as the **rows** of a ``(k, dim)`` array (the layout of
:func:`~keras_curv.curvature.class_gradients`); pass ``EigenResult.eigenvectors.T`` for
eigenvectors, which come as columns. Rows need not be normalised; all-zero rows (a class
absent from the probe data) carry no direction and are ignored by the subspace measures.
Inputs may be NumPy arrays or tensors; everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize

from keras_curv._internal.validation import number

DEFAULT_RANK_COS_TOL = 0.9


def _rows(directions: Any, name: str) -> np.ndarray:
    array = np.asarray(directions, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be a (k, dim) array of directions as rows, k >= 1; got shape "
            f"{np.shape(directions)}. Eigenvectors come as columns: pass `eigenvectors.T`."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return array


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _rows(a, "a"), _rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"Both sets of directions must live in the same space; got dim {a.shape[1]} for `a` "
            f"and {b.shape[1]} for `b`."
        )
    return a, b


def _unit_rows(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def _nonzero_rows(a: np.ndarray, name: str) -> np.ndarray:
    kept = a[np.linalg.norm(a, axis=1) > 0]
    if kept.shape[0] == 0:
        raise ValueError(f"Every row of `{name}` is zero: it spans no subspace.")
    return kept


def cosine_matrix(a: Any, b: Any) -> np.ndarray:
    r"""Absolute cosines between every row of ``a`` and every row of ``b``.

    .. math::
        M_{ij} = \frac{|a_i^\top b_j|}{\lVert a_i \rVert\, \lVert b_j \rVert}

    The absolute value is taken because an eigenvector's sign is arbitrary. A zero row
    gives a row (or column) of zeros.

    Args:
        a: ``(k_a, dim)`` directions as rows.
        b: ``(k_b, dim)`` directions as rows.

    Returns:
        A ``(k_a, k_b)`` float64 array with entries in ``[0, 1]``.

    Raises:
        ValueError: not 2-D, empty, non-finite, or different ``dim``.

    Example:
        >>> cosine_matrix(np.eye(2), [[1.0, 1.0]]).round(4)
        array([[0.7071],
               [0.7071]])
    """
    a, b = _pair(a, b)
    return np.clip(np.abs(_unit_rows(a) @ _unit_rows(b).T), 0.0, 1.0)


@dataclass(frozen=True)
class Assignment:
    """An optimal one-to-one matching of rows to columns of a cosine matrix.

    Attributes:
        rows: ``(m,)`` row indices, ``m = min(k_a, k_b)``, in increasing order.
        cols: ``(m,)`` the column matched to each row.
        cosines: ``(m,)`` the matched cosines ``M[rows, cols]``.
        mean_cosine: Their mean, the quantity maximised.
    """

    rows: np.ndarray
    cols: np.ndarray
    cosines: np.ndarray
    mean_cosine: float


def best_assignment(cosines: Any) -> Assignment:
    r"""The one-to-one assignment of rows to columns with the largest mean cosine.

    Solves the linear assignment problem

    .. math::
        \max_{\pi} \frac{1}{m} \sum_{i} M_{i, \pi(i)}

    over injective maps :math:`\pi` between rows and columns (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``). For the class gradients against the
    top-``C`` eigenvectors this is the "cosine-maximised linear assignment" of Appendix C.

    Args:
        cosines: A ``(k_a, k_b)`` matrix, typically from :func:`cosine_matrix`.

    Returns:
        An :class:`Assignment`.

    Raises:
        ValueError: not a non-empty finite 2-D matrix.

    Example:
        >>> best_assignment([[0.1, 0.9], [0.8, 0.2]]).cols
        array([1, 0])
    """
    matrix = np.asarray(cosines, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0 or not np.all(np.isfinite(matrix)):
        raise ValueError(
            f"`cosines` must be a non-empty finite 2-D matrix; got shape {np.shape(cosines)}."
        )
    rows, cols = scipy.optimize.linear_sum_assignment(matrix, maximize=True)
    matched = matrix[rows, cols]
    return Assignment(rows=rows, cols=cols, cosines=matched, mean_cosine=float(matched.mean()))


def principal_angles(a: Any, b: Any) -> np.ndarray:
    r"""Principal angles between the subspaces spanned by the rows of ``a`` and of ``b``.

    With orthonormal bases :math:`Q_a, Q_b` of the two spans, the cosines of the
    principal angles are the singular values of :math:`Q_a^\top Q_b`,

    .. math::
        \cos \phi_i = \sigma_i(Q_a^\top Q_b), \qquad i = 1, \dots, \min(r_a, r_b),

    with :math:`r` the ranks. Small angles are computed from sines (as in
    ``scipy.linalg.subspace_angles``), which keeps them accurate where
    :math:`\arccos` of a cosine near 1 would not be.

    Args:
        a: ``(k_a, dim)`` directions as rows.
        b: ``(k_b, dim)`` directions as rows.

    Returns:
        ``(min(r_a, r_b),)`` angles in radians, ascending, in ``[0, pi/2]``.

    Raises:
        ValueError: bad shapes, or a set whose rows are all zero.

    Example:
        >>> np.degrees(principal_angles([[1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]])).round(6)
        array([45.])
    """
    a, b = _pair(a, b)
    a, b = _nonzero_rows(a, "a"), _nonzero_rows(b, "b")
    # subspace_angles orthonormalises columns (dropping rank-deficient directions).
    return np.sort(scipy.linalg.subspace_angles(a.T, b.T))


def subspace_overlap(a: Any, b: Any) -> float:
    r"""Mean squared cosine of the principal angles: 1 for equal spans, 0 for orthogonal ones.

    .. math::
        \operatorname{overlap}(A, B) = \frac{1}{m} \sum_{i=1}^{m} \cos^2 \phi_i
        = \frac{\lVert Q_a^\top Q_b \rVert_F^2}{m}, \qquad m = \min(r_a, r_b).

    For two ``C``-dimensional subspaces this is :math:`\lVert Q_a^\top Q_b\rVert_F^2 / C`,
    the fraction of one subspace's (average) squared length that lies in the other.

    Args:
        a: ``(k_a, dim)`` directions as rows.
        b: ``(k_b, dim)`` directions as rows.

    Returns:
        A float in ``[0, 1]``.

    Example:
        >>> subspace_overlap([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        0.5
    """
    angles = principal_angles(a, b)
    return float(np.mean(np.cos(angles) ** 2))


def combined_rank(a: Any, b: Any, cos_tol: float = DEFAULT_RANK_COS_TOL) -> int:
    r"""Numerical rank of the combined directions ``[a_1, ..., a_k, b_1, ..., b_k]`` (eq. 18).

    Two directions count as one when the angle between them is small: with :math:`r_a,
    r_b` the numerical ranks of each set (as ``scipy.linalg.orth`` counts them) and
    :math:`\phi_i` the principal angles between the two spans (:func:`principal_angles`),

    .. math::
        \operatorname{rank} = r_a + r_b - \#\{ i : \cos \phi_i \ge 	ext{cos\_tol} \}.

    It is the rank of :math:`[Q_a, Q_b]` (orthonormal bases of each span) counted with
    the singular-value threshold :math:`\sqrt{1 - 	ext{cos\_tol}}`: the singular values
    of :math:`[Q_a, Q_b]` are :math:`\sqrt{1 \pm \cos\phi_i}` (and ones). For two sets of
    ``C`` independent directions it falls from ``2C`` (spans that meet only at zero)
    towards ``C`` (equal spans) as the spans come together, as Appendix C reads it. The
    default ``cos_tol = 0.9`` merges directions less than
    :math:`rccos 0.9 pprox 25.8^\circ` apart. A tolerance is necessary: the exact
    rank of ``2C`` vectors that are not exactly dependent is always ``2C``, and
    iterative eigenvectors are themselves only accurate to the solver's tolerance.

    Args:
        a: ``(k_a, dim)`` directions as rows.
        b: ``(k_b, dim)`` directions as rows.
        cos_tol: Cosine above which a principal angle counts as shared, in ``(0, 1)``.

    Returns:
        The rank, an int in ``[max(r_a, r_b), r_a + r_b]``.

    Raises:
        ValueError: bad shapes, all-zero inputs, or ``cos_tol`` outside ``(0, 1)``.

    Example:
        >>> combined_rank(np.eye(3)[:2], np.eye(3)[1:])
        3
        >>> tilted = [[1.0, 0.2, 0.0]]                   # 11.3 degrees from e_1
        >>> combined_rank([[1.0, 0.0, 0.0]], tilted), combined_rank([[1.0, 0, 0]], tilted, 0.99)
        (1, 2)
    """
    cos_tol = number(cos_tol, "cos_tol", low=0.0, high=1.0, low_open=True, high_open=True)
    a, b = _pair(a, b)
    a, b = _nonzero_rows(a, "a"), _nonzero_rows(b, "b")
    # The ranks scipy.linalg.orth sees, as principal_angles does (subspace_angles uses it).
    ranks = [scipy.linalg.orth(m.T).shape[1] for m in (a, b)]
    cosines = np.cos(principal_angles(a, b))
    return int(sum(ranks) - np.sum(cosines >= cos_tol))


def gradient_fraction(gradient: Any, directions: Any) -> float:
    r"""Fraction of the squared norm of ``gradient`` that lies in the span of ``directions``.

    .. math::
        \frac{\lVert Q^\top g \rVert^2}{\lVert g \rVert^2}

    with :math:`Q` an orthonormal basis of the span of the rows (for orthonormal
    eigenvectors :math:`E`, simply :math:`\lVert E^\top g\rVert^2 / \lVert g\rVert^2`).

    Args:
        gradient: ``(dim,)`` vector.
        directions: ``(k, dim)`` directions as rows.

    Returns:
        A float in ``[0, 1]``; NaN for a zero gradient (no direction to measure).

    Raises:
        ValueError: bad shapes or non-finite values.

    Example:
        >>> gradient_fraction([3.0, 4.0, 0.0], [[1.0, 0.0, 0.0]])
        0.36
    """
    g = np.asarray(gradient, dtype=np.float64)
    if g.ndim != 1 or not np.all(np.isfinite(g)):
        raise ValueError(
            f"`gradient` must be a finite (dim,) vector; got shape {np.shape(gradient)}."
        )
    directions = _rows(directions, "directions")
    if directions.shape[1] != g.shape[0]:
        raise ValueError(
            f"`gradient` has dim {g.shape[0]} but `directions` have dim {directions.shape[1]}."
        )
    norm2 = float(g @ g)
    if norm2 == 0.0:
        return float("nan")
    basis = scipy.linalg.orth(_nonzero_rows(directions, "directions").T)
    projected = basis.T @ g
    return float(min(1.0, (projected @ projected) / norm2))
