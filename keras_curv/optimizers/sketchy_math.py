"""The math of ``SketchySGD`` as pure functions of tensors (flat layout, columns = vectors).

The preconditioner is ``P = Û Λ̂ Ûᵀ + ρ I`` from a rank-r randomized Nyström
approximation ``Û Λ̂ Ûᵀ`` of the curvature (:func:`~keras_curv.curvature.nystrom_factors`),
``Û`` of shape ``(dim, r)`` with orthonormal columns. Every product with a power of
``P`` goes through the Woodbury identity in ``O(dim · r)``:

```
P^a v = Û ((Λ̂ + ρ)^a − ρ^a) Ûᵀ v + ρ^a v
```

(``a = −1`` for the step, ``a = −1/2`` for the automatic step size). ``docs/sketchy_sgd.md``
explains the choices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.numerics import exact_cast

# ρ never falls below this fraction of the largest sketched eigenvalue: a sketch whose
# (r+1)-th eigenvalue is 0 (curvature of rank ≤ r) must not divide by zero.
RHO_FLOOR = 1e-6


def split_spectrum(
    eigenvalues: tf.Tensor, eigenvectors: tf.Tensor, rank: int, rho: float | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The kept rank-r factor and the shift ``ρ``.

    ```
    ρ = λ̂_{r+1}  (the largest sketched eigenvalue not kept)   if rho is None
    ρ = rho                                                    otherwise
    ```

    floored at ``RHO_FLOOR · λ̂_1`` (and the dtype's tiniest normal number).

    Args:
        eigenvalues: ``(s,)`` descending, ``s > rank`` when ``rho`` is ``None``.
        eigenvectors: ``(dim, s)``.
        rank: ``r``.
        rho: A fixed shift, or ``None`` for the sketch's own.

    Returns:
        ``(eigenvalues[:r], eigenvectors[:, :r], ρ)``.
    """
    dtype = eigenvalues.dtype
    shift = eigenvalues[rank] if rho is None else exact_cast(rho, dtype)
    floor = exact_cast(RHO_FLOOR, dtype) * eigenvalues[0]
    shift = tf.maximum(tf.maximum(shift, floor), exact_cast(_tiny(dtype), dtype))
    return eigenvalues[:rank], eigenvectors[:, :rank], shift


def _tiny(dtype: tf.DType) -> float:
    return float(np.finfo(dtype.as_numpy_dtype).tiny)


def shifted_power(
    eigenvectors: tf.Tensor, eigenvalues: tf.Tensor, rho: Any, vector: tf.Tensor, power: float
) -> tf.Tensor:
    """``(Û Λ̂ Ûᵀ + ρ I)^power v`` by Woodbury, for a flat ``v`` of shape ``(dim,)``."""
    dtype = vector.dtype
    power = exact_cast(power, dtype)
    projection = tf.linalg.matvec(eigenvectors, vector, transpose_a=True)
    weights = tf.pow(eigenvalues + rho, power) - tf.pow(rho, power)
    return tf.linalg.matvec(eigenvectors, weights * projection) + tf.pow(rho, power) * vector


def inverse_weights(eigenvalues: tf.Tensor, rho: Any) -> tf.Tensor:
    """``1/(λ̂ + ρ) − 1/ρ``: ``P⁻¹ v = v/ρ + Û (w ⊙ Ûᵀ v)`` with these ``w``."""
    return 1 / (eigenvalues + rho) - 1 / rho


def sketchy_direction(
    gradient: tf.Tensor, eigenvector_rows: tf.Tensor, coefficients: tf.Tensor, rho: Any
) -> tf.Tensor:
    """One variable's slice of ``d = P⁻¹ g = g/ρ + Û (w ⊙ Ûᵀ g)``.

    Args:
        gradient: ``g`` for this variable, shape ``S``.
        eigenvector_rows: This variable's rows of ``Ûᵀ``, shape ``(r, *S)``.
        coefficients: ``w ⊙ Ûᵀ g`` over *all* variables, shape ``(r,)``.
        rho: ``ρ``.

    Returns:
        ``d`` for this variable, shape ``S``.
    """
    return gradient / rho + tf.tensordot(coefficients, eigenvector_rows, axes=1)


def power_iteration_step(
    eigenvectors: tf.Tensor, eigenvalues: tf.Tensor, rho: Any, vector: tf.Tensor, product: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """One power step on ``A = P^{-1/2} H P^{-1/2}`` from a unit ``v``.

    ```
    w = P^{-1/2} (H t),  t = P^{-1/2} v;     λ = vᵀ w (≤ λ_max),   v ← w / ‖w‖
    ```

    Args:
        eigenvectors: ``Û``, ``(dim, r)``.
        eigenvalues: ``Λ̂``, ``(r,)``.
        rho: ``ρ``.
        vector: ``v``, unit norm.
        product: ``H t`` for the tangent ``t = shifted_power(..., v, -0.5)``.

    Returns:
        ``(λ, v)``: the Rayleigh quotient and the next unit vector.
    """
    image = shifted_power(eigenvectors, eigenvalues, rho, product, -0.5)
    estimate = tf.tensordot(vector, image, 1)
    return estimate, unit(image)


def unit(vector: tf.Tensor) -> tf.Tensor:
    """``v / ‖v‖`` (zero stays zero)."""
    tiny = exact_cast(_tiny(vector.dtype), vector.dtype)
    return vector / tf.maximum(tf.norm(vector), tiny)
