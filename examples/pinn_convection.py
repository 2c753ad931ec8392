"""A physics-informed network for 1-D convection, trained Adam → L-BFGS → NysNewton-CG.

The problem of Rathore, Lei, Frangella, Lu & Udell (2024), "Challenges in training
PINNs: a loss landscape perspective":

    u_t + β u_x = 0,  x ∈ [0, 2π], t ∈ [0, 1],  u(x, 0) = sin x,  u(0, t) = u(2π, t),

whose solution is u = sin(x − βt). A tanh MLP u_θ(x, t) is fitted to the residual on
random collocation points plus the initial and periodic boundary conditions,

    L(θ) = mean (∂_t u_θ + β ∂_x u_θ)² + mean (u_θ(x, 0) − sin x)²
           + mean (u_θ(0, t) − u_θ(2π, t))²,

with the derivatives by ``tf.GradientTape`` with respect to the inputs, in three
stages: Adam, then ``keras_curv.minimize(method=LBFGS())``, then
``keras_curv.minimize(method=NysNewtonCG())`` on the Hessian (the authors' recipe);
from the same point also NysNewton-CG on the Gauss–Newton matrix ``2JᵀJ`` of the
scaled residuals (``minimize(residuals=...)``), and, as a control, L-BFGS continued
for as long as NysNewton-CG took. Each stage reports the loss, the full-batch
gradient norm and the relative L2 error against the exact solution on a 256 × 100
grid; at the start of NysNewton-CG the script estimates the spectral density of the
loss Hessian by stochastic Lanczos quadrature, before and after the rank-r Nyström
preconditioning (P^(-1/2) H P^(-1/2)).

Writes ``pinn_convection.json``, ``pinn_convection_loss.png`` (loss per iteration
over the three stages) and ``pinn_convection_spectrum.png``. ``--smoke`` runs a tiny
version in seconds; the defaults are the documented run (``docs/full_batch.md``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import _common


def _arguments(argv: Sequence[str] | None):
    p = _common.parser(__doc__.splitlines()[0], epochs=1, smoke_epochs=1)
    p.add_argument("--beta", type=float, default=None, help="convection speed (default 40)")
    p.add_argument("--width", type=int, default=None, help="hidden width (default 50)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (default 3)")
    p.add_argument("--points", type=int, default=None, help="collocation points (2000)")
    p.add_argument("--adam-iterations", type=int, default=None, help="default 1000")
    p.add_argument("--lbfgs-iterations", type=int, default=None, help="default 20000")
    p.add_argument("--nncg-iterations", type=int, default=None, help="default 200")
    p.add_argument("--rank", type=int, default=10, help="Nyström rank (the authors' 10)")
    p.add_argument("--mu", type=float, default=1e-4, help="NysNewton-CG damping (1e-4)")
    p.add_argument("--lanczos-steps", type=int, default=None, help="SLQ steps (default 80)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = _common.parse(p, argv)
    full = {
        "beta": 40.0,
        "width": 50,
        "depth": 3,
        "points": 2000,
        "adam_iterations": 1000,
        "lbfgs_iterations": 20000,
        "nncg_iterations": 200,
        "lanczos_steps": 80,
    }
    smoke = {"beta": 5.0, "width": 12, "depth": 2, "points": 128, "adam_iterations": 40,
             "lbfgs_iterations": 15, "nncg_iterations": 3, "lanczos_steps": 12}  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_curv
    from keras_curv.curvature import spectral_density
    from keras_curv.curvature.nystrom import PreconditionedOperator, randomized_nystrom
    from keras_curv.optimizers import FullBatchObjective

    dtype = args.dtype
    keras.config.set_floatx(dtype)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    beta, two_pi = args.beta, 2.0 * math.pi

    # Collocation points (x, t), initial points (x, 0), boundary pairs (0, t), (2π, t).
    points = np.stack([rng.uniform(0, two_pi, args.points), rng.uniform(0, 1, args.points)], 1)
    points = points.astype(dtype)  # input derivatives come in the inputs' dtype
    edge = max(args.points // 8, 16)
    x0 = np.linspace(0, two_pi, edge)
    initial = tf.constant(np.stack([x0, np.zeros(edge)], 1), dtype)
    initial_u = tf.constant(np.sin(x0)[:, None], dtype)
    tb = np.linspace(0, 1, edge)
    left = tf.constant(np.stack([np.zeros(edge), tb], 1), dtype)
    right = tf.constant(np.stack([np.full(edge, two_pi), tb], 1), dtype)
    gx, gt = np.meshgrid(np.linspace(0, two_pi, 256), np.linspace(0, 1, 100))
    grid = tf.constant(np.stack([gx.ravel(), gt.ravel()], 1), dtype)
    exact = np.sin(gx.ravel() - beta * gt.ravel())

    layers = [keras.Input((2,))]
    layers += [keras.layers.Dense(args.width, activation="tanh") for _ in range(args.depth)]
    model = keras.Sequential([*layers, keras.layers.Dense(1)])

    scale = [tf.constant(1.0 / math.sqrt(n), dtype) for n in (args.points, edge, edge)]

    def pinn_residuals(model: keras.Model, x: Any, _: Any) -> tf.Tensor:
        """Scaled residuals r: ‖r‖² is the loss (three mean squares), 2JᵀJ its Gauss–Newton."""
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = model(x)
        du = tape.gradient(u, x)
        pde = du[:, 1] + beta * du[:, 0]
        start = model(initial)[:, 0] - initial_u[:, 0]
        periodic = model(left)[:, 0] - model(right)[:, 0]
        return tf.concat([scale[0] * pde, scale[1] * start, scale[2] * periodic], 0)

    def pinn_loss(model: keras.Model, x: Any, _: Any) -> tf.Tensor:
        return tf.reduce_sum(pinn_residuals(model, x, None) ** 2)

    objective = FullBatchObjective(model, points, residuals=pinn_residuals)

    def status() -> dict[str, float]:
        loss, gradient = objective.value_and_gradient(objective.weights())
        u = model.predict(grid, batch_size=8192, verbose=0)[:, 0]
        error = float(np.linalg.norm(u - exact) / np.linalg.norm(exact))
        return {"loss": float(loss), "gradient_norm": float(tf.norm(gradient)), "l2re": error}

    curve: list[float] = []
    stages: dict[str, dict[str, Any]] = {"initial": status()}

    # Stage 1: Adam, full batch, on the same objective (a tf.function step).
    adam = keras.optimizers.Adam(1e-3)
    data = tf.constant(points, dtype)

    @tf.function
    def adam_step():
        with tf.GradientTape() as tape:
            loss = pinn_loss(model, data, None)
        adam.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                 model.trainable_variables))  # fmt: skip
        return loss

    start = time.perf_counter()
    for _ in range(args.adam_iterations):
        curve.append(float(adam_step()))
    stages["adam"] = {**status(), "iterations": args.adam_iterations,
                      "seconds": time.perf_counter() - start}  # fmt: skip

    def run(method: Any, iterations: int, verbose: int) -> tuple[Any, dict[str, Any]]:
        start = time.perf_counter()
        result = keras_curv.minimize(model, points, residuals=pinn_residuals, method=method,
                                     max_iterations=iterations, tolerance=0.0,
                                     verbose=0 if args.smoke else verbose)  # fmt: skip
        totals = ("function_evaluations", "cg_iterations", "hessian_vector_products")
        return result, {
            **status(),
            "iterations": result.iterations,
            "message": result.message,
            "seconds": time.perf_counter() - start,
            **{key: sum(result.history[key]) for key in totals},
        }

    # Stage 2: L-BFGS (memory 10, strong Wolfe), until it stops.
    lbfgs, stages["lbfgs"] = run("lbfgs", args.lbfgs_iterations, verbose=2)
    curve.extend(lbfgs.history["loss"])

    lbfgs_end = objective.weights()

    # The loss Hessian where NysNewton-CG starts, before and after preconditioning.
    start = time.perf_counter()
    hessian = objective.operator()
    steps = min(args.lanczos_steps, hessian.dim)
    before = spectral_density(hessian, num_steps=steps, num_probes=2, seed=args.seed)
    approximation = randomized_nystrom(hessian, args.rank, seed=args.seed)
    after = spectral_density(PreconditionedOperator(hessian, approximation, args.mu),
                             num_steps=steps, num_probes=2, seed=args.seed)  # fmt: skip
    spectrum_seconds = time.perf_counter() - start

    # Stage 3: NysNewton-CG (rank 10, μ = 1e-4, Armijo), the authors' defaults, on the
    # Hessian; and, from the same point, on the Gauss–Newton matrix 2JᵀJ of the residuals
    # (positive semi-definite: no negative curvature to stop CG).
    solver = keras_curv.NysNewtonCG(rank=args.rank, mu=args.mu, seed=args.seed)
    nncg, stages["nys_newton_cg"] = run(solver, args.nncg_iterations, verbose=2)
    curve.extend(nncg.history["loss"])
    nncg_weights = model.get_weights()
    objective.assign(lbfgs_end)
    solver = keras_curv.NysNewtonCG(rank=args.rank, mu=args.mu, seed=args.seed, curvature="ggn")
    nncg_ggn, stages["nys_newton_cg_ggn"] = run(solver, args.nncg_iterations, verbose=2)

    # The control: L-BFGS continued (same memory) from where NysNewton-CG started, for
    # as much time as NysNewton-CG took. Does the second-order method beat more L-BFGS?
    objective.assign(lbfgs_end)
    per_iteration = stages["lbfgs"]["seconds"] / max(stages["lbfgs"]["iterations"], 1)
    budget = max(int(stages["nys_newton_cg"]["seconds"] / per_iteration), 1)
    _, stages["lbfgs_continued"] = run(lbfgs.solver, budget, verbose=0)
    model.set_weights(nncg_weights)

    def summary(density) -> dict[str, Any]:
        # Ritz values of the SLQ rules: the ends of the spectrum (the bulk sits near 0).
        nodes = density.nodes[density.weights > 0]
        largest = float(nodes.max())
        return {
            "largest": largest,
            "smallest": float(nodes.min()),
            # κ of the damped system H + μI CG solves, with the bulk at about μ.
            "damped_condition": (largest + args.mu) / args.mu,
        }

    spectrum = {"before": summary(before), "after": summary(after),
                "nystrom_eigenvalues": approximation.eigenvalues.numpy(),
                "seconds": spectrum_seconds}  # fmt: skip
    lbfgs_stalled = stages["lbfgs"]["iterations"] < args.lbfgs_iterations
    payload = {
        "num_params": objective.dim,
        "stages": stages,
        "spectrum": spectrum,
        "lbfgs_stopped_early": lbfgs_stalled,
        "nncg_lowered_loss": stages["nys_newton_cg"]["loss"] < stages["lbfgs"]["loss"],
        "nncg_beat_lbfgs_continued": (
            stages["nys_newton_cg"]["loss"] < stages["lbfgs_continued"]["loss"]
        ),
        "loss_curve": curve,
        "nncg_history": nncg.history,
        "nncg_ggn_curve": nncg_ggn.history["loss"],
        "nncg_ggn_history": nncg_ggn.history,
        "stage_ends": [args.adam_iterations, args.adam_iterations + lbfgs.iterations],
    }
    _common.write_json(args, "pinn_convection.json", payload)
    _figures(args, payload, before, after)
    print(f"PINN convection β={beta:g}, {objective.dim} parameters{_common.mode_label(args)}")
    for name, stage in stages.items():
        print(f"  {name:14s} loss {stage['loss']:.3e}  |g| {stage['gradient_norm']:.2e}  "
              f"L2RE {stage['l2re']:.3e}")  # fmt: skip
    print(f"  L-BFGS: {stages['lbfgs']['message']}; NysNewton-CG: {nncg.message}")
    print(f"  Hessian λ_max {spectrum['before']['largest']:.3g} before, "
          f"{spectrum['after']['largest']:.3g} after preconditioning")  # fmt: skip
    return 0


def _figures(args, payload, before, after) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    axis.semilogy(payload["loss_curve"], lw=1.0, label="Adam → L-BFGS → NysNewton-CG")
    start = payload["stage_ends"][1]
    ggn = payload["nncg_ggn_curve"]
    axis.semilogy(range(start, start + len(ggn)), ggn, lw=1.0, label="NysNewton-CG, Gauss–Newton")
    axis.legend(fontsize=8, loc="lower left")
    for end, label in zip(payload["stage_ends"], ["L-BFGS", "NysNewton-CG"]):
        axis.axvline(end, color="grey", ls="--", lw=0.8)
        axis.text(end, axis.get_ylim()[1], f" {label}", va="top", fontsize=8)
    axis.set_xlabel("iteration (Adam, then L-BFGS, then NysNewton-CG)")
    axis.set_ylabel("PINN loss")
    axis.set_title(f"1-D convection, β = {args.beta:g}{_common.mode_label(args)}")
    _common.save_figure(args, figure, "pinn_convection_loss.png")

    figure, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for axis, density, title in [(axes[0], before, "Hessian H"),
                                 (axes[1], after, "P^(-1/2) H P^(-1/2) (Nyström)")]:  # fmt: skip
        axis.semilogy(density.grid, np.maximum(density.density, 1e-12), lw=1.0)
        axis.set_ylim(1e-8, None)
        axis.set_xlabel("eigenvalue")
        axis.set_title(title, fontsize=10)
    axes[0].set_ylabel("density (SLQ)")
    figure.suptitle(f"Loss Hessian where NysNewton-CG starts{_common.mode_label(args)}")
    _common.save_figure(args, figure, "pinn_convection_spectrum.png")


if __name__ == "__main__":
    sys.exit(main())
