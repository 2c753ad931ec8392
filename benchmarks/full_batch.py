"""The full-batch solvers: iteration counts beside scipy's, CG savings, step cost in ``fit``.

Rows:

* ``quadratic``: the reference text's 10-D quadratic (κ = 1000, θ₀ = 1): iterations to
  ``max |g| ≤ 1e-8`` for ``keras_curv.minimize`` (L-BFGS with c2 = 0.9 and 0.1,
  Newton-CG) beside scipy's L-BFGS-B and BFGS, and the reference's own unit-step
  L-BFGS script;
* ``outliers``: CG iterations of one Newton step on a 200-D quadratic with 10 outlying
  eigenvalues, plain and Nyström-preconditioned (rank 10, 15, 20; 3 sketch seeds);
* ``digits``: l2-regularised softmax regression on all 1,797 digits in float64: the
  loss each method reaches, its gap to scipy's optimum, iterations, evaluations,
  Hessian-vector products and seconds, beside scipy's L-BFGS-B and trust-ncg;
* ``step_cost``: seconds per ``fit`` step on a full batch of 512 digits
  (``keras_curv.models.mlp``, 64-64-10), as a ratio to Adam and SGD, fastest of
  ``--repeats`` interleaved epochs of 25 steps (steps 26-50 of training, each epoch from
  the same weights), with each method's mean evaluations and products per step.

Usage: ``PYTHONPATH=. python -m benchmarks.full_batch [--quick]``; writes
``benchmarks/results/full_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
import tensorflow as tf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lbfgs", "newton_cg", "nys_newton_cg", "levenberg_marquardt")


def _least_squares(eigenvalues, start, seed=42):
    """``½ θᵀAθ`` as a bias-free Dense layer with MSE (float64), from ``start``."""
    lam = np.asarray(eigenvalues, float)
    n = lam.size
    q, _ = np.linalg.qr(np.random.RandomState(seed).randn(n, n))
    x = np.sqrt(n / 2.0) * (q * np.sqrt(lam)) @ q.T
    model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(loss="mse")
    model.set_weights([np.asarray(start, float).reshape(n, 1)])
    return model, x, np.zeros((n, 1)), (q * lam) @ q.T


def _reference_script(a, steps=50):
    """The reference text's L-BFGS loop (unit steps, memory 10): iterations or None."""
    from tests.optimizers._full_batch_numpy import two_loop

    x, s_hist, y_hist = np.ones(a.shape[0]), [], []
    for step in range(steps):
        g = a @ x
        if np.linalg.norm(g) < 1e-10:
            return step
        new = x - two_loop(g, s_hist, y_hist)
        s_hist, y_hist = (s_hist + [new - x])[-10:], (y_hist + [a @ new - g])[-10:]
        x = new
    return None


def quadratic() -> dict:
    from keras_curv.optimizers import LBFGS, NewtonCG, minimize

    lam = np.logspace(0, 3, 10)
    rows = {}
    for name, solver in [
        ("LBFGS (c2=0.9, default)", LBFGS()),
        ("LBFGS (c2=0.1)", LBFGS(c2=0.1)),
        ("NewtonCG (damping 0)", NewtonCG(damping=0.0, adapt_damping=False, cg_tolerance=1e-12)),
    ]:
        model, x, y, a = _least_squares(lam, np.ones(10))
        result = minimize(model, x, y, method=solver, tolerance=1e-8, max_iterations=500,
                          verbose=0)  # fmt: skip
        rows[name] = {
            "iterations": result.iterations,
            "function_evaluations": int(sum(result.history["function_evaluations"])),
            "cg_iterations": int(sum(result.history["cg_iterations"])),
            "converged": result.converged,
        }
    for method in ("L-BFGS-B", "BFGS"):
        options = {"gtol": 1e-8, "maxiter": 1000}
        if method == "L-BFGS-B":
            options.update(ftol=0.0, maxcor=10)
        r = scipy.optimize.minimize(lambda w: (0.5 * w @ a @ w, a @ w), np.ones(10), jac=True,
                                    method=method, options=options)  # fmt: skip
        rows[f"scipy {method}"] = {"iterations": int(r.nit), "function_evaluations": int(r.nfev),
                                   "converged": bool(r.success)}  # fmt: skip
    rows["reference script (unit steps, 50 max)"] = {"iterations": _reference_script(a)}
    return rows


def outliers() -> dict:
    from keras_curv.optimizers import NewtonCG, NysNewtonCG, minimize

    lam = np.concatenate([np.logspace(3, 5, 10), np.linspace(1.0, 2.0, 190)])
    start = np.random.default_rng(0).normal(size=200)
    common = {"cg_tolerance": 1e-8, "max_cg_iterations": 400}
    rows = {}
    variants = [("CG", 0, NewtonCG(damping=1e-4, adapt_damping=False, **common))]
    variants += [(f"Nyström PCG rank {r}", s, NysNewtonCG(rank=r, mu=1e-4, seed=s, **common))
                 for r in (10, 15, 20) for s in range(3)]  # fmt: skip
    for name, _, solver in variants:
        model, x, y, _ = _least_squares(lam, start)
        result = minimize(model, x, y, method=solver, max_iterations=1, verbose=0)
        row = rows.setdefault(name, {"cg_iterations": [], "hessian_vector_products": []})
        row["cg_iterations"].append(int(result.history["cg_iterations"][0]))
        row["hessian_vector_products"].append(int(result.history["hessian_vector_products"][0]))
    return rows


