r"""Structured curvature operators with closed-form powers: the shapes preconditioners take.

* :class:`IdentityOperator` :math:`cI`;
* :class:`DiagonalOperator` :math:`\operatorname{diag}(d)` (Adam, RMSprop, AdaHessian,
  Sophia);
* :class:`KroneckerOperator` :math:`A_1 \otimes \dots \otimes A_r` on one tensor's
  row-major flat layout (K-FAC's factors, Shampoo's roots);
* :class:`LowRankPlusDiagonal` :math:`D + U M U^\top` (ClassSubspaceNewton's class
  subspace, a Nyström sketch);
* :class:`BlockDiagonalOperator`: one operator per consecutive slice of the flat
  parameter vector (one per variable or layer);
* :class:`PermutedOperator` :math:`\Pi^\top A \Pi`: an operator on the entries of the
  flat vector taken in another order (Shampoo's blocks cut along a matrix's columns).

Each has :meth:`~keras_curv.curvature.LinearOperator.power`, so that
:math:`P^{-1/2}` of a preconditioner :math:`P` is ``P.power(-0.5)``. Fractional and
negative powers need a positive definite operator and raise ``ValueError`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv.curvature.operators import LinearOperator


def _float_tensor(value: Any, name: str) -> tf.Tensor:
    tensor = tf.convert_to_tensor(value)
    if not tensor.dtype.is_floating:
        tensor = tf.cast(tensor, tf.float64)
    if not bool(tf.reduce_all(tf.math.is_finite(tensor))):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return tensor


def _check_power(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
        raise TypeError(f"A power must be a number; got {p!r}.")
    if not np.isfinite(p):
        raise ValueError(f"A power must be finite; got {p}.")
    return float(p)


def _power_of_values(values: tf.Tensor, p: float, what: str) -> tf.Tensor:
    """``values ** p`` for the eigenvalues of a PSD operator, refusing what is undefined."""
    minimum = float(tf.reduce_min(values))
    if p != int(p) and minimum < 0:
        raise ValueError(
            f"{what} has a negative eigenvalue ({minimum:.3g}): its power {p:g} is not real. "
            "Only positive semi-definite operators have fractional powers."
        )
    if p < 0 and minimum <= 0:
        raise ValueError(
            f"{what} is singular (smallest eigenvalue {minimum:.3g}): its power {p:g} does "
            "not exist. Add damping, e.g. `A + 1e-8 * IdentityOperator(A.dim)`."
        )
    return tf.pow(values, tf.constant(p, values.dtype))


def _sym_power(matrix: tf.Tensor, p: float, what: str) -> tf.Tensor:
    values, vectors = tf.linalg.eigh(0.5 * (matrix + tf.transpose(matrix)))
    scaled = vectors * _power_of_values(values, p, what)[None, :]
    return tf.matmul(scaled, vectors, transpose_b=True)


class IdentityOperator(LinearOperator):
    """``c I``: the identity scaled by ``c`` (plain SGD's preconditioner, damping).

    Args:
        dim: The dimension.
        scale: ``c``.
        dtype: The dtype of products.
    """

    def __init__(self, dim: int, scale: float = 1.0, dtype: Any = tf.float32):
        super().__init__(dim, dtype)
        self.scale = float(scale)

    def _matvec(self, v):
        return tf.constant(self.scale, self.dtype) * v

    def _matmat(self, block):
        return tf.constant(self.scale, self.dtype) * block

    def power(self, p: float) -> LinearOperator:
        p = _check_power(p)
        value = _power_of_values(tf.constant([self.scale], tf.float64), p, "This identity")
        return IdentityOperator(self.dim, float(value[0]), self.dtype)


class DiagonalOperator(LinearOperator):
    """``diag(d)`` for a flat vector ``d``.

    Args:
        diagonal: ``(dim,)`` entries.

    Example:
        >>> P = DiagonalOperator([4.0, 1.0])
        >>> P.power(-0.5).matvec([1.0, 1.0]).numpy()
        array([0.5, 1. ], dtype=float32)
    """

    def __init__(self, diagonal: Any):
        diagonal = _float_tensor(diagonal, "diagonal")
        if diagonal.shape.rank != 1:
            raise ValueError(f"`diagonal` must be a vector; got shape {tuple(diagonal.shape)}.")
        super().__init__(int(diagonal.shape[0]), diagonal.dtype)
        self.diagonal = diagonal

    def _matvec(self, v):
        return self.diagonal * v

    def _matmat(self, block):
        return self.diagonal[:, None] * block

    def to_dense(self) -> np.ndarray:
        return np.diag(self.diagonal.numpy())

    def power(self, p: float) -> LinearOperator:
        return DiagonalOperator(_power_of_values(self.diagonal, _check_power(p), "This diagonal"))

    def top_eigenpairs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` largest entries and their coordinate vectors ``(dim, k)``, no product."""
        values = self.diagonal.numpy().astype(np.float64)
        order = np.argsort(-values, kind="stable")[:k]
        vectors = np.zeros((self.dim, len(order)))
        vectors[order, np.arange(len(order))] = 1.0
        return values[order], vectors


class KroneckerOperator(LinearOperator):
    r"""``A_1 ⊗ ... ⊗ A_r`` on the row-major flat layout of an ``(n_1, ..., n_r)`` tensor.

    For a ``(n_in, n_out)`` Dense kernel ``W`` flattened row-major (the layout of
    :mod:`keras_curv._internal.flat`), ``(A ⊗ G) vec(W) = vec(A W G)`` for symmetric
    ``A`` (``n_in x n_in``) and ``G`` (``n_out x n_out``): K-FAC's input and output
    factors, or Shampoo's ``L`` and ``R``. A kernel and its bias stacked as the rows of
    an ``(n_in + 1, n_out)`` matrix have exactly the flat layout of the two variables
    one after the other.

    Args:
        factors: Square symmetric matrices ``A_i`` of sizes ``n_i``.

    Example:
        >>> K = KroneckerOperator([np.diag([1.0, 4.0]), np.diag([9.0, 1.0, 1.0])])
        >>> K.dim
        6
    """

    def __init__(self, factors: Sequence[Any]):
        factors = [_float_tensor(f, "factors") for f in factors]
        if not factors:
            raise ValueError("A Kronecker product needs at least one factor.")
        for f in factors:
            if f.shape.rank != 2 or f.shape[0] != f.shape[1]:
                raise ValueError(f"Kronecker factors must be square; got shape {tuple(f.shape)}.")
        dtype = max((f.dtype for f in factors), key=lambda d: d.size)
        self.factors = [tf.cast(f, dtype) for f in factors]
        self.sizes = [int(f.shape[0]) for f in factors]
        super().__init__(int(np.prod(self.sizes)), dtype)

    def _matmat(self, block):
        k = tf.shape(block)[1]
        x = tf.reshape(tf.transpose(block), tf.concat([[k], self.sizes], 0))
        # Contracting axis 1 each time: axis 1 is always the next factor's, and the
        # processed axes rotate to the end in order.
        for factor in self.factors:
            x = tf.tensordot(x, factor, axes=[[1], [1]])
        return tf.transpose(tf.reshape(x, [k, self.dim]))

    def _matvec(self, v):
        return self._matmat(v[:, None])[:, 0]

    def to_dense(self) -> np.ndarray:
        dense = np.ones((1, 1))
        for factor in self.factors:
            dense = np.kron(dense, factor.numpy())
        return dense

    def power(self, p: float) -> LinearOperator:
        p = _check_power(p)
        return KroneckerOperator([_sym_power(f, p, "A Kronecker factor") for f in self.factors])


class LowRankPlusDiagonal(LinearOperator):
    r"""``D + U M U^T``: a diagonal (or scaled identity) plus a symmetric low-rank term.

    Args:
        basis: ``U``, ``(dim, r)`` (columns need not be orthonormal).
        core: ``M``: ``(r,)`` (a diagonal) or a symmetric ``(r, r)`` matrix.
        diagonal: ``D``: a number ``c`` (``c I``) or a ``(dim,)`` vector.

    :meth:`power` needs ``D = c I``: with :math:`U = QR` and
    :math:`R M R^\top = W \Theta W^\top`, :math:`A = c I + \tilde U \Theta \tilde U^\top`
    with orthonormal :math:`\tilde U = Q W`, so
    :math:`A^p = c^p I + \tilde U ((c + \Theta)^p - c^p) \tilde U^\top`.

    Example:
        >>> v = np.eye(3)[:, :1]
        >>> A = LowRankPlusDiagonal(v, [3.0], 1.0)     # I + 3 v v^T
        >>> A.power(-1).matvec([1.0, 1.0, 1.0]).numpy()
        array([0.25, 1.  , 1.  ])
    """

    def __init__(self, basis: Any, core: Any, diagonal: Any = 0.0):
        basis = _float_tensor(basis, "basis")
        if basis.shape.rank != 2:
            raise ValueError(f"`basis` must be (dim, r); got shape {tuple(basis.shape)}.")
        dim, rank = int(basis.shape[0]), int(basis.shape[1])
        core = tf.cast(_float_tensor(core, "core"), basis.dtype)
        if core.shape.rank == 1:
            core = tf.linalg.diag(core)
        if tuple(core.shape) != (rank, rank):
            raise ValueError(
                f"`core` must be ({rank},) or ({rank}, {rank}) for a basis of rank {rank}; "
                f"got shape {tuple(core.shape)}."
            )
        diagonal = tf.cast(_float_tensor(diagonal, "diagonal"), basis.dtype)
        if diagonal.shape.rank not in (0, 1) or (
            diagonal.shape.rank == 1 and diagonal.shape[0] != dim
        ):
            raise ValueError(f"`diagonal` must be a number or a ({dim},) vector.")
        super().__init__(dim, basis.dtype)
        self.basis = basis
        self.core = 0.5 * (core + tf.transpose(core))
        self.diagonal = diagonal

    def _matvec(self, v):
        coefficients = tf.linalg.matvec(
            self.core, tf.linalg.matvec(self.basis, v, transpose_a=True)
        )
        return self.diagonal * v + tf.linalg.matvec(self.basis, coefficients)

    def _matmat(self, block):
        diagonal = self.diagonal if self.diagonal.shape.rank == 0 else self.diagonal[:, None]
        coefficients = tf.matmul(self.core, tf.matmul(self.basis, block, transpose_a=True))
        return diagonal * block + tf.matmul(self.basis, coefficients)

    def eigendecomposition(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(Θ, Ũ)``: the low-rank term as ``Ũ diag(Θ) Ũᵀ`` with orthonormal columns ``Ũ``."""
        q, r = tf.linalg.qr(self.basis)
        values, vectors = tf.linalg.eigh(tf.matmul(tf.matmul(r, self.core), r, transpose_b=True))
        return values, tf.matmul(q, vectors)

    def top_eigenpairs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``min(k, r)`` eigenpairs of the low-rank part plus ``c`` (scalar diagonal).

        Raises:
            ValueError: a vector diagonal (no closed form).
        """
        if self.diagonal.shape.rank != 0:
            raise ValueError("top_eigenpairs needs a scalar diagonal (c I + U M U^T).")
        values, basis = self.eigendecomposition()
        order = np.argsort(-values.numpy(), kind="stable")[:k]
        shifted = values.numpy()[order] + float(self.diagonal)
        return shifted.astype(np.float64), tf.gather(basis, order, axis=1).numpy()

    def power(self, p: float) -> LinearOperator:
        p = _check_power(p)
        if self.diagonal.shape.rank != 0:
            raise ValueError(
                "LowRankPlusDiagonal has a closed-form power only for a scalar diagonal "
                "(c I + U M U^T); this one has a vector diagonal."
            )
        c = self.diagonal
        values, basis = self.eigendecomposition()
        full = _power_of_values(c + values, p, "This operator")
        if float(c) == 0.0:
            # Only the low-rank part: its complement has eigenvalue 0, and 0^p = 0 (p > 0).
            if p <= 0:
                raise ValueError(
                    f"A pure low-rank operator is singular: its power {p:g} does not exist. "
                    "Add a diagonal (damping)."
                )
            return LowRankPlusDiagonal(basis, full, 0.0)
        rest = _power_of_values(tf.reshape(c, [1]), p, "This operator")[0]
        return LowRankPlusDiagonal(basis, full - rest, rest)


class BlockDiagonalOperator(LinearOperator):
    """One operator per consecutive slice of the flat vector: ``diag(A_1, ..., A_n)``.

    Args:
        blocks: The operators; their dimensions add up to ``dim`` (e.g. one per
            trainable variable, or one per layer, in the flat layout's order).
    """

    def __init__(self, blocks: Sequence[LinearOperator]):
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, LinearOperator) for b in blocks):
            raise ValueError("`blocks` must be a non-empty list of LinearOperators.")
        dtype = max((b.dtype for b in blocks), key=lambda d: d.size)
        super().__init__(sum(b.dim for b in blocks), dtype)
        self.blocks = blocks
        self.sizes = [b.dim for b in blocks]
        self.symmetric = all(b.symmetric for b in blocks)

    def _each(self, x):
        parts = tf.split(x, self.sizes, axis=0)
        outputs = [
            tf.cast(b.matvec(part) if x.shape.rank == 1 else b.matmat(part), self.dtype)
            for b, part in zip(self.blocks, parts)
        ]
        return tf.concat(outputs, axis=0)

    def _matvec(self, v):
        return self._each(v)

    def _matmat(self, block):
        return self._each(block)

    def power(self, p: float) -> LinearOperator:
        return BlockDiagonalOperator([b.power(p) for b in self.blocks])


