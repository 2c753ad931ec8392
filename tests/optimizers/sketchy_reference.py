"""An independent NumPy transcription of SketchySGD on least squares ``mean((X w − y)²)``.

Written from the equations (docs/sketchy_sgd.md), not from the TensorFlow code: dense
eigendecompositions and solves where the optimizer uses Woodbury and power iteration,
and the Cholesky form of the stable Nyström algorithm (Tropp et al. 2017, Alg. 3).
"""

from __future__ import annotations

import numpy as np


def refreshes(t: int, update_every: int) -> bool:
    """Refresh at t = 0, 1, 2, 4, 8, ... below update_every, then every update_every steps."""
    return (t < update_every and (t & (t - 1)) == 0) or t % update_every == 0


def nystrom(a: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs (descending) of Y (ΩᵀY)⁺ Yᵀ, Y = A Ω, by the shifted Cholesky algorithm."""
    y = a @ omega
    nu = np.sqrt(a.shape[0]) * np.finfo(float).eps * np.linalg.norm(y)
    shifted = y + nu * omega
    chol = np.linalg.cholesky(omega.T @ shifted)
    b = np.linalg.solve(chol, shifted.T).T
    u, sigma, _ = np.linalg.svd(b, full_matrices=False)
    return np.maximum(sigma**2 - nu, 0.0), u


def _preconditioner(h, rank, rho_rule, oversampling, rng):
    if rng is None:  # the whole space sketched: the Nyström approximation is H itself
        vals, vecs = np.linalg.eigh(h)
        vals, vecs = vals[::-1], vecs[:, ::-1]
    else:
        omega = np.linalg.qr(rng.standard_normal((h.shape[0], rank + oversampling)))[0]
        vals, vecs = nystrom(h, omega)
    if rho_rule == "next":
        rho = vals[rank]
    elif rho_rule == "kept":
        rho = vals[rank - 1]
    else:
        rho = float(rho_rule)
    rho = max(rho, 1e-6 * vals[0])
    u = vecs[:, :rank]
    return (u * vals[:rank]) @ u.T + rho * np.eye(h.shape[0])


def _inverse_sqrt(p):
    vals, vecs = np.linalg.eigh(p)
    return (vecs / np.sqrt(vals)) @ vecs.T


def numpy_sketchy_sgd(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    epochs: int,
    *,
    w0: np.ndarray | None = None,
    rank: int = 10,
    oversampling: int = 5,
    rho_rule: str | float = "next",
    update_every: int = 20,
    learning_rate: float | str = "auto",
    step_scale: float = 0.5,
    momentum: float = 0.0,
    sketch_seed: int | None = 0,
) -> np.ndarray:
    """SketchySGD's weights after ``epochs`` unshuffled epochs on ``(x, y)`` (y of shape (n,)).

    ``sketch_seed=None`` sketches the whole space (exact, no randomness: for golden
    values); an int draws Gaussian test matrices. The automatic step uses the exact
    λ_max of P^{-1/2} H P^{-1/2} at refreshes and, in between, the larger of the stored
    value and the curvature along the step's direction d, dᵀHd / dᵀPd.
    """
    n, dim = x.shape
    w = np.zeros(dim) if w0 is None else np.array(w0, float)
    rng = None if sketch_seed is None else np.random.default_rng(sketch_seed)
    m = np.zeros(dim)
    curvature = 0.0
    t = 0
    # Each batch's H and Xᵀy, formed once: g = H w − 2Xᵀy/b.
    batches = []
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        batches.append((2.0 / len(xb) * xb.T @ xb, 2.0 / len(xb) * xb.T @ yb))
    for _ in range(epochs):
        for h, xty in batches:
            g = h @ w - xty
            if momentum:
                m = momentum * m + (1 - momentum) * g
                moment = m / (1 - momentum ** (t + 1))
            else:
                moment = g
            if refreshes(t, update_every):
                p = _preconditioner(h, rank, rho_rule, oversampling, rng)
                root = _inverse_sqrt(p)
                curvature = np.linalg.eigvalsh(root @ h @ root)[-1]
            direction = np.linalg.solve(p, moment)
            if not refreshes(t, update_every):
                along = direction @ h @ direction / (direction @ p @ direction)
                curvature = max(curvature, along)
            lr = step_scale / curvature if learning_rate == "auto" else learning_rate
            w = w - lr * direction
            t += 1
    return w


def numpy_osgm(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    epochs: int,
    *,
    w0: np.ndarray | None = None,
    learning_rate: float = 1e-3,
    initial_scale: float = 0.0,
    max_scale: float = 1.0,
    momentum: float = 0.9,
    epsilon: float = 1e-12,
) -> np.ndarray:
    """OSGM's weights after ``epochs`` unshuffled epochs of least squares (y of shape (n,)).

    At step k with the batch loss f_k and gradient g_k at the current weights:
    h = g_k ⊙ g_{k−1} / max(f_{k−1}, 1e-12), v ← v + h², P ← clip(P + η h/(√v + ε), 0, P_max),
    b ← β b + P ⊙ g_k, w ← w − b; g_{−1} = 0 and f_{−1} = 1.
    """
    n, dim = x.shape
    w = np.zeros(dim) if w0 is None else np.array(w0, float)
    scale, accumulator = np.full(dim, initial_scale), np.zeros(dim)
    previous, previous_loss, velocity = np.zeros(dim), 1.0, np.zeros(dim)
    for _ in range(epochs):
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            residual = xb @ w - yb
            loss, g = np.mean(residual**2), 2.0 / len(xb) * xb.T @ residual
            h = g * previous / max(previous_loss, 1e-12)
            accumulator = accumulator + h**2
            scale = scale + learning_rate * h / (np.sqrt(accumulator) + epsilon)
            scale = np.clip(scale, 0, max_scale)
            velocity = momentum * velocity + scale * g
            w = w - velocity
            previous, previous_loss = g, loss
    return w