def digits(max_train: int | None = None) -> dict:
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits

    from keras_curv.optimizers import minimize
    from tests.optimizers._full_batch_numpy import SoftmaxRegression, scipy_lbfgsb
    from tests.optimizers.test_solve import _softmax_regression

    data = load_digits()
    x, y = data.data[:max_train] / 16.0, data.target[:max_train]
    l2 = 2.0**-10
    problem = SoftmaxRegression(x, y, 10, l2)
    rows = {}
    start = time.perf_counter()
    lbfgsb = scipy_lbfgsb(problem, 650)
    rows["scipy L-BFGS-B"] = {
        "loss": lbfgsb.fun,
        "iterations": int(lbfgsb.nit),
        "function_evaluations": int(lbfgsb.nfev),
        "seconds": time.perf_counter() - start,
    }
    with threadpool_limits(1):
        start = time.perf_counter()
        newton = scipy.optimize.minimize(
            problem.value_and_gradient,
            np.zeros(650),
            jac=True,
            hessp=problem.hessian_vector_product,
            method="trust-ncg",
            options={"gtol": 1e-8},
        )
        rows["scipy trust-ncg"] = {"loss": newton.fun, "iterations": int(newton.nit),
                                   "function_evaluations": int(newton.nfev),
                                   "hessian_vector_products": int(newton.nhev),
                                   "seconds": time.perf_counter() - start}  # fmt: skip
    optimum = min(lbfgsb.fun, newton.fun)
    for method in METHODS:
        model = _softmax_regression(x, y, l2)
        start = time.perf_counter()
        result = minimize(model, x, y, method=method, max_iterations=400, tolerance=1e-8,
                          verbose=0)  # fmt: skip
        rows[method] = {
            "loss": result.loss,
            "iterations": result.iterations,
            "function_evaluations": int(sum(result.history["function_evaluations"])),
            "hessian_vector_products": int(sum(result.history["hessian_vector_products"])),
            "seconds": time.perf_counter() - start,
            "message": result.message,
        }
    for row in rows.values():
        row["relative_gap"] = (row["loss"] - optimum) / optimum
    return {"num_samples": len(y), "l2": l2, "rows": rows}


WORK = ("function_evaluations", "cg_iterations", "hessian_vector_products")


class _Work(keras.callbacks.Callback):
    """Appends each step's work (a full-batch optimizer's statistics) to ``rows``."""

    def __init__(self, rows: list):
        super().__init__()
        self.rows = rows

    def on_train_batch_end(self, batch, logs=None):
        summary = getattr(self.model.optimizer, "curvature_summary", None)
        if summary is not None:
            values = summary()
            self.rows.append([float(values[key]) for key in WORK])


def step_cost(repeats: int, steps: int = 25) -> dict:
    from benchmarks.optimizer_cost import compiled
    from keras_curv.data import load_dataset
    from keras_curv.models import mlp
    from keras_curv.optimizers import LBFGS, LevenbergMarquardt, NewtonCG, NysNewtonCG

    data = load_dataset("digits", max_train=512)
    # The same full batch `steps` times per epoch: a fixed batch, and an epoch long
    # enough that fit's per-call overhead does not dominate.
    x, y = np.tile(data.x_train, (steps, 1, 1, 1)), np.tile(data.y_train, steps)
    batch = len(data.x_train)
    variants = {
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "sgd": lambda: keras.optimizers.SGD(0.1),
        "lbfgs": LBFGS,
        "newton_cg": NewtonCG,
        "nys_newton_cg": NysNewtonCG,
        "levenberg_marquardt": LevenbergMarquardt,
    }
    models = {name: compiled(lambda: mlp(data.input_shape, 10), make, x, y, batch_size=batch,
                             jit_compile=False)
              for name, make in variants.items()}  # fmt: skip
    # Interleaved rounds, the fastest epoch of each (as benchmarks.optimizer_cost), with
    # the same per-step callback for all, recording the full-batch methods' work. Every
    # timed epoch restarts from the weights after the warm-up epoch (the optimizer state
    # carries over): otherwise the later epochs time steps at an interpolated optimum
    # (loss 0 on 512 digits), where the line searches only fail.
    start = {name: model.get_weights() for name, model in models.items()}
    best = {name: float("inf") for name in models}
    work = {name: [] for name in models}
    losses = {}
    for _ in range(repeats):
        for name, model in models.items():
            model.set_weights(start[name])
            begin = time.perf_counter()
            history = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                                callbacks=[_Work(work[name])])  # fmt: skip
            best[name] = min(best[name], (time.perf_counter() - begin) / steps)
            losses[name] = float(history.history["loss"][-1])
    rows = {}
    for name, s in best.items():
        rows[name] = {"s_per_step": s, "ratio_to_adam": s / best["adam"],
                      "ratio_to_sgd": s / best["sgd"], "last_epoch_loss": losses[name]}  # fmt: skip
        if work[name]:  # mean and largest work per timed step
            table = np.asarray(work[name])
            rows[name].update({f"mean_{key}": float(table[:, i].mean()) for i, key in
                               enumerate(WORK)})  # fmt: skip
            rows[name].update({f"max_{key}": float(table[:, i].max()) for i, key in
                               enumerate(WORK)})  # fmt: skip
    return {"batch_size": batch, "steps_per_epoch": steps, "timed_steps": steps * repeats,
            "rows": rows}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller digits set, fewer repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "full_batch.json"))
    args = parser.parse_args(argv)
    # floatx and the policy: Keras fixes the global policy at the first layer it makes.
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    report = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "mode": "quick" if args.quick else "default",
        "quadratic": quadratic(),
        "outliers": outliers(),
        "digits": digits(max_train=300 if args.quick else None),
    }
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    report["step_cost"] = step_cost(2 if args.quick else args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("quadratic", "step_cost")}, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
