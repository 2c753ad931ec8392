"""The math of the full-batch solvers: pure functions of flat tensors, traceable once.

Every function takes and returns flat vectors (one entry per trainable scalar) and
scalars, and callables for what depends on the problem (``evaluate(t)`` at a trial
step, ``matvec(v)``). They build only TensorFlow control flow (``tf.while_loop``,
``tf.where``), so they run eagerly, inside a ``tf.function`` traced once, and under
XLA. :class:`~keras_curv.LBFGS`, :class:`~keras_curv.NewtonCG`,
:class:`~keras_curv.NysNewtonCG`, :class:`~keras_curv.LevenbergMarquardt` and
:func:`~keras_curv.minimize` are thin shells around them; ``docs/full_batch.md``
explains the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_curv._internal.numerics import exact_cast


def _dot(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(a * b)


def _finite(*values: tf.Tensor) -> tf.Tensor:
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in values]))


def machine_epsilon(dtype: tf.DType) -> float:
    """The spacing of ``dtype`` at 1."""
    return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps)


# ------------------------------------------------------------------------ L-BFGS


def two_loop_direction(
    gradient: tf.Tensor,
    s_memory: tf.Tensor,
    y_memory: tf.Tensor,
    count: tf.Tensor,
    newest: tf.Tensor,
) -> tf.Tensor:
    """The L-BFGS direction ``d = −H g`` by the two-loop recursion (Nocedal & Wright, Alg. 7.4).

    ```
    q ← g;  for i = newest … oldest:  αᵢ = ρᵢ sᵢᵀq,  q ← q − αᵢ yᵢ        (ρᵢ = 1 / yᵢᵀsᵢ)
    r ← γ q,  γ = sᵀy / yᵀy of the newest pair (γ = 1 without pairs)
    for i = oldest … newest:  βᵢ = ρᵢ yᵢᵀr,  r ← r + (αᵢ − βᵢ) sᵢ
    d = −r
    ```

    The pairs live in circular buffers of ``m`` rows; the ``count`` newest are used.

    Args:
        gradient: ``g``, shape ``(n,)``.
        s_memory: ``(m, n)`` steps ``s = θ_{k+1} − θ_k``.
        y_memory: ``(m, n)`` gradient changes ``y = g_{k+1} − g_k``.
        count: Number of valid pairs, in ``[0, m]`` (int scalar).
        newest: Row of the newest pair (int scalar).

    Returns:
        ``d``, shape ``(n,)`` (``−g`` when ``count`` is 0).
    """
    memory = int(s_memory.shape[0])
    count = tf.cast(count, tf.int32)
    newest = tf.cast(newest, tf.int32)
    zero = tf.zeros([], gradient.dtype)
    q = gradient
    corrections = []
    for age in range(memory):  # newest first; m is small and static
        row = tf.math.floormod(newest - age, memory)
        # gather, not s_memory[row]: XLA compiles a slice with a tensor index as a
        # compile-time constant, and would compile the step again for every new row.
        s, y = tf.gather(s_memory, row), tf.gather(y_memory, row)
        rho = tf.where(age < count, tf.math.divide_no_nan(tf.ones_like(zero), _dot(y, s)), zero)
        alpha = rho * _dot(s, q)
        q = q - alpha * y
        corrections.append((s, y, rho, alpha))
    s_new, y_new = corrections[0][0], corrections[0][1]
    gamma = tf.math.divide_no_nan(_dot(s_new, y_new), _dot(y_new, y_new))
    r = tf.where(count > 0, gamma, tf.ones_like(zero)) * q
    for s, y, rho, alpha in reversed(corrections):  # oldest first
        beta = rho * _dot(y, r)
        r = r + (alpha - beta) * s
    return -r


def push_curvature_pair(
    s_memory: tf.Tensor,
    y_memory: tf.Tensor,
    count: tf.Tensor,
    newest: tf.Tensor,
    s: tf.Tensor,
    y: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Stores ``(s, y)`` over the oldest pair, unless ``sᵀy ≤ ε ‖s‖ ‖y‖``.

    A pair with non-positive curvature ``sᵀy`` (``ε`` the dtype's machine epsilon, so
    that rounding does not pass for curvature) or a non-finite entry would make the
    inverse-Hessian estimate indefinite; it is skipped.

    Returns:
        ``(s_memory, y_memory, count, newest, accepted)``.
    """
    memory = int(s_memory.shape[0])
    count = tf.cast(count, tf.int32)
    newest = tf.cast(newest, tf.int32)
    eps = exact_cast(machine_epsilon(s.dtype), s.dtype)
    sy = _dot(s, y)
    accepted = tf.logical_and(_finite(s, y), sy > eps * tf.norm(s) * tf.norm(y))
    slot = tf.math.floormod(newest + 1, memory)
    stored_s = tf.tensor_scatter_nd_update(s_memory, [[slot]], s[None])
    stored_y = tf.tensor_scatter_nd_update(y_memory, [[slot]], y[None])
    return (
        tf.where(accepted, stored_s, s_memory),
        tf.where(accepted, stored_y, y_memory),
        tf.where(accepted, tf.minimum(count + 1, memory), count),
        tf.where(accepted, slot, newest),
        accepted,
    )


