"""Matvecs each eigensolver needs for the top-10 Hessian eigenvalues of a small trained MLP.

Run from the repository root::

    python -m benchmarks.eigensolvers

An MLP 64-32-10 (2410 parameters, float64) is trained for two epochs with Adam on
scikit-learn's ``load_digits``. The dense Hessian on 512 probe samples is the oracle
(``numpy.linalg.eigh``). For each method and each tolerance of its own stopping rule
the table reports the matvecs spent and the largest relative error of the top-10
eigenvalues; "matvecs @1e-3" is the cheapest run whose error is below 1e-3. For
Lanczos the oracle-stopped count (the first Krylov dimension whose top-10 Ritz
values are all within 1e-3) is reported too. Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits

from keras_curv.curvature import HessianOperator, lanczos, top_eigenpairs

K = 10
TARGET = 1e-3
TOLS = {
    "lanczos": [1e-2, 1e-3, 1e-4, 1e-6],
    "nystrom": [1e-1, 3e-2, 1e-2, 1e-3],
    "power": [1e-2, 1e-3, 1e-4, 1e-5],
}


def build_operator(seed: int = 0, hidden: int = 32) -> HessianOperator:
    """The Hessian of a float64 64-``hidden``-10 tanh MLP trained 2 epochs on digits.

    The operator averages the loss over the first 512 training samples.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype("float64")
    y = digits.target.astype("int64")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,), dtype="float64"),
            keras.layers.Dense(hidden, activation="tanh", dtype="float64"),
            keras.layers.Dense(10, activation="softmax", dtype="float64"),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    model.fit(x[:1280], y[:1280], epochs=2, batch_size=32, verbose=0)
    acc = model.evaluate(x[1280:], y[1280:], verbose=0)[1]
    print(f"MLP: {model.count_params()} parameters, test accuracy after 2 epochs {acc:.3f}")
    return HessianOperator(model, loss, x[:512], y[:512], batch_size=512)


def main() -> dict:
    op = build_operator()
    start = time.perf_counter()
    dense = op.to_dense()
    oracle = np.linalg.eigvalsh(0.5 * (dense + dense.T))[::-1]
    print(
        f"dense oracle: dim {op.dim}, {time.perf_counter() - start:.1f}s; "
        f"top-{K}: {np.array2string(oracle[:K], precision=4)}; min {oracle[-1]:.3g}"
    )
    by_magnitude = oracle[np.argsort(-np.abs(oracle))][:K]
    same_set = np.allclose(np.sort(by_magnitude), np.sort(oracle[:K]))
    print(f"top-{K} algebraic == top-{K} by magnitude: {same_set}")

    rows = []
    for method, tols in TOLS.items():
        for tol in tols:
            op.reset_counter()
            t0 = time.perf_counter()
            kwargs = {"max_iters": 300} if method == "power" else {}
            result = top_eigenpairs(op, K, method=method, tol=tol, seed=0, **kwargs)
            seconds = time.perf_counter() - t0
            err = float(np.max(np.abs(result.eigenvalues - oracle[:K]) / np.abs(oracle[:K])))
            rows.append(
                {
                    "method": method,
                    "tol": tol,
                    "matvecs": result.num_matvecs,
                    "max_rel_err": err,
                    "converged": result.converged,
                    "seconds": seconds,
                }
            )

    # Oracle-stopped Lanczos: the smallest Krylov dimension that is accurate enough.
    op.reset_counter()
    oracle_stop = {}

    def accurate(alphas, betas, broke):
        if len(alphas) < K:
            return False
        t = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
        ritz = np.linalg.eigvalsh(t)[::-1][:K]
        oracle_stop["err"] = float(np.max(np.abs(ritz - oracle[:K]) / np.abs(oracle[:K])))
        return oracle_stop["err"] < TARGET

    rng = np.random.default_rng(0)
    lanczos(op, rng.standard_normal(op.dim), min(op.dim, 300), stop=accurate)
    oracle_stop["matvecs"] = op.num_matvecs

    print(
        f"\n{'method':<8} {'tol':>7} {'matvecs':>8} {'max rel err':>12} {'conv':>5} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['method']:<8} {r['tol']:>7.0e} {r['matvecs']:>8d} {r['max_rel_err']:>12.2e} "
            f"{r['converged']!s:>5} {r['seconds']:>8.2f}"
        )
    summary = {}
    for method in TOLS:
        ok = [r["matvecs"] for r in rows if r["method"] == method and r["max_rel_err"] < TARGET]
        summary[method] = min(ok) if ok else None
    print(f"\nmatvecs for top-{K} at {TARGET:g} relative accuracy (cheapest tol that reaches it):")
    for method, count in summary.items():
        print(f"  {method:<8} {count if count is not None else 'not reached'}")
    print(f"  lanczos, oracle-stopped: {oracle_stop['matvecs']} (err {oracle_stop['err']:.1e})")

    report = {
        "dim": op.dim,
        "k": K,
        "target": TARGET,
        "oracle_top": oracle[:K].tolist(),
        "oracle_min": float(oracle[-1]),
        "runs": rows,
        "matvecs_at_target": summary,
        "lanczos_oracle_stopped": oracle_stop,
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "eigensolvers.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'eigensolvers.json'}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
