"""The math of K-FAC (Martens & Grosse 2015; KFC, Grosse & Martens 2016) as pure functions.

A Kronecker block approximates the Fisher block of a layer's weights ``W`` (``P x O``,
the bias as the last row when the inputs carry a homogeneous coordinate) by

```
F_W ≈ A ⊗ G,   A = (1/R) Σ_r a_r a_rᵀ,   G = (1/N) Σ_r g_r g_rᵀ
```

with ``a_r`` the layer's input rows (convolution patches for ``Conv*``), ``g_r`` the
per-sample gradients of the Fisher loss with respect to the layer's pre-activation
outputs, ``R`` the number of rows and ``N`` the number of samples (so that positions of a
convolution, tokens of a sequence and calls of a shared layer add up as in KFC).
A factor is either a full matrix or, when it is too large or diagonal by nature
(``Embedding``'s one-hot inputs), its diagonal. Factors may carry leading batch axes
(``DepthwiseConv``: one block per channel). A convolution's ``Σ a aᵀ`` may be estimated
from a random sample of each example's patches (:func:`patch_sample`, :func:`patches_at`)
instead of all of them.

``docs/kfac.md`` derives every function here.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from keras_curv._internal.numerics import exact_cast

# A factor in its eigenbasis: ``(Q, λ)`` for a full factor, ``(None, d)`` for a diagonal one.
Eigen = tuple[Any, tf.Tensor]


# ----------------------------------------------------------------- statistics


def rows(tensor: tf.Tensor) -> tf.Tensor:
    """``tensor`` as a matrix of rows over its last axis: ``(R, features)``."""
    return tf.reshape(tensor, [-1, tensor.shape[-1]])


def second_moment(
    matrix: tf.Tensor,
    diagonal: bool,
    weights: tf.Tensor | float | None = None,
    homogeneous: bool = False,
) -> tf.Tensor:
    """``Σ_r w_r x_r x_rᵀ`` of ``(..., R, P)`` rows (``(..., P, P)``), or its diagonal ``(..., P)``.

    Args:
        matrix: The rows ``x_r``.
        diagonal: Only the diagonal.
        weights: ``w_r``: a patch sample's (:func:`patch_sample`), shape ``(R,)``, or one
            float for every row; default 1.
        homogeneous: Of the rows ``[x_r, 1]`` (the bias's input), ``P + 1`` wide,
            without building them: the last row and column are ``Σ w x`` and ``Σ w``.
    """
    per_row = weights is not None and not isinstance(weights, float)
    weighted = matrix * weights[:, None] if per_row else matrix
    if diagonal:
        moment = tf.reduce_sum(weighted * matrix, axis=-2)
    else:
        moment = tf.matmul(weighted, matrix, transpose_a=True)
    scale = weights if isinstance(weights, float) else 1.0
    if not homogeneous:
        return moment if scale == 1.0 else scale * moment
    column = tf.reduce_sum(weighted, axis=-2)
    if per_row:
        total = tf.reduce_sum(weights)
    else:
        total = tf.cast(tf.shape(matrix)[-2], matrix.dtype)
    total = tf.ones_like(column[..., :1]) * total
    if diagonal:
        return scale * tf.concat([moment, total], axis=-1)
    top = tf.concat([moment, column[..., :, None]], axis=-1)
    bottom = tf.concat([column, total], axis=-1)[..., None, :]
    return scale * tf.concat([top, bottom], axis=-2)


def _as_2d(inputs: tf.Tensor, kernel_size, strides, dilation, padding):
    """A 1-D convolution's input and geometry as a 2-D one of height 1 (causal: left padding)."""
    if inputs.shape.rank != 3:
        return inputs, tuple(kernel_size), tuple(strides), tuple(dilation), padding
    if padding == "causal":
        left = dilation[0] * (kernel_size[0] - 1)
        inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    return inputs[:, None], (1, *kernel_size), (1, *strides), (1, *dilation), padding


def conv_patches(
    inputs: tf.Tensor,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: str,
) -> tf.Tensor:
    """The im2col patches of a channels-last 1-D or 2-D convolution input.

    Args:
        inputs: ``(N, L, C)`` or ``(N, H, W, C)``.
        kernel_size, strides, dilation: Per spatial axis.
        padding: ``"valid"``, ``"same"`` or (1-D only) ``"causal"``.

    Returns:
        ``(N, positions..., k·C)``, each patch flattened in the kernel's ``(kh, kw, C)``
        order, so that ``patches @ kernel.reshape(-1, out)`` is the convolution.
    """
    inputs, kernel_size, strides, dilation, padding = _as_2d(
        inputs, kernel_size, strides, dilation, padding
    )
    return tf.image.extract_patches(
        inputs,
        sizes=[1, *kernel_size, 1],
        strides=[1, *strides, 1],
        rates=[1, *dilation, 1],
        padding=padding.upper(),
    )


def _axis_geometry(size: Any, kernel: int, stride: int, dilation: int, padding: str):
    """``(outputs, padding before, padding after)`` of one spatial axis, TensorFlow's rule.

    ``size`` is an int or a scalar tensor (a dynamic spatial size); so are the results.
    """
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - span) // stride + 1, 0, 0
    outputs = -(-size // stride)
    total = (outputs - 1) * stride + span - size
    total = max(total, 0) if isinstance(total, int) else tf.maximum(total, 0)
    return outputs, total // 2, total - total // 2


def _geometry(inputs: tf.Tensor, kernel_size, strides, dilation, padding) -> list[tuple]:
    """:func:`_axis_geometry` of each spatial axis of a 2-D ``inputs``."""
    dynamic = tf.shape(inputs)
    sizes = [inputs.shape[a] if inputs.shape[a] is not None else dynamic[a] for a in (1, 2)]
    return [
        _axis_geometry(size, k, s, d, padding)
        for size, k, s, d in zip(sizes, kernel_size, strides, dilation)
    ]


def conv_positions(
    inputs: tf.Tensor,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: str,
) -> Any:
    """The number of output positions per example (patches per example) of a convolution.

    An ``int`` when the input's spatial shape is static, else a scalar ``int32`` tensor.
    """
    inputs, kernel_size, strides, dilation, padding = _as_2d(
        inputs, kernel_size, strides, dilation, padding
    )
    (height, _, _), (width, _, _) = _geometry(inputs, kernel_size, strides, dilation, padding)
    return height * width


def patch_sample(uniforms: tf.Tensor, positions: Any) -> tuple[tf.Tensor, Any]:
    """``(indices, weights)``: ``q`` of each example's ``positions`` positions, drawn uniformly.

    Each index is ``⌊u · positions⌋`` for a uniform ``u`` (with replacement) and stands
    for ``positions / q`` positions, so that for any per-position statistic ``x``,
    ``E[Σ_j w_j x_{n,i_j}] = Σ_p x_{n,p}``: weighted sums over the sample are unbiased
    estimates of the sums over every position (KFC's ``Σ a aᵀ``), and the weights add up
    to the number of positions. When ``positions ≤ q`` (possible for a dynamic
    spatial size) the indices are every position once instead, padded with weight-0
    copies of the last: the exact sums.

    Args:
        uniforms: ``(N, q)`` uniforms in ``(0, 1)``.
        positions: The positions per example (:func:`conv_positions`), an int or a tensor.

    Returns:
        ``indices`` ``(N, q)`` ``int32`` and ``weights``: the float ``positions / q`` for a
        static ``positions > q``, else float64 ``(N, q)``.
    """
    q = uniforms.shape[-1]
    if isinstance(positions, int) and positions > q:
        drawn = tf.floor(tf.cast(uniforms, tf.float64) * positions)
        return tf.cast(drawn, tf.int32), positions / q
    total = tf.cast(positions, tf.int32)
    every = tf.broadcast_to(tf.range(q), tf.shape(uniforms))
    scale = tf.cast(total, tf.float64)
    drawn = tf.cast(tf.floor(tf.cast(uniforms, tf.float64) * scale), tf.int32)
    fits = total <= q
    indices = tf.where(fits, tf.minimum(every, total - 1), drawn)
    exact = tf.cast(every < total, tf.float64)
    weights = tf.where(fits, exact, tf.broadcast_to(scale / q, tf.shape(uniforms)))
    return indices, weights


def patches_at(
    inputs: tf.Tensor,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: str,
    indices: tf.Tensor,
) -> tf.Tensor:
    """The patches of :func:`conv_patches` at some output positions of each example.

    Gathers the ``k`` input pixels of each requested patch, without extracting the others.

    Args:
        inputs, kernel_size, strides, dilation, padding: As for :func:`conv_patches`.
        indices: ``(N, q)`` output positions, flattened row-major over the output's
            spatial axes.

    Returns:
        ``(N, q, k·C)``: ``conv_patches(...)`` reshaped to ``(N, positions, k·C)`` and
        gathered at ``indices`` along its second axis.
    """
    inputs, kernel_size, strides, dilation, padding = _as_2d(
        inputs, kernel_size, strides, dilation, padding
    )
    (_, top, bottom), (out_width, left, right) = _geometry(
        inputs, kernel_size, strides, dilation, padding
    )
    if padding == "same":
        inputs = tf.pad(inputs, [[0, 0], [top, bottom], [left, right], [0, 0]])
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    shape = tf.shape(inputs)
    rows = (indices // out_width)[..., None] * sh + tf.range(kh) * dh  # (N, q, kh)
    cols = (indices % out_width)[..., None] * sw + tf.range(kw) * dw  # (N, q, kw)
    pixels = rows[..., :, None] * shape[2] + cols[..., None, :]  # (N, q, kh, kw)
    flat = tf.reshape(inputs, [shape[0], -1, inputs.shape[-1]])
    gathered = tf.gather(flat, tf.reshape(pixels, [shape[0], -1]), batch_dims=1)
    return tf.reshape(gathered, [shape[0], -1, kh * kw * inputs.shape[-1]])


def weighted_ema(old: tf.Tensor, new: tf.Tensor, decay: float, count: tf.Tensor) -> tf.Tensor:
    """The bias-corrected moving average after its ``count``-th update (``count`` ≥ 1).

    ```
    w = (1 − ε) / (1 − ε^count),   F ← (1 − w) F + w F_batch
    ```

    equals ``EMA / (1 − ε^count)`` of the raw moving average: the first update takes the
    batch's factor as it is, and ``decay = 0`` keeps only the latest batch.
    """
    dtype = old.dtype
    decay_t = exact_cast(decay, dtype)
    weight = (1 - decay_t) / (1 - tf.pow(decay_t, tf.cast(count, dtype)))
    return (1 - weight) * old + weight * tf.cast(new, dtype)


# ----------------------------------------------------------------- inverses


def eigen(factor: tf.Tensor, diagonal: bool) -> Eigen:
    """``(Q, λ)`` of a symmetric PSD factor (``λ`` clipped at 0); ``(None, d)`` if diagonal."""
    if diagonal:
        return None, tf.maximum(factor, 0)
    values, vectors = tf.linalg.eigh(factor)
    return vectors, tf.maximum(values, 0)


def pi_adjustment(a_values: tf.Tensor, g_values: tf.Tensor) -> tf.Tensor:
    """Martens & Grosse's ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (1 if a trace is 0).

    Args:
        a_values, g_values: Eigenvalues (or diagonals) of the factors, ``(..., dim)``.

    Returns:
        ``π`` per block, shape ``(...)``.
    """
    mean_a = tf.reduce_mean(a_values, axis=-1)
    mean_g = tf.reduce_mean(g_values, axis=-1)
    usable = tf.logical_and(mean_a > 0, mean_g > 0)
    safe = tf.where(usable, mean_a / tf.where(usable, mean_g, 1), 1)
    return tf.sqrt(safe)


def _rotate(v: tf.Tensor, a_basis: Any, g_basis: Any, inverse: bool) -> tf.Tensor:
    """``Qaᵀ v Qg`` (``inverse=False``) or ``Qa v Qgᵀ`` (``inverse=True``); ``None`` is I."""
    if a_basis is not None:
        v = tf.matmul(a_basis, v, transpose_a=not inverse)
    if g_basis is not None:
        v = tf.matmul(v, g_basis, transpose_b=inverse)
    return v


def damped_kronecker_solve(
    v: tf.Tensor, a: Eigen, g: Eigen, damping: tf.Tensor, pi: tf.Tensor
) -> tf.Tensor:
    """``(A + π√λ I)⁻¹ V (G + √λ/π I)⁻¹``: factored Tikhonov damping with the π-adjustment.

    In the factors' eigenbases ``A = Qa Λa Qaᵀ``, ``G = Qg Λg Qgᵀ``:

    ```
    Δ = Qa [ (Qaᵀ V Qg) / ((λa + π√λ)(λg + √λ/π)ᵀ) ] Qgᵀ
    ```

    Args:
        v: ``(..., P, O)``, e.g. the gradient of ``[W; b]``.
        a, g: The factors in their eigenbases (:func:`eigen`).
        damping: ``λ ≥ 0``, a scalar.
        pi: ``π`` per block, shape ``(...)`` (:func:`pi_adjustment`).

    Returns:
        ``Δ``, shaped like ``v``.
    """
    dtype = v.dtype
    root = tf.sqrt(exact_cast(damping, dtype))
    pi = tf.cast(pi, dtype)[..., None]
    a_damped = a[1] + pi * root
    g_damped = g[1] + root / pi
    rotated = _rotate(v, a[0], g[0], inverse=False)
    scaled = rotated / (a_damped[..., :, None] * g_damped[..., None, :])
    return _rotate(scaled, a[0], g[0], inverse=True)


def eigen_kronecker_product(
    v: tf.Tensor, a_basis: Any, a_scale: tf.Tensor, g_basis: Any, g_scale: tf.Tensor
) -> tf.Tensor:
    """``Qa [(Qaᵀ V Qg) ⊙ (sa sgᵀ)] Qgᵀ``: ``(Qa Sa Qaᵀ ⊗ Qg Sg Qgᵀ) vec(V)`` in the eigenbases.

    With ``sa = (λa + π√λ)^p`` and ``sg = (λg + √λ/π)^p`` this is the ``p``-th power of the
    damped block; ``p = −1`` is :func:`damped_kronecker_solve`. A ``None`` basis is ``I``
    (a diagonal factor); leading axes of ``v`` broadcast against the factors'.
    """
    rotated = _rotate(v, a_basis, g_basis, inverse=False)
    scaled = rotated * (a_scale[..., :, None] * g_scale[..., None, :])
    return _rotate(scaled, a_basis, g_basis, inverse=True)


def kronecker_product(v: tf.Tensor, a: tf.Tensor, g: tf.Tensor, a_diagonal: bool, g_diagonal: bool):
    """``(A ⊗ G) vec(V) = vec(A V G)`` for full or diagonal factors (``V`` is ``(..., P, O)``)."""
    left = a[..., :, None] * v if a_diagonal else tf.matmul(a, v)
    return left * g[..., None, :] if g_diagonal else tf.matmul(left, g)


def damped_diagonal_solve(v: tf.Tensor, diagonal: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
    """``v / (d + λ)``: the step of a diagonal block."""
    return v / (tf.cast(diagonal, v.dtype) + exact_cast(damping, v.dtype))


# ----------------------------------------------------------------- the step


def norm_constraint_scale(
    learning_rate: tf.Tensor, curvature_norm: tf.Tensor, max_norm: float | None
) -> tf.Tensor:
    """``ν = min(1, sqrt(c / (η² Δᵀ F̂ Δ)))``: the KL-based rescaling of the step ``η Δ``.

    With ``Δ = F̂⁻¹ g`` for the damped K-FAC curvature ``F̂``, ``Δᵀ F̂ Δ = Δᵀ g``, so
    ``curvature_norm`` is the inner product of the step direction with the gradient.
    ``ν = 1`` when ``max_norm`` is ``None``.
    """
    dtype = curvature_norm.dtype
    if max_norm is None:
        return tf.ones([], dtype)
    lr = tf.cast(learning_rate, dtype)
    quadratic = lr * lr * curvature_norm
    bound = exact_cast(max_norm, dtype)
    return tf.where(quadratic > bound, tf.sqrt(bound / tf.where(quadratic > 0, quadratic, 1)), 1)


def velocity(momentum_buffer: Any, direction: Any, momentum: float) -> Any:
    """Heavy-ball velocity ``m ← μ m + Δ`` (the step is ``−η m``)."""
    buffer = tf.convert_to_tensor(momentum_buffer)
    if momentum == 0:
        return tf.cast(direction, buffer.dtype)
    return exact_cast(momentum, buffer.dtype) * buffer + tf.cast(direction, buffer.dtype)


def quadratic_model_change(
    gradient_dot_step: tf.Tensor,
    step_curvature_step: tf.Tensor,
    step_norm_sq: tf.Tensor,
    damping: tf.Tensor,
) -> tf.Tensor:
    """``M(δ) − M(0) = gᵀδ + ½ δᵀ F̂ δ + ½ λ ‖δ‖²``: the reduction the quadratic model predicts."""
    damping = exact_cast(damping, gradient_dot_step.dtype)
    return gradient_dot_step + 0.5 * step_curvature_step + 0.5 * damping * step_norm_sq


def adapted_damping(
    damping: tf.Tensor,
    ratio: tf.Tensor,
    omega: float,
    minimum: float,
    maximum: float | None,
) -> tf.Tensor:
    """The Levenberg–Marquardt rule: ``λ ← ω λ`` if ``ρ > 3/4``, ``λ / ω`` if ``ρ < 1/4``.

    ``ρ`` is the actual over the predicted reduction of the loss (:func:`reduction_ratio`);
    a NaN ``ρ`` leaves ``λ`` as it is. The result is clipped to ``[minimum, maximum]``.
    """
    dtype = damping.dtype
    omega_t = exact_cast(omega, dtype)
    ratio = tf.cast(ratio, dtype)
    new = tf.where(ratio > 0.75, damping * omega_t, damping)
    new = tf.where(ratio < 0.25, damping / omega_t, new)
    new = tf.maximum(new, exact_cast(minimum, dtype))
    if maximum is not None:
        new = tf.minimum(new, exact_cast(maximum, dtype))
    return new


def reduction_ratio(actual: tf.Tensor, predicted: tf.Tensor) -> tf.Tensor:
    """``ρ = actual / predicted`` for a predicted decrease, else ``−∞``.

    A step that the quadratic model itself predicts to increase the loss (a learning
    rate or momentum too large for it), or whose trial loss is not finite, counts as a
    failure: :func:`adapted_damping` then raises ``λ``.
    """
    dtype = predicted.dtype
    actual = tf.cast(actual, dtype)
    decrease = predicted < 0
    ratio = actual / tf.where(decrease, predicted, -1)
    usable = tf.logical_and(decrease, tf.math.is_finite(actual))
    return tf.where(usable, ratio, tf.constant(-float("inf"), dtype))