# ------------------------------------------------------------------ line searches


class LineSearch(NamedTuple):
    """What a line search returns.

    Attributes:
        step: The accepted step ``t`` (0 when no point decreased the loss enough).
        loss: The loss at ``θ + t d``.
        gradient: Its gradient (strong Wolfe), or the gradient at ``θ`` (Armijo: not evaluated).
        evaluations: Function evaluations spent.
        satisfied: Whether the search's conditions hold at ``step``.
    """

    step: tf.Tensor
    loss: tf.Tensor
    gradient: tf.Tensor
    evaluations: tf.Tensor
    satisfied: tf.Tensor


def cubic_minimizer(
    t1: tf.Tensor,
    f1: tf.Tensor,
    d1: tf.Tensor,
    t2: tf.Tensor,
    f2: tf.Tensor,
    d2: tf.Tensor,
    low: tf.Tensor,
    high: tf.Tensor,
) -> tf.Tensor:
    """Minimiser of the cubic through ``(t1, f1, f'1)``, ``(t2, f2, f'2)``, within ``[low, high]``.

    Nocedal & Wright (3.59):

    ```
    e1 = f'1 + f'2 − 3 (f1 − f2) / (t1 − t2),   e2 = sign(t2 − t1) √(e1² − f'1 f'2)
    t  = t2 − (t2 − t1) (f'2 + e2 − e1) / (f'2 − f'1 + 2 e2)
    ```

    The midpoint of ``[low, high]`` when the cubic has no minimiser (``e1² < f'1 f'2``)
    or the formula is not finite.
    """
    e1 = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    square = e1 * e1 - d1 * d2
    e2 = tf.sign(t2 - t1) * tf.sqrt(tf.maximum(square, 0.0))
    t = t2 - (t2 - t1) * (d2 + e2 - e1) / (d2 - d1 + 2.0 * e2)
    usable = tf.logical_and(square >= 0.0, tf.math.is_finite(t))
    middle = 0.5 * (low + high)
    return tf.where(usable, tf.clip_by_value(tf.where(usable, t, middle), low, high), middle)


def _point(evaluate, t, direction):
    """``(f, g, f')`` at step ``t``; a non-finite loss counts as ``+inf`` with ``f' = +inf``."""
    loss, gradient = evaluate(t)
    slope = _dot(gradient, direction)
    finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(slope))
    inf = tf.constant(np.inf, loss.dtype)
    return tf.where(finite, loss, inf), gradient, tf.where(finite, slope, inf)


