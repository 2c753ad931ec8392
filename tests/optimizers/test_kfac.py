"""keras_curv.KFAC through compile/fit against independent oracles (NumPy, tape Jacobians)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_curv.optimizers import KFAC

SCCE = keras.losses.SparseCategoricalCrossentropy


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _mlp64(seed=0, inputs=3, hidden=4, outputs=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,), dtype="float64"),
            keras.layers.Dense(hidden, activation="tanh", dtype="float64"),
            keras.layers.Dense(outputs, dtype="float64"),
        ]
    )


def _classification(n=24, inputs=3, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype(np.float32).astype(np.float64)
    return x, rng.integers(0, classes, n)


# ----------------------------------------------------------------- golden values


def _numpy_kfac(weights, batches, *, lr, damping, momentum, decay, inverse_every, norm, wd):
    """K-FAC (Martens & Grosse 2015) for the tanh MLP with softmax cross-entropy, by hand.

    Empirical Fisher (true labels), factored Tikhonov damping with the π-adjustment,
    bias-corrected factor EMAs, inverses (dense ``np.linalg.inv``) every
    ``inverse_every`` steps, KL norm constraint, heavy-ball momentum, decoupled weight decay.
    Returns the weights and the quadratic-model change of every step.
    """
    w1, b1, w2, b2 = (np.array(w, np.float64) for w in weights)
    params = [w1, b1, w2, b2]
    velocity = [np.zeros_like(p) for p in params]
    factors = [None, None, None, None]  # A1, G1, A2, G2
    inverses = None
    changes = []
    for t, (x, y, sw) in enumerate(batches):
        n = len(x)
        sw = np.ones(n) if sw is None else sw
        h = np.tanh(x @ w1 + b1)
        p = _softmax(h @ w2 + b2)
        e2 = p - np.eye(p.shape[1])[y]  # per-sample d NLL / d logits
        e1 = (e2 @ w2.T) * (1 - h**2)
        grads = [x.T @ (sw[:, None] * e1) / n, (sw[:, None] * e1).mean(0)]
        grads += [h.T @ (sw[:, None] * e2) / n, (sw[:, None] * e2).mean(0)]
        hx, hh = np.c_[x, np.ones(n)], np.c_[h, np.ones(n)]
        batch = [hx.T @ hx / n, (sw[:, None] * e1).T @ e1 / n, hh.T @ hh / n]
        batch.append((sw[:, None] * e2).T @ e2 / n)
        weight = (1 - decay) / (1 - decay ** (t + 1))
        factors = [b if f is None else f + weight * (b - f) for f, b in zip(factors, batch)]
        if t % inverse_every == 0:
            inverses = []
            for a, g in (factors[:2], factors[2:]):
                pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
                root = np.sqrt(damping)
                inverses.append(
                    (np.linalg.inv(a + pi * root * np.eye(len(a))),
                     np.linalg.inv(g + root / pi * np.eye(len(g))))
                )  # fmt: skip
        directions = []
        for (a_inv, g_inv), gw, gb in zip(inverses, grads[::2], grads[1::2]):
            d = a_inv @ np.vstack([gw, gb]) @ g_inv
            directions += [d[:-1], d[-1]]
        dot = sum(np.sum(d * g) for d, g in zip(directions, grads))
        nu = 1.0 if norm is None else min(1.0, np.sqrt(norm / (lr**2 * dot)))
        new_velocity = [momentum * v + nu * d for v, d in zip(velocity, directions)]
        steps = [-lr * v for v in new_velocity]
        curvature = 0.0
        for (a, g), sw_, sb in zip((factors[:2], factors[2:]), steps[::2], steps[1::2]):
            s = np.vstack([sw_, sb])
            curvature += np.sum((a @ s @ g) * s)
        step_sq = sum(np.sum(s**2) for s in steps)
        changes.append(sum(np.sum(g * s) for g, s in zip(grads, steps)) + 0.5 * curvature
                       + 0.5 * damping * step_sq)  # fmt: skip
        params = [q - lr * wd * q for q in params]
        params = [q + s for q, s in zip(params, steps)]
        velocity = new_velocity
        w1, b1, w2, b2 = params
    return params, changes


GOLDEN = {
    "plain": {"momentum": 0.0, "decay": 0.0, "inverse_every": 1, "norm": None, "wd": 0.0},
    "momentum_norm_wd": {
        "momentum": 0.5,
        "decay": 0.0,
        "inverse_every": 1,
        "norm": 1e-3,
        "wd": 0.0625,
    },  # fmt: skip
    "ema_stale_inverses_weights": {
        "momentum": 0.9,
        "decay": 0.8,
        "inverse_every": 3,
        "norm": None,
        "wd": 0.0,
        "weighted": True,
    },  # fmt: skip
}


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_values_against_numpy_through_fit(case):
    settings = dict(GOLDEN[case])
    weighted = settings.pop("weighted", False)
    x, y = _classification(n=28)
    rng = np.random.default_rng(5)
    # Float32-exact: Keras's data adapter casts sample weights to float32.
    sw = rng.uniform(0.2, 2.0, len(x)).astype(np.float32).astype(np.float64) if weighted else None
    model = _mlp64()
    w0 = [w.copy() for w in model.get_weights()]
    lr, damping, batch = 0.25, 0.01, 7
    optimizer = KFAC(
        learning_rate=lr,
        damping=damping,
        momentum=settings["momentum"],
        ema_decay=settings["decay"],
        inverse_update_every=settings["inverse_every"],
        norm_constraint=settings["norm"],
        weight_decay=settings["wd"] or None,
        fisher="empirical",
    )
    model.compile(optimizer=optimizer, loss=SCCE(from_logits=True, dtype="float64"))
    model.fit(x, y, sample_weight=sw, batch_size=batch, shuffle=False, verbose=0)
    batches = [
        (x[i : i + batch], y[i : i + batch], None if sw is None else sw[i : i + batch])
        for i in range(0, len(x), batch)
    ]
    expected, changes = _numpy_kfac(w0, batches, lr=lr, damping=damping, **settings)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    summary = optimizer.curvature_summary()
    np.testing.assert_allclose(
        float(optimizer._last["quadratic_model_change"].numpy()), changes[-1], rtol=1e-9
    )
    assert float(summary["curvature_updates"]) == 4
    assert float(summary["inverse_updates"]) == len(range(0, 4, settings["inverse_every"]))
