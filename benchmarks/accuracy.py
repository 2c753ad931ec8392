"""Estimator accuracy against a dense oracle, as a function of Hessian-vector products.

The operator is the Hessian of a small float64 tanh MLP trained briefly on digits
(:func:`benchmarks.eigensolvers.build_operator`); its dense matrix and
``numpy.linalg.eigh`` are the oracle. For each budget the suite records:

* top-10 eigenvalues (largest relative error) and eigenvectors (mean and smallest
  ``|cos|`` between the i-th estimated and the i-th oracle eigenvector) for Lanczos,
  randomized subspace iteration (``"nystrom"``) and deflated power iteration, each run
  with a tolerance too small to stop it, so the budget is its iteration cap;
* the trace (relative error) for Hutchinson and Hutch++, and the diagonal (relative
  l2 error) for Hutchinson, averaged over seeds.

Run it through the suite: ``python -m benchmarks --only accuracy``.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.eigensolvers import build_operator
from keras_curv.curvature import hutchinson_diagonal, hutchinson_trace, top_eigenpairs

K = 10
# Iteration caps: Krylov dimension (lanczos), passes of k + 10 products (nystrom),
# products per eigenvalue (power).
CAPS = {
    "lanczos": [12, 16, 20, 25, 30, 40, 60],
    "nystrom": [1, 2, 3, 4, 6, 8, 12],
    "power": [2, 4, 8, 16, 32, 64],
}
BUDGETS = [3, 6, 12, 24, 48, 96, 192, 384]


def run(hidden: int = 16, seeds: int = 5, budgets=tuple(BUDGETS), log=print) -> dict:
    """The accuracy section of the suite (see the module docstring)."""
    op = build_operator(hidden=hidden)
    start = time.perf_counter()
    dense = op.to_dense()
    dense = 0.5 * (dense + dense.T)
    values, vectors = np.linalg.eigh(dense)
    values, vectors = values[::-1], vectors[:, ::-1]
    oracle_seconds = time.perf_counter() - start
    top = values[:K]
    log(f"  oracle: dim {op.dim}, dense Hessian + eigh {oracle_seconds:.1f} s, top {top[0]:.3f}")

    eigen = {}
    for method, caps in CAPS.items():
        rows = []
        for cap in caps:
            op.reset_counter()
            result = top_eigenpairs(op, K, method=method, tol=1e-14, max_iters=cap, seed=0)
            est_vals = np.asarray(result.eigenvalues, np.float64)
            est_vecs = np.asarray(result.eigenvectors, np.float64)
            cos = np.abs(np.sum(est_vecs * vectors[:, :K], axis=0)) / (
                np.linalg.norm(est_vecs, axis=0) * np.linalg.norm(vectors[:, :K], axis=0)
            )
            rows.append(
                {
                    "hvps": op.num_matvecs,
                    "eigenvalue_max_rel_err": float(np.max(np.abs(est_vals - top) / np.abs(top))),
                    "eigenvector_mean_abs_cos": float(np.mean(cos)),
                    "eigenvector_min_abs_cos": float(np.min(cos)),
                }
            )
        eigen[method] = rows
        best = rows[-1]
        log(
            f"  {method}: {best['hvps']} HVPs -> eigenvalue error "
            f"{best['eigenvalue_max_rel_err']:.1e}, "
            f"mean |cos| {best['eigenvector_mean_abs_cos']:.3f}"
        )

    trace = float(np.trace(dense))
    diagonal = np.diag(dense)
    trace_rows = {"hutchinson": [], "hutch++": []}
    diag_rows = {"hutchinson": []}
    for budget in budgets:
        for method, rows in trace_rows.items():
            errs = [
                abs(float(hutchinson_trace(op, budget, seed=s, method=method)) - trace) / abs(trace)
                for s in range(seeds)
            ]
            rows.append({"hvps": budget, "rel_err": float(np.mean(errs))})
        errs = [
            np.linalg.norm(np.asarray(hutchinson_diagonal(op, budget, seed=s)) - diagonal)
            / np.linalg.norm(diagonal)
            for s in range(seeds)
        ]
        diag_rows["hutchinson"].append({"hvps": budget, "rel_err": float(np.mean(errs))})
    log(
        f"  trace at {budgets[-1]} HVPs: Hutchinson {trace_rows['hutchinson'][-1]['rel_err']:.1e}, "
        f"Hutch++ {trace_rows['hutch++'][-1]['rel_err']:.1e}; diagonal "
        f"{diag_rows['hutchinson'][-1]['rel_err']:.2f}"
    )
    return {
        "dim": op.dim,
        "hidden": hidden,
        "k": K,
        "oracle_seconds": oracle_seconds,
        "oracle_top": top.tolist(),
        "oracle_min": float(values[-1]),
        "oracle_trace": trace,
        "eigen": eigen,
        "trace": trace_rows,
        "diagonal": diag_rows,
        "seeds": seeds,
    }