def strong_wolfe(
    evaluate: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    loss: tf.Tensor,
    gradient: tf.Tensor,
    direction: tf.Tensor,
    step: tf.Tensor,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_evaluations: int = 25,
    tolerance_change: float = 1e-9,
) -> LineSearch:
    """A step ``t`` along ``d`` that satisfies the strong Wolfe conditions.

    ```
    f(θ + t d) ≤ f(θ) + c1 t gᵀd        (sufficient decrease)
    |∇f(θ + t d)ᵀd| ≤ c2 |gᵀd|          (curvature)
    ```

    Nocedal & Wright's Algorithms 3.5 (bracketing, extrapolating by cubic
    interpolation within ``[t + 0.01 (t − t_prev), 10 t]``) and 3.6 (zoom, cubic
    interpolation safeguarded 10 % away from the bracket's ends). A non-finite loss
    counts as ``+inf``. If the evaluations run out, the best point that satisfies the
    sufficient decrease is returned (``satisfied`` false); if there is none, ``t = 0``.

    Args:
        evaluate: ``t -> (f(θ + t d), ∇f(θ + t d))``.
        loss: ``f(θ)``.
        gradient: ``g = ∇f(θ)``.
        direction: ``d``, a descent direction (``gᵀd < 0``).
        step: First trial step.
        c1: Sufficient-decrease constant, in ``(0, c2)``.
        c2: Curvature constant, in ``(c1, 1)``.
        max_evaluations: Most evaluations of ``evaluate``.
        tolerance_change: Stop zooming once the bracket is shorter than this (in
            ``max |d|`` units).

    Returns:
        A :class:`LineSearch`.
    """
    dtype = loss.dtype
    c1 = exact_cast(c1, dtype)
    c2 = exact_cast(c2, dtype)
    slope0 = _dot(gradient, direction)
    d_norm = tf.reduce_max(tf.abs(direction))
    tolerance_change = exact_cast(tolerance_change, dtype)
    zero = tf.zeros([], dtype)
    step = tf.cast(step, dtype)

    def armijo_fails(t, f):
        return f > loss + c1 * t * slope0

    def curvature_holds(slope):
        return tf.abs(slope) <= -c2 * slope0

    # Bracketing: one evaluation per pass. status 0 searching, 1 bracketed, 2 done.
    def bracket_cond(i, status, *_):
        return tf.logical_and(tf.equal(status, 0), i < max_evaluations)

    def bracket_body(i, status, t, t_prev, f_prev, g_prev, s_prev, lo, hi, *_):
        f, g, s = _point(evaluate, t, direction)
        fails = tf.logical_or(armijo_fails(t, f), tf.logical_and(i > 0, f >= f_prev))
        done = tf.logical_and(tf.logical_not(fails), curvature_holds(s))
        uphill = tf.logical_and(tf.logical_not(fails), tf.logical_not(done))
        uphill = tf.logical_and(uphill, s >= 0.0)
        new_status = tf.where(tf.logical_or(fails, uphill), 1, tf.where(done, 2, 0))
        current = (t, f, g, s)
        previous = (t_prev, f_prev, g_prev, s_prev)
        # zoom(lo, hi): (prev, t) when the decrease fails, (t, prev) when the slope turned.
        new_lo = _select(fails, previous, current)
        new_hi = _select(fails, current, previous)
        extrapolated = cubic_minimizer(
            t_prev, f_prev, s_prev, t, f, s, t + 0.01 * (t - t_prev), 10.0 * t
        )
        next_t = tf.where(tf.equal(new_status, 0), extrapolated, t)
        return (i + 1, new_status, next_t, t, f, g, s, new_lo, new_hi, current)

    start = (zero, loss, gradient, slope0)
    init = (tf.constant(0), tf.constant(0), step, *start, start, start, start)
    i, status, _, _, _, _, _, lo, hi, last = tf.while_loop(bracket_cond, bracket_body, init)
    # Out of evaluations while extrapolating: the last point satisfies the decrease.
    lo = _select(tf.equal(status, 0), last, lo)
    lo = _select(tf.equal(status, 2), last, lo)

    def zoom_cond(i, status, lo, hi, insufficient):
        short = tf.abs(hi[0] - lo[0]) * d_norm < tolerance_change
        return tf.logical_and(
            tf.logical_and(tf.equal(status, 1), i < max_evaluations), tf.logical_not(short)
        )

    def zoom_body(i, status, lo, hi, insufficient):
        left, right = tf.minimum(lo[0], hi[0]), tf.maximum(lo[0], hi[0])
        t = cubic_minimizer(lo[0], lo[1], lo[3], hi[0], hi[1], hi[3], left, right)
        # Safeguard: keep at least 10 % of the bracket away from its ends.
        margin = 0.1 * (right - left)
        near_end = tf.minimum(right - t, t - left) < margin
        at_end = tf.logical_or(tf.logical_or(insufficient, t >= right), t <= left)
        moved = tf.where(tf.abs(t - right) < tf.abs(t - left), right - margin, left + margin)
        t = tf.where(tf.logical_and(near_end, at_end), moved, t)
        insufficient = tf.logical_and(near_end, tf.logical_not(at_end))
        f, g, s = _point(evaluate, t, direction)
        current = (t, f, g, s)
        to_hi = tf.logical_or(armijo_fails(t, f), f >= lo[1])
        done = tf.logical_and(tf.logical_not(to_hi), curvature_holds(s))
        flip = tf.logical_and(tf.logical_not(to_hi), tf.logical_not(done))
        flip = tf.logical_and(flip, s * (hi[0] - lo[0]) >= 0.0)
        new_hi = _select(to_hi, current, _select(flip, lo, hi))
        new_lo = _select(to_hi, lo, current)
        return (i + 1, tf.where(done, 2, status), new_lo, new_hi, insufficient)

    i, status, lo, _, _ = tf.while_loop(
        zoom_cond, zoom_body, (i, status, lo, hi, tf.constant(False))
    )
    t, f, g, _ = lo
    return LineSearch(
        step=t,
        loss=f,
        gradient=g,
        evaluations=i,
        satisfied=tf.logical_and(tf.equal(status, 2), t > 0.0),
    )