class PermutedOperator(LinearOperator):
    r"""``Πᵀ A Π`` with ``(Π v)_i = v[permutation[i]]``: ``A`` on the reordered entries.

    A block-diagonal operator over blocks that are not consecutive in the flat layout
    (the column blocks of a row-major matrix) is
    ``PermutedOperator(BlockDiagonalOperator(blocks), order)``, ``order`` the flat
    indices of the first block's entries, then the second's... Its powers are
    ``Πᵀ A^p Π``.

    Args:
        operator: ``A``.
        permutation: A permutation of ``range(A.dim)``.

    Example:
        >>> P = PermutedOperator(DiagonalOperator([1.0, 2.0, 3.0]), [2, 0, 1])
        >>> np.diag(P.to_dense())
        array([2., 3., 1.], dtype=float32)
    """

    def __init__(self, operator: LinearOperator, permutation: Any):
        if not isinstance(operator, LinearOperator):
            raise ValueError(f"`operator` must be a LinearOperator; got {type(operator).__name__}.")
        order = np.asarray(permutation)
        if order.shape != (operator.dim,) or not np.array_equal(
            np.sort(order), np.arange(operator.dim)
        ):
            raise ValueError(
                f"`permutation` must be a permutation of range({operator.dim}); got shape "
                f"{order.shape} with entries {order[:8].tolist()}..."
            )
        super().__init__(operator.dim, operator.dtype)
        self.operator = operator
        self.permutation = order.astype(np.int64)
        self.symmetric = operator.symmetric
        self._inverse = np.argsort(self.permutation).astype(np.int64)

    def _matmat(self, block):
        inner = self.operator.matmat(tf.gather(block, self.permutation, axis=0))
        return tf.gather(tf.cast(inner, self.dtype), self._inverse, axis=0)

    def _matvec(self, v):
        return self._matmat(v[:, None])[:, 0]

    def power(self, p: float) -> LinearOperator:
        return PermutedOperator(self.operator.power(p), self.permutation)
