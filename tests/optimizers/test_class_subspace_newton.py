"""Tests of ClassSubspaceNewton against an independent NumPy transcription of eq. 15-17."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.optimizers import ClassSubspaceNewton, CurvatureContextError, curvature_step

C = 3
D = 4


# ----------------------------------------------------------------- NumPy oracle


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _score_jacobians(x, p, log_prob):
    """Per-sample Jacobians (B, C, dim) of the class scores of z = xW + b, flat [W row-major, b].

    d logit_k / dW = x e_k^T; for log-probability scores, d log p_k = sum_j (d_kj - p_j) d logit_j.
    """
    eye = np.eye(C)
    rows = []
    for mu in range(x.shape[0]):
        coef = eye - p[mu][None, :] if log_prob else eye  # (k, j): d score_k / d logit_j
        rows.append(np.stack([np.concatenate([np.outer(x[mu], coef[k]).ravel(), coef[k]])
                              for k in range(C)]))
    return np.array(rows)


def _logit_jacobians(x):
    eye = np.eye(C)
    return np.array([[np.concatenate([np.outer(xm, eye[k]).ravel(), eye[k]]) for k in range(C)]
                     for xm in x])


def numpy_csn(theta, batches, *, lr, gamma=0.9, momentum=0.0, log_prob=False, curvature="paper",
              inverse="diagonal", damping=0.0, max_inv=None, update_each=1):
    """Eq. 15-17 (and the documented options) on a linear softmax model, step by step."""
    dim = theta.size
    m = np.zeros((C, dim))
    s = np.zeros(C)
    t = np.zeros(C)
    buf = np.zeros(dim)
    block = np.zeros((C, C))
    history = []
    for step, (x, y, w) in enumerate(batches):
        W = theta[: D * C].reshape(D, C)
        b = theta[D * C:]
        logits = x @ W + b
        p = _softmax(logits)
        onehot = np.eye(C)[y]
        size = len(y)
        w = np.ones(size) if w is None else w
        # Gradient of the weighted mean cross-entropy (sum_over_batch_size).
        jl = _logit_jacobians(x)
        g = np.einsum("b,bk,bkd->d", w, p - onehot, jl) / size
        refresh = step % update_each == 0
        js = _score_jacobians(x, p, log_prob)
        counts = (onehot * w[:, None]).sum(0)
        present = (counts > 0) & refresh
        cb = np.zeros((C, dim))
        for k in range(C):
            if counts[k] > 0:
                cb[k] = np.einsum("b,bd->d", w * onehot[:, k], js[:, k]) / counts[k]
        m_new = np.where(present[:, None], gamma * m + (1 - gamma) * cb, m)
        t_new = t + present
        if curvature == "paper":
            lam_b = (w[:, None] * onehot * p * (1 - p)).sum(0) / size * (cb ** 2).sum(1)
        else:
            norms = np.linalg.norm(m_new, axis=1)
            v_tent = np.where(norms[:, None] > 0, m_new / np.where(norms > 0, norms, 1)[:, None], 0)
            # Dense GGN of the weighted mean CE w.r.t. the logits.
            G = sum(w[mu] * jl[mu].T @ (np.diag(p[mu]) - np.outer(p[mu], p[mu])) @ jl[mu]
                    for mu in range(size)) / size
            k_b = v_tent @ G @ v_tent.T
            lam_b = np.diag(k_b)
            if curvature == "projected_newton" and present.any():
                block = k_b
        s = np.where(present, gamma * s + (1 - gamma) * lam_b ** 2, s)
        m, t = m_new, t_new
        corr = np.where(t > 0, 1 - gamma ** t, 1.0)
        c = m / corr[:, None]
        lam = np.where(t > 0, np.sqrt(s / corr), 1.0)
        norms = np.linalg.norm(c, axis=1)
        V = np.where(norms[:, None] > 0, c / np.where(norms > 0, norms, 1)[:, None], 0)
        lam_eff = lam + damping
        if max_inv is not None:
            lam_eff = np.maximum(lam_eff, 1 / max_inv)
        if curvature == "projected_newton":
            P = np.eye(dim) - V.T @ np.linalg.pinv(V @ V.T) @ V
            newton = V.T @ np.linalg.pinv(block + damping * np.eye(C)) @ V @ g
            d = lr * P @ g + newton
        elif inverse == "exact":
            M = V.T @ np.diag(lam_eff) @ V
            P = np.eye(dim) - V.T @ np.linalg.pinv(V @ V.T) @ V
            d = lr * P @ g + np.linalg.pinv(M) @ g
        else:
            d = lr * g + ((1 / lam_eff - lr) * (V @ g)) @ V
        buf = momentum * buf + d
        theta = theta - buf
        history.append({"lam": lam, "V": V})
    return theta, history


# ------------------------------------------------------------------- helpers


def _data(n=24, seed=0, scale=1.0):
    rng = np.random.RandomState(seed)
    # fit() feeds float arrays as float32: keep data exactly representable there.
    x = (rng.randn(n, D) * scale).astype(np.float32).astype(np.float64)
    y = np.tile(np.arange(C), n // C)  # every batch of 3k samples holds all classes
    return x, y


def _linear_model(softmax=False, seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,), dtype="float64"),
            keras.layers.Dense(
                C,
                activation="softmax" if softmax else None,
                dtype="float64",
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=seed),
                bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 1),
            ),
        ]
    )


def _theta(model):
    W, b = (v.numpy() for v in model.trainable_variables)
    return np.concatenate([W.ravel(), b])


def _fit_and_compare(opt_kwargs, ref_kwargs, *, softmax=False, sparse=True, weights=None,
                     epochs=2, batch_size=6, y=None, lr=0.1):
    x, y0 = _data()
    y = y0 if y is None else y
    model = _linear_model(softmax)
    theta0 = _theta(model)
    opt = ClassSubspaceNewton(learning_rate=lr, **opt_kwargs)
    # Keras losses compute in floatx unless told otherwise.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax, dtype="float64")
    labels = y
    if not sparse:
        loss = keras.losses.CategoricalCrossentropy(from_logits=not softmax, dtype="float64")
        labels = np.eye(C)[y]
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, labels, sample_weight=weights, batch_size=batch_size, epochs=epochs,
              shuffle=False, verbose=0)
    batches = []
    for _ in range(epochs):
        for start in range(0, len(y), batch_size):
            sl = slice(start, start + batch_size)
            batches.append((x[sl], y[sl], None if weights is None else weights[sl]))
    # Keras keeps the learning rate in a float32 variable.
    lr32 = float(np.float32(lr))
    expected, history = numpy_csn(theta0, batches, lr=lr32, log_prob=softmax, **ref_kwargs)
    return model, opt, expected, history


# --------------------------------------------------------------- golden values


@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "softmax"])
def test_golden_eq_15_17(softmax):
    model, opt, expected, history = _fit_and_compare({}, {}, softmax=softmax)
    np.testing.assert_allclose(_theta(model), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(opt.curvature.numpy(), history[-1]["lam"], rtol=1e-6)
    np.testing.assert_allclose(opt.class_directions.numpy(), history[-1]["V"], rtol=1e-6,
                               atol=1e-12)
    np.testing.assert_array_equal(opt.class_counts.numpy(), [8, 8, 8])