def _select(condition, a, b):
    """``a`` if ``condition`` else ``b``, for tuples of tensors."""
    return tuple(tf.where(condition, x, y) for x, y in zip(a, b))


def backtracking(
    evaluate: Callable[[tf.Tensor], tf.Tensor],
    loss: tf.Tensor,
    slope: tf.Tensor,
    step: tf.Tensor,
    *,
    c1: float = 1e-4,
    shrink: float = 0.5,
    max_evaluations: int = 20,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The first ``t = t₀ βʲ`` with ``f(θ + t d) ≤ f(θ) + c1 t gᵀd`` (Armijo backtracking).

    Args:
        evaluate: ``t -> f(θ + t d)``.
        loss: ``f(θ)``.
        slope: ``gᵀd < 0``.
        step: ``t₀``.
        c1: Sufficient-decrease constant in ``(0, 1)``.
        shrink: ``β`` in ``(0, 1)``.
        max_evaluations: Most evaluations.

    Returns:
        ``(t, f(θ + t d), evaluations, satisfied)``; ``t = 0`` and ``f(θ)`` when no trial
        satisfied the condition (a non-finite loss never does).
    """
    dtype = loss.dtype
    c1 = exact_cast(c1, dtype)
    shrink = exact_cast(shrink, dtype)
    step = tf.cast(step, dtype)

    def accepted(t, f):
        return tf.logical_and(tf.math.is_finite(f), f <= loss + c1 * t * slope)

    def cond(i, t, f, ok):
        return tf.logical_and(tf.logical_not(ok), i < max_evaluations)

    def body(i, t, f, ok):
        t = tf.where(i > 0, t * shrink, t)
        f = evaluate(t)
        return i + 1, t, f, accepted(t, f)

    i, t, f, ok = tf.while_loop(cond, body, (tf.constant(0), step, loss, tf.constant(False)))
    return tf.where(ok, t, tf.zeros_like(t)), tf.where(ok, f, loss), i, ok


# ------------------------------------------------------------- conjugate gradients


class ConjugateGradient(NamedTuple):
    """What :func:`conjugate_gradient` returns.

    Attributes:
        solution: The last iterate ``x`` (the start, ``x₀``, if the first direction
            already had non-positive curvature).
        iterations: CG iterations completed.
        matvecs: Products with ``A`` spent (a warm start costs one more; a detected
            negative curvature is one too).
        residual: ``‖b − A x‖ / ‖b‖`` of the returned ``x``.
        negative_curvature: Whether it stopped on ``pᵀA p ≤ 0``.
        curvature: ``xᵀA x`` of the returned ``x`` (``xᵀ(b − r)``, no extra product).
    """

    solution: tf.Tensor
    iterations: tf.Tensor
    matvecs: tf.Tensor
    residual: tf.Tensor
    negative_curvature: tf.Tensor
    curvature: tf.Tensor


def conjugate_gradient(
    matvec: Callable[[tf.Tensor], tf.Tensor],
    rhs: tf.Tensor,
    *,
    tolerance: float,
    max_iterations: int,
    initial: tf.Tensor | None = None,
    preconditioner: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> ConjugateGradient:
    """Truncated (preconditioned) conjugate gradients for ``A x = b`` (Nocedal & Wright, Alg. 5.3).

    ```
    r₀ = b − A x₀,  z₀ = M⁻¹ r₀,  p₀ = z₀
    αⱼ = rⱼᵀzⱼ / pⱼᵀA pⱼ,  xⱼ₊₁ = xⱼ + αⱼ pⱼ,  rⱼ₊₁ = rⱼ − αⱼ A pⱼ
    zⱼ₊₁ = M⁻¹ rⱼ₊₁,  βⱼ = rⱼ₊₁ᵀzⱼ₊₁ / rⱼᵀzⱼ,  pⱼ₊₁ = zⱼ₊₁ + βⱼ pⱼ
    ```

    It stops once ``‖rⱼ‖ ≤ tolerance ‖b‖``, after ``max_iterations``, or on
    negative curvature ``pⱼᵀA pⱼ ≤ 0`` (``A`` is then not positive definite; ``xⱼ`` is
    returned, as in line-search Newton–CG, Nocedal & Wright Alg. 7.1).

    Args:
        matvec: ``v -> A v`` for a symmetric ``A``.
        rhs: ``b``.
        tolerance: Relative residual at which to stop.
        max_iterations: Most iterations.
        initial: ``x₀`` (warm start), or ``None`` for zeros.
        preconditioner: ``r -> M⁻¹ r`` for a symmetric positive-definite ``M``, or ``None``.

    Returns:
        A :class:`ConjugateGradient`.
    """
    dtype = rhs.dtype
    precondition = preconditioner or (lambda r: r)
    b_norm = tf.norm(rhs)
    threshold = exact_cast(tolerance, dtype) * b_norm
    if initial is None:
        x0, r0, start_products = tf.zeros_like(rhs), rhs, 0
    else:
        x0 = tf.cast(initial, dtype)
        r0, start_products = rhs - matvec(x0), 1
    z0 = precondition(r0)

    def cond(j, x, r, p, rz, negative):
        return tf.logical_and(
            tf.logical_and(j < max_iterations, tf.logical_not(negative)), tf.norm(r) > threshold
        )

    def body(j, x, r, p, rz, negative):
        ap = matvec(p)
        curvature = _dot(p, ap)
        negative = tf.logical_not(curvature > 0.0)
        alpha = tf.where(
            negative, tf.zeros_like(rz), rz / tf.where(negative, tf.ones_like(rz), curvature)
        )
        x_next = x + alpha * p
        r_next = r - alpha * ap
        z_next = precondition(r_next)
        rz_next = _dot(r_next, z_next)
        p_next = z_next + tf.math.divide_no_nan(rz_next, rz) * p
        keep = lambda old, new: tf.where(negative, old, new)  # noqa: E731
        j_next = tf.where(negative, j, j + 1)
        return (
            j_next,
            keep(x, x_next),
            keep(r, r_next),
            keep(p, p_next),
            keep(rz, rz_next),
            negative,
        )

    init = (tf.constant(0), x0, r0, z0, _dot(r0, z0), tf.constant(False))
    j, x, r, _, _, negative = tf.while_loop(cond, body, init)
    products = j + start_products + tf.cast(negative, tf.int32)
    return ConjugateGradient(
        solution=x,
        iterations=j,
        matvecs=products,
        residual=tf.math.divide_no_nan(tf.norm(r), b_norm),
        negative_curvature=negative,
        curvature=_dot(x, rhs - r),
    )


# ------------------------------------------------------------------------ damping


def reduction_ratio(
    loss: tf.Tensor, new_loss: tf.Tensor, slope: tf.Tensor, curvature: tf.Tensor
) -> tf.Tensor:
    """``ρ = (f(θ + p) − f(θ)) / (gᵀp + ½ pᵀC p)``: actual over predicted change.

    Args:
        loss: ``f(θ)``.
        new_loss: ``f(θ + p)``.
        slope: ``gᵀp``.
        curvature: ``pᵀC p`` (the undamped curvature matrix).

    Returns:
        ``ρ``; 0 when the model predicts no decrease or a loss is not finite.
    """
    predicted = slope + 0.5 * curvature
    usable = tf.logical_and(predicted < 0.0, _finite(loss, new_loss))
    safe = tf.where(usable, predicted, -tf.ones_like(predicted))
    return tf.where(usable, (new_loss - loss) / safe, tf.zeros_like(predicted))


def martens_damping(
    damping: tf.Tensor,
    ratio: tf.Tensor,
    *,
    minimum: float,
    maximum: float,
    boost: float = 1.5,
    drop: float = 2.0 / 3.0,
) -> tf.Tensor:
    """Levenberg–Marquardt adaptation of ``λ`` from ``ρ`` (Martens 2010, §4.1).

    ```
    λ ← 3/2 λ  if ρ < 1/4;   λ ← 2/3 λ  if ρ > 3/4;   else λ,   clipped to [minimum, maximum]
    ```
    """
    dtype = damping.dtype
    factor = tf.where(
        ratio < 0.25,
        exact_cast(boost, dtype),
        tf.where(ratio > 0.75, exact_cast(drop, dtype), tf.ones_like(damping)),
    )
    return tf.clip_by_value(
        damping * factor, exact_cast(minimum, dtype), exact_cast(maximum, dtype)
    )


def nielsen_damping(
    damping: tf.Tensor,
    growth: tf.Tensor,
    ratio: tf.Tensor,
    accepted: tf.Tensor,
    *,
    minimum: float,
    maximum: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Levenberg–Marquardt damping after a trial step (Nielsen 1999; Madsen et al. 2004, §3.2).

    ```
    accepted:  λ ← λ · max(1/3, 1 − (2ρ − 1)³),  ν ← 2
    rejected:  λ ← λ · ν,                         ν ← 2ν
    ```

    Returns:
        ``(λ, ν)``, ``λ`` clipped to ``[minimum, maximum]``.
    """
    dtype = damping.dtype
    third = exact_cast(1.0 / 3.0, dtype)
    shrink = tf.maximum(third, 1.0 - tf.pow(2.0 * ratio - 1.0, 3))
    new_damping = tf.where(accepted, damping * shrink, damping * growth)
    new_growth = tf.where(accepted, tf.constant(2.0, dtype), 2.0 * growth)
    low, high = exact_cast(minimum, dtype), exact_cast(maximum, dtype)
    return tf.clip_by_value(new_damping, low, high), tf.minimum(
        new_growth, exact_cast(2.0**30, dtype)
    )
