"""Hessian-free Newton: Newton-CG, NysNewton-CG and Levenberg–Marquardt.

All three solve a damped Newton system ``(C + λI) d = −g`` by conjugate gradients on
curvature-vector products (``C`` the Hessian or the Gauss–Newton matrix), never
forming ``C``. The math is in :mod:`~keras_curv.optimizers.full_batch_math` and
:mod:`~keras_curv.curvature.nystrom`; ``docs/full_batch.md`` explains the choices.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import validation
from keras_curv._internal.keras_privates import track_optimizer_variable
from keras_curv._internal.numerics import exact_cast
from keras_curv.curvature.nystrom import nystrom_approximation, nystrom_inverse
from keras_curv.optimizers import distribute
from keras_curv.optimizers import full_batch_math as fbm
from keras_curv.optimizers.full_batch import FullBatchOptimizer, StepOutcome

CURVATURES = ("hessian", "ggn")


def _curvature_product(problem: Any, curvature: str):
    if curvature == "hessian":
        return problem.hessian_vector_product
    return problem.gauss_newton_vector_product


@keras.saving.register_keras_serializable(package="keras_curv")
class NewtonCG(FullBatchOptimizer):
    """Truncated Newton (Hessian-free, Martens 2010) with an Armijo line search.

    With ``C`` the Hessian (``curvature="hessian"``) or the Gauss–Newton matrix
    (``"ggn"``, positive semi-definite), known only through products:

    ```
    d ≈ −(C + λI)⁻¹ g      CG, stopped at ‖r‖ ≤ cg_tolerance ‖g‖, on pᵀ(C + λI)p ≤ 0,
                           or after max_cg_iterations; d = −g if it is no descent direction
    t = t₀ βʲ: the first with f(θ + t d) ≤ f + c1 t gᵀd      (t₀ = learning_rate)
    ρ = (f(θ + t d) − f) / (t gᵀd + ½ t² dᵀC d)
    λ ← 3/2 λ if ρ < 1/4,  2/3 λ if ρ > 3/4                    (adapt_damping)
    ```

    With ``damping=0`` and ``adapt_damping=False`` it is Newton's method (exact on a
    quadratic in at most ``n`` CG iterations). For a fixed full batch; on changing
    batches it warns once.

    Args:
        learning_rate: First trial step ``t₀`` (default 1, the Newton step).
        curvature: ``"hessian"`` or ``"ggn"``.
        damping: Initial ``λ ≥ 0``.
        adapt_damping: Adapt ``λ`` from ``ρ``.
        min_damping: Lower bound of the adapted ``λ``.
        max_damping: Upper bound of the adapted ``λ``.
        cg_tolerance: Relative residual at which CG stops, in ``(0, 1)``.
        max_cg_iterations: Most CG iterations per step (int ≥ 1).
        warm_start: Start CG from the previous step's solution.
        c1: Armijo constant, in ``(0, 1)``.
        backtracking: Step shrink factor ``β``, in ``(0, 1)``.
        max_evaluations: Loss evaluations per line search (int ≥ 1).
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay`` and clipping are refused).

    Example:
        >>> model.compile(optimizer=keras_curv.NewtonCG(curvature="ggn"), loss="mse")
        >>> model.fit(x, y, batch_size=len(x), epochs=20)
    """

    STATISTICS = ("damping", "cg_residual", "negative_curvature")

    def __init__(
        self,
        learning_rate: Any = 1.0,
        curvature: str = "hessian",
        damping: float = 1e-3,
        adapt_damping: bool = True,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        cg_tolerance: float = 0.1,
        max_cg_iterations: int = 50,
        warm_start: bool = False,
        c1: float = 1e-4,
        backtracking: float = 0.5,
        max_evaluations: int = 20,
        name: str = "newton_cg",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.curvature = validation.choice(curvature, "curvature", CURVATURES)
        self.damping = validation.non_negative(damping, "damping")
        self.adapt_damping = bool(adapt_damping)
        self.min_damping = validation.non_negative(min_damping, "min_damping")
        self.max_damping = validation.number(max_damping, "max_damping", low=self.min_damping)
        self.cg_tolerance = validation.number(
            cg_tolerance, "cg_tolerance", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.max_cg_iterations = validation.integer(
            max_cg_iterations, "max_cg_iterations", minimum=1
        )
        self.warm_start = bool(warm_start)
        self.c1 = validation.number(c1, "c1", low=0.0, high=1.0, low_open=True, high_open=True)
        self.backtracking = validation.number(
            backtracking, "backtracking", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.max_evaluations = validation.integer(max_evaluations, "max_evaluations", minimum=1)

    def build_state(self, dim: int, dtype: tf.DType) -> dict[str, Any]:
        """``λ`` and the previous CG solution (the warm start)."""
        return {
            "damping": self.state_variable((), dtype, "damping", value=self.damping),
            "previous": self.state_variable((dim,), dtype, "previous_solution"),
        }

    # --------------------------------------------------------------- the step

    def preconditioner(self, problem, w, state) -> tuple[Any, dict, tf.Tensor]:
        """``(r -> M⁻¹ r or None, new state, extra products)``; none for plain Newton-CG."""
        return None, {}, tf.zeros([], tf.int32)

    def solve(self, problem, w, loss, gradient) -> StepOutcome:
        """CG on the damped system, Armijo backtracking, damping adaptation."""
        state = {k: tf.convert_to_tensor(v) for k, v in self._state.items()}
        dtype = gradient.dtype
        damping = state["damping"]
        product = _curvature_product(problem, self.curvature)
        precondition, extra_state, extra_products = self.preconditioner(problem, w, state)
        solution = fbm.conjugate_gradient(
            lambda v: product(w, v) + damping * v,
            -gradient,
            tolerance=self.cg_tolerance,
            max_iterations=self.max_cg_iterations,
            initial=state["previous"] if self.warm_start else None,
            preconditioner=precondition,
        )
        direction = solution.solution
        slope = tf.reduce_sum(gradient * direction)
        descent = tf.logical_and(slope < 0.0, tf.math.is_finite(slope))
        fallback = -gradient if precondition is None else -precondition(gradient)
        direction = tf.where(descent, direction, fallback)
        slope = tf.reduce_sum(gradient * direction)
        t, new_loss, evaluations, accepted = fbm.backtracking(
            lambda t: problem.value(w + t * direction),
            loss,
            slope,
            self.initial_step(dtype),
            c1=self.c1,
            shrink=self.backtracking,
            max_evaluations=self.max_evaluations,
        )
        # dᵀCd from CG's own recurrences: (C + λI)-curvature minus λ‖d‖².
        curvature = solution.curvature - damping * tf.reduce_sum(direction * direction)
        ratio = fbm.reduction_ratio(loss, new_loss, t * slope, t * t * curvature)
        new_damping = damping
        if self.adapt_damping:
            adapted = fbm.martens_damping(
                damping, ratio, minimum=self.min_damping, maximum=self.max_damping
            )
            boosted = tf.clip_by_value(
                1.5 * damping,
                exact_cast(self.min_damping, dtype),
                exact_cast(self.max_damping, dtype),
            )
            # No usable model (not a descent direction) or no decrease: more damping.
            new_damping = tf.where(tf.logical_and(descent, accepted), adapted, boosted)
        return StepOutcome(
            step=t * direction,
            loss=new_loss,
            gradient=None,
            statistics={
                "step_size": t,
                "function_evaluations": tf.cast(evaluations, dtype),
                "cg_iterations": tf.cast(solution.iterations, dtype),
                "hessian_vector_products": tf.cast(solution.matvecs + extra_products, dtype),
                "damping": damping,
                "cg_residual": solution.residual,
                "negative_curvature": tf.cast(solution.negative_curvature, dtype),
            },
            state={
                "damping": new_damping,
                "previous": tf.where(descent, solution.solution, tf.zeros_like(gradient)),
                **extra_state,
            },
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "curvature": self.curvature,
                "damping": self.damping,
                "adapt_damping": self.adapt_damping,
                "min_damping": self.min_damping,
                "max_damping": self.max_damping,
                "cg_tolerance": self.cg_tolerance,
                "max_cg_iterations": self.max_cg_iterations,
                "warm_start": self.warm_start,
                "c1": self.c1,
                "backtracking": self.backtracking,
                "max_evaluations": self.max_evaluations,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_curv")
class NysNewtonCG(NewtonCG):
    """Newton-CG preconditioned by a randomized Nyström approximation (Rathore et al. 2024).

    Every ``update_frequency`` steps, ``r = rank`` curvature products ``Y = C Q`` (``Q``
    an orthonormalised Gaussian sketch) give ``C ≈ U Λ̂ Uᵀ``; CG on ``(C + μI) d = −g``
    is then preconditioned by

    ```
    P⁻¹ = (λ̂_r + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − U Uᵀ)
    ```

    warm-started from the previous solution, followed by Armijo backtracking from
    ``t₀ = learning_rate``. ``μ`` is fixed (no adaptation). Defaults as in the authors'
    PINN code: rank 10, ``μ = 1e-4``, ``t₀ = 1``, the preconditioner refreshed every
    20 steps.

    Args:
        learning_rate: First trial step ``t₀``.
        rank: Nyström rank ``r`` (int ≥ 1).
        mu: Damping ``μ > 0``.
        update_frequency: Refresh the preconditioner every this many steps (int ≥ 1).
        curvature: ``"hessian"`` or ``"ggn"``.
        cg_tolerance: Relative residual at which CG stops.
        max_cg_iterations: Most CG iterations per step.
        warm_start: Start CG from the previous solution.
        seed: Seed of the sketches, or ``None``.
        name: Name of the optimizer.
        **kwargs: :class:`NewtonCG`'s line-search arguments (``c1``, ``backtracking``,
            ``max_evaluations``) and Keras's optimizer arguments.

    Example:
        >>> keras_curv.minimize(pinn, points, method=keras_curv.NysNewtonCG(rank=20),
        ...                     loss=residual_loss, max_iterations=200)
    """

    def __init__(
        self,
        learning_rate: Any = 1.0,
        rank: int = 10,
        mu: float = 1e-4,
        update_frequency: int = 20,
        curvature: str = "hessian",
        cg_tolerance: float = 1e-3,
        max_cg_iterations: int = 100,
        warm_start: bool = True,
        seed: int | None = None,
        name: str = "nys_newton_cg",
        **kwargs: Any,
    ) -> None:
        for key in ("damping", "adapt_damping", "min_damping", "max_damping"):
            if key in kwargs:
                raise ValueError(f"NysNewtonCG has a fixed damping `mu`; remove `{key}`.")
        mu = validation.positive(mu, "mu")
        super().__init__(
            learning_rate=learning_rate,
            curvature=curvature,
            damping=mu,
            adapt_damping=False,
            cg_tolerance=cg_tolerance,
            max_cg_iterations=max_cg_iterations,
            warm_start=warm_start,
            name=name,
            **kwargs,
        )
        self.mu = mu
        self.rank = validation.integer(rank, "rank", minimum=1)
        self.update_frequency = validation.integer(update_frequency, "update_frequency", minimum=1)
        self.seed = validation.seed(seed)

    def build_state(self, dim: int, dtype: tf.DType) -> dict[str, Any]:
        """Newton-CG's state, the Nyström factors ``U`` ``(n, r)``, ``λ̂`` and the RNG."""
        if self.rank > dim:
            raise ValueError(
                f"`rank` must be at most the number of parameters ({dim}); got rank={self.rank}."
            )
        state = super().build_state(dim, dtype)
        state["eigenvectors"] = self.state_variable((dim, self.rank), dtype, "nystrom_vectors")
        state["eigenvalues"] = self.state_variable((self.rank,), dtype, "nystrom_values")
        state["refreshes"] = self.state_variable((), "int64", "nystrom_refreshes")
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="nystrom_sketch")
        track_optimizer_variable(self, self._seed_generator.state)
        return state

    def preconditioner(self, problem, w, state):
        """The Nyström preconditioner, refreshed on schedule (``r`` extra products then)."""
        dtype = w.dtype
        # Drawn at every step, so the sketches do not depend on the schedule.
        omega = keras.random.normal(
            (int(w.shape[0]), self.rank), dtype=dtype.name, seed=self._seed_generator
        )
        if getattr(problem, "replicas", None) is not None:
            distribute.mirror_copies(self._seed_generator.state)
        iteration = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)
        refresh = tf.logical_or(
            tf.equal(tf.math.floormod(iteration, self.update_frequency), 0),
            tf.equal(state["refreshes"], 0),
        )
        product = _curvature_product(problem, self.curvature)

        def sketch():
            q, _ = tf.linalg.qr(omega)
            y = tf.transpose(tf.map_fn(lambda column: product(w, column), tf.transpose(q)))
            return nystrom_approximation(q, y)

        def keep():
            return state["eigenvectors"], state["eigenvalues"]

        vectors, values = tf.cond(refresh, sketch, keep)
        mu = self.mu

        def precondition(r):
            return nystrom_inverse(vectors, values, mu, r)

        new_state = {
            "eigenvectors": vectors,
            "eigenvalues": values,
            "refreshes": state["refreshes"] + tf.cast(refresh, tf.int64),
        }
        return precondition, new_state, tf.where(refresh, self.rank, 0)

    def get_config(self) -> dict:
        config = super().get_config()
        for key in ("damping", "adapt_damping", "min_damping", "max_damping"):
            config.pop(key)
        config.update(
            {
                "rank": self.rank,
                "mu": self.mu,
                "update_frequency": self.update_frequency,
                "seed": self.seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_curv")
class LevenbergMarquardt(FullBatchOptimizer):
    """Levenberg–Marquardt on the Gauss–Newton matrix, solved by conjugate gradients.

    For least squares ``f = (1/N) Σ ‖r‖²`` the GGN is ``G = (2/N) JᵀJ``; for any loss
    convex in the outputs it is the generalised Gauss–Newton matrix. Each step tries
    up to ``max_trials`` damped steps:

    ```
    d ≈ −(G + λI)⁻¹ g                                   (CG, G positive semi-definite)
    ρ = (f(θ + d) − f) / (gᵀd + ½ dᵀG d)
    ρ > 0:  θ ← θ + d,  λ ← λ · max(1/3, 1 − (2ρ − 1)³),  ν ← 2      (accept, stop)
    else:   λ ← ν λ,  ν ← 2ν                                          (try again)
    ```

    (Nielsen's rule; Madsen, Nielsen & Tingleff 2004). No line search
    (``learning_rate`` is not used). For a fixed full batch; on changing batches it
    warns once.

    Args:
        damping: Initial ``λ > 0``.
        min_damping: Lower bound of ``λ``.
        max_damping: Upper bound of ``λ``.
        cg_tolerance: Relative residual at which CG stops.
        max_cg_iterations: Most CG iterations per trial.
        max_trials: Most trial steps per step (int ≥ 1); the weights stay if all fail.
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay`` and clipping are refused).

    Example:
        >>> model.compile(optimizer=keras_curv.LevenbergMarquardt(), loss="mse")
        >>> model.fit(x, y, batch_size=len(x), epochs=30)
    """

    STATISTICS = ("damping", "cg_residual", "accepted")

    def __init__(
        self,
        damping: float = 1e-2,
        min_damping: float = 1e-12,
        max_damping: float = 1e12,
        cg_tolerance: float = 1e-4,
        max_cg_iterations: int = 100,
        max_trials: int = 10,
        name: str = "levenberg_marquardt",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("learning_rate", 1.0)
        super().__init__(name=name, **kwargs)
        self.damping = validation.positive(damping, "damping")
        self.min_damping = validation.positive(min_damping, "min_damping")
        self.max_damping = validation.number(max_damping, "max_damping", low=self.min_damping)
        self.cg_tolerance = validation.number(
            cg_tolerance, "cg_tolerance", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.max_cg_iterations = validation.integer(
            max_cg_iterations, "max_cg_iterations", minimum=1
        )
        self.max_trials = validation.integer(max_trials, "max_trials", minimum=1)

    def build_state(self, dim: int, dtype: tf.DType) -> dict[str, Any]:
        """``λ`` and Nielsen's growth factor ``ν``."""
        return {
            "damping": self.state_variable((), dtype, "damping", value=self.damping),
            "growth": self.state_variable((), dtype, "damping_growth", value=2.0),
        }

    def _trial(self, problem, w, loss, gradient, damping):
        """One damped Gauss–Newton step: ``(d, f(θ + d), ρ, CG result)``."""
        solution = fbm.conjugate_gradient(
            lambda v: problem.gauss_newton_vector_product(w, v) + damping * v,
            -gradient,
            tolerance=self.cg_tolerance,
            max_iterations=self.max_cg_iterations,
        )
        direction = solution.solution
        slope = tf.reduce_sum(gradient * direction)
        descent = tf.logical_and(slope < 0.0, tf.math.is_finite(slope))
        # λ → ∞ limit of the LM step, where CG gave no descent direction.
        direction = tf.where(descent, direction, -gradient / damping)
        slope = tf.reduce_sum(gradient * direction)
        curvature = solution.curvature - damping * tf.reduce_sum(direction * direction)
        curvature = tf.where(descent, curvature, tf.zeros_like(curvature))
        new_loss = problem.value(w + direction)
        return direction, new_loss, fbm.reduction_ratio(loss, new_loss, slope, curvature), solution

    def solve(self, problem, w, loss, gradient) -> StepOutcome:
        """Damped trial steps until one decreases the loss, with Nielsen's damping update."""
        state = {k: tf.convert_to_tensor(v) for k, v in self._state.items()}
        dtype = gradient.dtype
        zero = tf.zeros([], dtype)

        def cond(trial, damping, growth, accepted, *_):
            return tf.logical_and(tf.logical_not(accepted), trial < self.max_trials)

        def body(trial, damping, growth, accepted, direction, new_loss, residual, counts):
            direction, new_loss, ratio, solution = self._trial(problem, w, loss, gradient, damping)
            accepted = ratio > 0.0
            new_damping, new_growth = fbm.nielsen_damping(
                damping,
                growth,
                ratio,
                accepted,
                minimum=self.min_damping,
                maximum=self.max_damping,
            )
            return (
                trial + 1,
                new_damping,
                new_growth,
                accepted,
                direction,
                new_loss,
                solution.residual,
                counts + tf.stack([solution.iterations, solution.matvecs]),
            )

        init = (
            tf.constant(0),
            state["damping"],
            state["growth"],
            tf.constant(False),
            tf.zeros_like(gradient),
            loss,
            zero,
            tf.zeros([2], tf.int32),
        )
        trials, damping, growth, accepted, direction, new_loss, residual, counts = tf.while_loop(
            cond, body, init
        )
        one = tf.ones([], dtype)
        counts = tf.cast(counts, dtype)
        return StepOutcome(
            step=tf.where(accepted, direction, tf.zeros_like(direction)),
            loss=tf.where(accepted, new_loss, loss),
            gradient=None,
            statistics={
                "step_size": tf.where(accepted, one, zero),
                "function_evaluations": tf.cast(trials, dtype),
                "cg_iterations": counts[0],
                "hessian_vector_products": counts[1],
                "damping": state["damping"],
                "cg_residual": residual,
                "accepted": tf.cast(accepted, dtype),
            },
            state={"damping": damping, "growth": growth},
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "damping": self.damping,
                "min_damping": self.min_damping,
                "max_damping": self.max_damping,
                "cg_tolerance": self.cg_tolerance,
                "max_cg_iterations": self.max_cg_iterations,
                "max_trials": self.max_trials,
            }
        )
        return config
