"""The arena's contestants: every optimizer of the package and Keras's baselines.

Each entry builds the optimizer at a learning rate (the grid's variable) and a seed
(probe and label draws); everything else stays at the optimizer's defaults, so the arena
measures what a user gets from ``keras_curv.X(learning_rate=...)``. The grid centre is
the optimizer's default rate; the grid spans a decade each way in half-decade steps.
The full-batch solvers and SketchySGD have no rate to tune (a line search, a trust
region or SketchySGD's automatic step size picks the step): they run once per seed at
their defaults and say so (``lr: none``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras

import keras_curv

GRID_EXPONENTS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Contestant:
    """One optimizer configuration of the arena.

    Attributes:
        name: Key in :func:`contestants`.
        description: One line for the docs.
        default_rate: Centre of the learning-rate grid (``None``: no rate, run once).
        build: ``build(learning_rate, seed)`` returns a fresh optimizer.
        needs_classes: Runs only on classification workloads (class-subspace methods).
        full_batch: A full-batch solver: runs only on full-batch workloads, one batch
            of the whole training set per step.
    """

    name: str
    description: str
    default_rate: float | None
    build: Callable[[float | None, int], keras.optimizers.Optimizer]
    needs_classes: bool = False
    full_batch: bool = False

    def grid(self, exponents=GRID_EXPONENTS) -> list[float | None]:
        """The learning rates tried: ``default_rate * 10**e`` for each exponent."""
        if self.default_rate is None:
            return [None]
        return [float(f"{self.default_rate * 10.0**e:.3g}") for e in exponents]


def _csn(curvature: str, **kwargs) -> Callable:
    return lambda lr, seed: keras_curv.ClassSubspaceNewton(lr, curvature=curvature, **kwargs)


def contestants() -> dict[str, Contestant]:
    """Every contestant, by name."""
    k = keras_curv
    entries = [
        Contestant("sgd", "keras SGD", 0.1, lambda lr, s: keras.optimizers.SGD(lr)),
        Contestant(
            "sgd_momentum", "keras SGD, momentum 0.9", 0.03,
            lambda lr, s: keras.optimizers.SGD(lr, momentum=0.9),
        ),
        Contestant("adam", "keras Adam", 1e-3, lambda lr, s: keras.optimizers.Adam(lr)),
        Contestant(
            "adamw", "keras AdamW (weight decay 0.004, Keras's default)", 1e-3,
            lambda lr, s: keras.optimizers.AdamW(lr),
        ),
        Contestant(
            "adahessian", "AdaHessian (package defaults)", 0.15,
            lambda lr, s: k.AdaHessian(lr, seed=s),
        ),
        Contestant(
            "sophia_h", "Sophia-H (Hutchinson estimator)", 1e-3,
            lambda lr, s: k.Sophia(lr, estimator="hutchinson", seed=s),
        ),
        Contestant(
            "sophia_g", "Sophia-G (Gauss-Newton-Bartlett estimator)", 1e-3,
            lambda lr, s: k.Sophia(lr, estimator="gauss_newton_bartlett", seed=s),
        ),
        Contestant("shampoo", "Shampoo (package defaults)", 1e-3, lambda lr, s: k.Shampoo(lr)),
        Contestant("kfac", "K-FAC (package defaults)", 0.1, lambda lr, s: k.KFAC(lr, seed=s)),
        Contestant(
            "sketchy_sgd", "SketchySGD (package defaults: automatic step size)", None,
            lambda lr, s: k.SketchySGD(seed=s),
        ),
        Contestant(
            "osgm", "OSGM (package defaults; the rate is the online learner's)", 1e-3,
            lambda lr, s: k.OSGM(lr),
        ),
        Contestant(
            "lookahead_adam", "Lookahead around keras Adam (k=5, alpha=0.5)", 1e-3,
            lambda lr, s: k.Lookahead(keras.optimizers.Adam(lr)),
        ),
        Contestant(
            "csn_default", "ClassSubspaceNewton at its defaults", 0.1,
            lambda lr, s: k.ClassSubspaceNewton(lr), needs_classes=True,
        ),
        Contestant(
            "csn_paper", 'ClassSubspaceNewton, curvature="paper" (eq. 15-17 exactly)', 0.1,
            _csn("paper"), needs_classes=True,
        ),
        Contestant(
            "csn_gauss_newton", 'ClassSubspaceNewton, curvature="gauss_newton"', 0.1,
            _csn("gauss_newton"), needs_classes=True,
        ),
        Contestant(
            "csn_projected_newton", 'ClassSubspaceNewton, curvature="projected_newton"', 0.1,
            _csn("projected_newton"), needs_classes=True,
        ),
        Contestant(
            "csn_eigen",
            'ClassSubspaceNewton, directions="eigen": Newton in the top-C Gauss-Newton eigenspace',
            0.1, lambda lr, s: k.ClassSubspaceNewton(lr, directions="eigen"), needs_classes=True,
        ),
        Contestant(
            "lbfgs", "L-BFGS (strong-Wolfe line search)", None,
            lambda lr, s: k.LBFGS(), full_batch=True,
        ),
        Contestant(
            "newton_cg", "Newton-CG (truncated CG on the Hessian)", None,
            lambda lr, s: k.NewtonCG(), full_batch=True,
        ),
        Contestant(
            "nys_newton_cg", "NysNewton-CG (Nystrom-preconditioned CG)", None,
            lambda lr, s: k.NysNewtonCG(seed=s), full_batch=True,
        ),
    ]  # fmt: skip
    return {c.name: c for c in entries}
