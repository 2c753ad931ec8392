"""NumPy transcriptions of the full-batch solvers' published equations: the oracles.

Plain Python control flow, no TensorFlow: Nocedal & Wright's two-loop recursion
(Alg. 7.4), strong-Wolfe line search (Alg. 3.5/3.6, cubic interpolation (3.59)),
(preconditioned) CG (Alg. 5.3), Armijo backtracking; Martens's and Nielsen's damping
rules; Frangella, Tropp & Udell's randomized Nyström approximation (Alg. 2.1) and
preconditioner; and an l2-regularised softmax regression with its exact gradient and
Hessian.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------- L-BFGS


def two_loop(grad, s_history, y_history):
    """``H g`` from the pairs, oldest first (the reference text's function)."""
    m = len(s_history)
    q = grad.copy()
    alphas, rhos = np.zeros(m), np.zeros(m)
    for i in range(m - 1, -1, -1):
        rhos[i] = 1.0 / (y_history[i] @ s_history[i])
        alphas[i] = rhos[i] * (s_history[i] @ q)
        q = q - alphas[i] * y_history[i]
    if m:
        r = (s_history[-1] @ y_history[-1]) / (y_history[-1] @ y_history[-1]) * q
    else:
        r = q
    for i in range(m):
        beta = rhos[i] * (y_history[i] @ r)
        r = r + (alphas[i] - beta) * s_history[i]
    return r


def cubic(t1, f1, d1, t2, f2, d2, low, high):
    e1 = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    square = e1 * e1 - d1 * d2
    if square < 0:
        return 0.5 * (low + high)
    e2 = np.sign(t2 - t1) * np.sqrt(square)
    t = t2 - (t2 - t1) * (d2 + e2 - e1) / (d2 - d1 + 2.0 * e2)
    if not np.isfinite(t):
        return 0.5 * (low + high)
    return min(max(t, low), high)


def strong_wolfe(phi, f0, g0, d, t, c1=1e-4, c2=0.9, max_evals=25, tol_change=1e-9):
    """Returns ``(t, f, g, evaluations)``; ``phi(t) -> (f, g)``."""
    slope0 = g0 @ d
    d_norm = np.max(np.abs(d))
    prev = (0.0, f0, g0, slope0)
    evals = 0
    lo = hi = None
    while evals < max_evals:
        f, g = phi(t)
        evals += 1
        s = g @ d
        if not np.isfinite(f) or not np.isfinite(s):
            f, s = np.inf, np.inf
        cur = (t, f, g, s)
        if f > f0 + c1 * t * slope0 or (evals > 1 and f >= prev[1]):
            lo, hi = prev, cur
            break
        if abs(s) <= -c2 * slope0:
            return t, f, g, evals
        if s >= 0:
            lo, hi = cur, prev
            break
        t_next = cubic(prev[0], prev[1], prev[3], t, f, s, t + 0.01 * (t - prev[0]), 10 * t)
        prev, t = cur, t_next
    else:
        return prev[0], prev[1], prev[2], evals  # out of evaluations while extrapolating
    insufficient = False
    while evals < max_evals and abs(hi[0] - lo[0]) * d_norm >= tol_change:
        left, right = min(lo[0], hi[0]), max(lo[0], hi[0])
        t = cubic(lo[0], lo[1], lo[3], hi[0], hi[1], hi[3], left, right)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:
            if insufficient or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f, g = phi(t)
        evals += 1
        s = g @ d
        if not np.isfinite(f) or not np.isfinite(s):
            f, s = np.inf, np.inf
        cur = (t, f, g, s)
        if f > f0 + c1 * t * slope0 or f >= lo[1]:
            hi = cur
        else:
            if abs(s) <= -c2 * slope0:
                return t, f, g, evals
            if s * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = cur
    return lo[0], lo[1], lo[2], evals


def lbfgs(fg, w, steps, memory=10, lr=1.0, **line_search):
    """L-BFGS as keras_curv.LBFGS runs it; returns the weights after each step."""
    s_hist, y_hist, out = [], [], []
    f, g = fg(w)
    for _ in range(steps):
        d = -two_loop(g, s_hist, y_hist)
        if not g @ d < 0:
            d, s_hist, y_hist = -g, [], []
        t0 = lr if s_hist else lr * min(1.0, 1.0 / np.sum(np.abs(g)))
        phi = lambda t, w=w, d=d: fg(w + t * d)  # noqa: E731
        t, f_new, g_new, _ = strong_wolfe(phi, f, g, d, t0, **line_search)
        s, y = t * d, g_new - g
        if s @ y > np.finfo(float).eps * np.linalg.norm(s) * np.linalg.norm(y):
            s_hist, y_hist = (s_hist + [s])[-memory:], (y_hist + [y])[-memory:]
        if t == 0:
            s_hist, y_hist = [], []
        w, f, g = w + s, f_new, g_new
        out.append(w.copy())
    return out


# ------------------------------------------------------------- CG and damping


def pcg(matvec, b, tol, max_iter, x0=None, precondition=None):
    """Returns ``(x, iterations, negative_curvature)``."""
    precondition = precondition or (lambda r: r)
    x = np.zeros_like(b) if x0 is None else x0.copy()
    r = b - matvec(x) if x0 is not None else b.copy()
    z = precondition(r)
    p, rz = z.copy(), r @ z
    j = 0
    while j < max_iter and np.linalg.norm(r) > tol * np.linalg.norm(b):
        ap = matvec(p)
        curvature = p @ ap
        if curvature <= 0:
            return x, j, True
        alpha = rz / curvature
        x, r = x + alpha * p, r - alpha * ap
        z = precondition(r)
        rz_new = r @ z
        p, rz = z + rz_new / rz * p, rz_new
        j += 1
    return x, j, False


def backtracking(phi, f0, slope, t, c1=1e-4, beta=0.5, max_evals=20):
    for i in range(max_evals):
        if i:
            t *= beta
        f = phi(t)
        if np.isfinite(f) and f <= f0 + c1 * t * slope:
            return t, f
    return 0.0, f0


def ratio(f, f_new, slope, curvature):
    predicted = slope + 0.5 * curvature
    return (f_new - f) / predicted if predicted < 0 else 0.0


def martens(lam, rho, low, high):
    lam = lam * 1.5 if rho < 0.25 else (lam * 2 / 3 if rho > 0.75 else lam)
    return min(max(lam, low), high)


def newton_cg(fg, hessp, w, steps, damping, tol, max_iter, low=1e-8, high=1e8, adapt=True):
    out = []
    lam = damping
    for _ in range(steps):
        f, g = fg(w)
        x, _, _ = pcg(lambda v, w=w, lam=lam: hessp(w, v) + lam * v, -g, tol, max_iter)
        descent = g @ x < 0
        d = x if descent else -g
        t, f_new = backtracking(lambda t, w=w, d=d: fg(w + t * d)[0], f, g @ d, 1.0)
        curvature = d @ hessp(w, d)
        rho = ratio(f, f_new, t * (g @ d), t * t * curvature)
        if adapt:
            lam = martens(lam, rho, low, high) if descent and t > 0 else min(1.5 * lam, high)
        w = w + t * d
        out.append(w.copy())
    return out


def levenberg_marquardt(fg, ggnp, w, steps, damping, tol, max_iter, trials=10, low=1e-12,
                        high=1e12):  # fmt: skip
    out = []
    lam, nu = damping, 2.0
    for _ in range(steps):
        f, g = fg(w)
        for _ in range(trials):
            d, _, _ = pcg(lambda v, w=w, lam=lam: ggnp(w, v) + lam * v, -g, tol, max_iter)
            f_new = fg(w + d)[0]
            rho = ratio(f, f_new, g @ d, d @ ggnp(w, d))
            if rho > 0:
                lam, nu = lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
            else:
                lam, nu = lam * nu, 2 * nu
            lam = min(max(lam, low), high)
            if rho > 0:
                w = w + d
                break
        out.append(w.copy())
    return out


# ---------------------------------------------------------------------- Nyström


def nystrom(q, y):
    """Frangella et al. Alg. 2.1 (with the shift for indefinite cores): ``(U, λ̂)``."""
    n = y.shape[0]
    nu = np.sqrt(n) * np.finfo(y.dtype).eps * np.linalg.norm(y)
    y_nu = y + nu * q
    core = q.T @ y_nu
    core = 0.5 * (core + core.T)
    smallest = np.linalg.eigvalsh(core).min()
    extra = 0.0 if smallest > 0 else nu - 2.0 * smallest
    c = np.linalg.cholesky(core + extra * np.eye(core.shape[0]))
    b = np.linalg.solve(c, (y_nu + extra * q).T).T
    u, sigma, _ = np.linalg.svd(b, full_matrices=False)
    return u, np.maximum(sigma**2 - nu - extra, 0.0)


def nystrom_preconditioner_inverse(u, lam, mu):
    """The dense ``P⁻¹ = (λ̂_r + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − U Uᵀ)``."""
    n = u.shape[0]
    return (lam[-1] + mu) * (u / (lam + mu)) @ u.T + np.eye(n) - u @ u.T


# -------------------------------------------------------- softmax regression


class SoftmaxRegression:
    """``f(W, b) = mean(−log softmax(x W + b)_y) + l2 ‖W‖²``, flat ``[W.ravel(), b]``."""

    def __init__(self, x, y, classes, l2, sample_weight=None):
        self.x, self.y, self.c, self.l2 = x, y, classes, l2
        self.p = x.shape[1]
        # Keras's "sum_over_batch_size": Σ wᵢ ℓᵢ / n.
        self.w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)

    def _split(self, w):
        return w[: self.p * self.c].reshape(self.p, self.c), w[self.p * self.c :]

    def _probabilities(self, w):
        kernel, bias = self._split(w)
        z = self.x @ kernel + bias
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return z, e / e.sum(1, keepdims=True)

    def value_and_gradient(self, w):
        kernel, _ = self._split(w)
        z, p = self._probabilities(w)
        n = len(self.y)
        f = np.mean(self.w * (np.log(np.exp(z).sum(1)) - z[np.arange(n), self.y]))
        f += self.l2 * np.sum(kernel * kernel)
        g = self.w[:, None] * (p - np.eye(self.c)[self.y]) / n
        return f, np.concatenate([(self.x.T @ g + 2 * self.l2 * kernel).ravel(), g.sum(0)])

    def hessian_vector_product(self, w, v):
        """Exact (the model is linear in w, so this is also the Gauss–Newton product)."""
        _, p = self._probabilities(w)
        dk, db = self._split(v)
        n = len(self.y)
        dz = self.x @ dk + db
        hz = self.w[:, None] * (p * dz - p * np.sum(p * dz, axis=1, keepdims=True))
        return np.concatenate([(self.x.T @ hz / n + 2 * self.l2 * dk).ravel(), hz.sum(0) / n])


def scipy_lbfgsb(problem, dim):
    """scipy's L-BFGS-B on ``problem`` from zeros, to tight tolerances (one BLAS thread)."""
    import scipy.optimize
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return scipy.optimize.minimize(
            problem.value_and_gradient,
            np.zeros(dim),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10},
        )
