"""AdaHessian (Yao et al., 2021): Adam whose second moment is a Hessian-diagonal estimate.

The math is in the pure functions :func:`hutchinson_diagonal` (shared with Sophia, in
``_hutchinson.py``), :func:`spatial_average`, :func:`adahessian_moments` and
:func:`adahessian_direction`; :class:`AdaHessian` is the Keras shell around them.
``docs/adahessian.md`` explains the choices.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from keras_curv._internal import flat, validation
from keras_curv._internal.keras_privates import track_optimizer_variable, variable_index
from keras_curv._internal.numerics import exact_cast
from keras_curv.curvature.stability import stability_threshold
from keras_curv.curvature.structured import DiagonalOperator
from keras_curv.optimizers import _labels, distribute
from keras_curv.optimizers._graph import refresh_gate
from keras_curv.optimizers._hutchinson import (
    hutchinson_diagonal,
    next_seed,
    probe_estimates,
    rademacher,
)
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch

__all__ = [
    "AdaHessian",
    "adahessian_direction",
    "adahessian_moments",
    "hutchinson_diagonal",
    "spatial_average",
]

# ------------------------------------------------------------------ the math


def spatial_average(diagonal: tf.Tensor) -> tf.Tensor:
    """Averages a convolution kernel's diagonal estimate over its spatial axes.

    Keras kernels are ``(kh, kw, in, out)`` (rank 4) and ``(kw, in, out)`` (rank 3):
    each entry is replaced by its mean over axes ``(0, 1)``, resp. ``(0,)``, as in the
    authors' code. Other ranks (dense kernels, biases, ``Conv3D``) are left as they are.
    """
    axes = {4: [0, 1], 3: [0]}.get(diagonal.shape.rank)
    if axes is None:
        return diagonal
    return tf.broadcast_to(tf.reduce_mean(diagonal, axis=axes, keepdims=True), tf.shape(diagonal))


def adahessian_moments(
    gradient: Any,
    m: Any,
    v: Any,
    diagonal: Any,
    updated: Any,
    beta_1: float,
    beta_2: float,
) -> tuple[Any, Any]:
    """The moment updates: ``m ← β1 m + (1−β1) g``; ``v ← β2 v + (1−β2) D²`` if ``updated``.

    Args:
        gradient: ``g``.
        m: First moment.
        v: Moving average of ``D²``.
        diagonal: ``D``, this step's (spatially averaged, absolute) diagonal estimate.
        updated: Boolean scalar: whether this step refreshes ``v``.
        beta_1: Decay of ``m``.
        beta_2: Decay of ``v``.

    Returns:
        ``(m, v)`` after the step.
    """
    dtype = m.dtype
    new_m = m + (1 - exact_cast(beta_1, dtype)) * (ops.cast(gradient, dtype) - m)
    refreshed = v + (1 - exact_cast(beta_2, dtype)) * (ops.square(ops.cast(diagonal, dtype)) - v)
    return new_m, ops.where(updated, refreshed, v)


def adahessian_direction(
    m: Any,
    v: Any,
    step: Any,
    hessian_step: Any,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    hessian_power: float,
    step_cap: float | None = None,
) -> Any:
    """``(m / (1 − β1^t)) / ((sqrt(v) / sqrt(1 − β2^τ))^k + ε)``: the step is ``−lr`` times this.

    With ``step_cap = c`` each entry is then clipped to ``[−c, c]`` (the package's default,
    not the authors' rule: a coordinate whose Hessian estimate is near zero would otherwise
    take a step of ``lr·|g|/ε``).

    Args:
        m: First moment after the step.
        v: ``D²`` average after the step.
        step: ``t``, steps counted from 1.
        hessian_step: ``τ``, the number of refreshes of ``v`` so far (this step included).
        beta_1: Decay of ``m``.
        beta_2: Decay of ``v``.
        epsilon: ``ε``.
        hessian_power: ``k`` in ``(0, 1]``.
        step_cap: ``c > 0``, or ``None`` for no clipping.
    """
    dtype = m.dtype
    step = ops.cast(step, dtype)
    hessian_step = ops.cast(hessian_step, dtype)
    rms = ops.sqrt(v) / ops.sqrt(1 - ops.power(exact_cast(beta_2, dtype), hessian_step))
    if hessian_power != 1.0:
        rms = ops.power(rms, exact_cast(hessian_power, dtype))
    m_hat = m / (1 - ops.power(exact_cast(beta_1, dtype), step))
    direction = m_hat / (rms + exact_cast(epsilon, dtype))
    if step_cap is None:
        return direction
    cap = exact_cast(step_cap, dtype)
    return ops.clip(direction, -cap, cap)


# ------------------------------------------------------------------ the optimizer


@keras.saving.register_keras_serializable(package="keras_curv")
class AdaHessian(CurvatureOptimizer):
    r"""AdaHessian: Adam preconditioned by a Hutchinson estimate of the Hessian diagonal.

    At step ``t``, with ``S = n_samples`` Rademacher probes ``z_s`` and the Hessian ``H``
    of the training loss (regularization included):

    ```
    D  = spatial_avg( | (1/S) Σ_s z_s ⊙ (H z_s) | )
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) D²                                (on Hessian steps only)
    θ ← θ − lr · clip((m / (1 − β1^t)) / ((√v / √(1 − β2^τ))^k + ε), −c, c)
    ```

    with ``τ`` the number of Hessian steps so far, ``k = hessian_power`` and
    ``c = step_cap``. The cap (default 1: no coordinate moves by more than ``lr`` in a
    step, as with Adam) is this package's departure from the authors' rule, which
    ``step_cap=None`` restores; with it their defaults blow up small models in the first
    epoch (a near-zero Hessian estimate turns into a step of ``lr·|g|/ε``). Hessian
    steps are every ``update_each``-th step; a stale ``D`` is never re-absorbed. The
    probes come from an optimizer-owned ``SeedGenerator`` (saved with the optimizer).
    A step whose loss, gradient or first Hessian estimate is not finite is skipped and
    counted in :attr:`skipped_steps`. See ``docs/adahessian.md`` (defaults, cost, XLA,
    distribution).

    Args:
        learning_rate: A float, a ``LearningRateSchedule`` or a callable (default 0.15,
            the authors').
        beta_1: Decay of ``m``, in ``[0, 1)``.
        beta_2: Decay of ``v``, in ``[0, 1)``.
        epsilon: Added to the denominator, ``> 0``.
        hessian_power: ``k`` in ``(0, 1]``.
        step_cap: ``c > 0``: each coordinate's step is at most ``lr·c``; ``None``: the
            authors' unclipped rule.
        n_samples: Probes per Hessian step (int ≥ 1).
        update_each: Hessian steps every this many steps (int ≥ 1).
        seed: Seed of the probes, or ``None`` (drawn when built; follows
            ``keras.utils.set_random_seed``).
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay``, ``clipnorm``, ``use_ema``...).

    Example:
        >>> model.compile(optimizer=keras_curv.AdaHessian(0.1),
        ...               loss="sparse_categorical_crossentropy")
        >>> model.fit(x, y, batch_size=128, epochs=5)
    """

    def __init__(
        self,
        learning_rate: Any = 0.15,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-4,
        hessian_power: float = 1.0,
        step_cap: float | None = 1.0,
        n_samples: int = 1,
        update_each: int = 1,
        seed: int | None = None,
        name: str = "adahessian",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = validation.decay(beta_1, "beta_1")
        self.beta_2 = validation.decay(beta_2, "beta_2")
        self.epsilon = validation.positive(epsilon, "epsilon")
        self.hessian_power = validation.number(
            hessian_power, "hessian_power", low=0.0, high=1.0, low_open=True
        )
        self.step_cap = validation.positive(step_cap, "step_cap", allow_none=True)
        self.n_samples = validation.integer(n_samples, "n_samples", minimum=1)
        self.update_each = validation.integer(update_each, "update_each", minimum=1)
        self.seed = validation.seed(seed)

    def build(self, var_list: list) -> None:
        """Creates ``m`` and ``v`` per variable, the Hessian-step counter and the RNG."""
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._hessian_emas = self.add_optimizer_variables(
            var_list, ["momentum", "hessian_ema"]
        )
        self._hessian_iterations = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="int64",
            name="hessian_iteration",
            aggregation="only_first_replica",
        )
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="adahessian_probes")
        track_optimizer_variable(self, self._seed_generator.state)

    # -------------------------------------------------------------- statistics

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """``D`` per variable (replica-summed before ``|.|``) and whether it refreshes ``v``."""
        with batch.step_graph():
            is_hessian_step, gate = refresh_gate(self.iterations, self.update_each)
            seed = next_seed(self._seed_generator, batch)
            signs = rademacher(gate.enter(seed), self.n_samples, flat.flat_dim(batch.variables))

            def diagonals(replica: TrainBatch):
                estimates = probe_estimates(replica, signs)
                estimates = yield [gate.exit(e) for e in estimates]
                return [spatial_average(tf.abs(e)) for e in estimates]

            diagonal = distribute.replica_sum(batch, diagonals)
            updated = tf.logical_and(is_hessian_step, distribute.all_finite(diagonal))
            labels_valid = _labels.guard_training_labels(batch, None, type(self).__name__)
        return StepStatistics(
            per_variable={"diagonal": diagonal},
            shared={"updated": updated},
            checks=[_labels.as_finite_flag(labels_valid)],
            # Before the first finite estimate there is nothing to precondition with.
            proceed=tf.logical_or(updated, self._hessian_iterations > 0),
        )

    # ------------------------------------------------------------------ update

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One variable's AdaHessian update, with this step's ``D`` for it."""
        statistics = self.statistics_for(variable)
        updated = statistics["updated"]
        index = variable_index(self, variable)
        m = self._momentums[index]
        v = self._hessian_emas[index]

        new_m, new_v = adahessian_moments(
            gradient, m, v, statistics["diagonal"], updated, self.beta_1, self.beta_2
        )
        self.assign(m, new_m)
        self.assign(v, new_v)
        hessian_step = ops.maximum(self._hessian_iterations + ops.cast(updated, "int64"), 1)
        direction = adahessian_direction(
            new_m,
            new_v,
            self.iterations + 1,
            hessian_step,
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.hessian_power,
            self.step_cap,
        )
        self.assign_sub(variable, ops.cast(learning_rate, variable.dtype) * direction)

    def finish_step(self, statistics: StepStatistics) -> None:
        self._hessian_iterations.assign_add(tf.cast(statistics.shared["updated"], tf.int64))

    # ------------------------------------------------------------- diagnostics

    @property
    def hessian_diagonal_ema(self) -> list:
        """The moving averages ``v`` of ``D²``, one per trainable variable (not bias-corrected)."""
        self._check_built()
        return list(self._hessian_emas)

    @property
    def hessian_iterations(self) -> tf.Variable:
        """``τ``: the number of steps at which ``v`` was refreshed."""
        self._check_built()
        return self._hessian_iterations

    def _bias_corrected_rms(self) -> list[tf.Tensor]:
        """``sqrt(v / (1 − β2^τ))`` per variable, in float32 (zeros before any Hessian step)."""
        self._check_built()
        tau = tf.cast(self._hessian_iterations, tf.float32)
        correction = tf.where(tau > 0, 1.0 - tf.pow(self.beta_2, tau), 1.0)
        return [tf.sqrt(tf.cast(v, tf.float32) / correction) for v in self._hessian_emas]

    def mean_curvature(self) -> tf.Tensor:
        """Mean over all parameters of ``sqrt(v / (1 − β2^τ))`` (0 before any Hessian step)."""
        rms = self._bias_corrected_rms()
        count = sum(int(tf.size(r)) for r in rms)
        return tf.add_n([tf.reduce_sum(r) for r in rms]) / float(max(count, 1))

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The curvature state for the diagnostic callbacks (read only).

        Returns:
            ``hessian_diagonal_rms`` (:meth:`mean_curvature`),
            ``hessian_diagonal_rms_per_variable`` (one mean per variable, a vector),
            ``hessian_updates`` (``τ``) and ``skipped_steps``.
        """
        rms = self._bias_corrected_rms()
        return {
            "hessian_diagonal_rms": self.mean_curvature(),
            "hessian_diagonal_rms_per_variable": tf.stack([tf.reduce_mean(r) for r in rms]),
            "hessian_updates": tf.cast(self._hessian_iterations, tf.float32),
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }

    # ----------------------------------------------- the diagnostic callbacks' protocol

    def _flat_rms(self) -> tf.Tensor | None:
        """``sqrt(v / (1 − β2^τ))`` over all variables, flat; ``None`` before any Hessian step."""
        self._check_built()
        tau = int(self._hessian_iterations.numpy())
        if tau == 0:
            return None
        v = flat.flatten([tf.convert_to_tensor(e) for e in self._hessian_emas])
        correction = 1.0 - exact_cast(self.beta_2, v.dtype) ** tau
        return tf.sqrt(v / correction)

    def curvature_model(self) -> DiagonalOperator | None:
        """``diag(sqrt(v̂))``: AdaHessian's estimate of ``|diag(H)|`` (protocol, read only).

        Flat layout of the optimizer's variables (``model.trainable_variables`` when
        built by ``fit``); ``None`` before the first Hessian step.
        """
        rms = self._flat_rms()
        return None if rms is None else DiagonalOperator(rms)

    def preconditioner(self) -> DiagonalOperator | None:
        """``P = diag(sqrt(v̂)^k + ε)``, the update's denominator (protocol, read only).

        The step is ``lr · clip(P⁻¹ m̂, −c, c)``: ``P`` describes it wherever ``step_cap``
        does not clip.
        """
        rms = self._flat_rms()
        if rms is None:
            return None
        if self.hessian_power != 1.0:
            rms = rms ** exact_cast(self.hessian_power, rms.dtype)
        return DiagonalOperator(rms + exact_cast(self.epsilon, rms.dtype))

    def stability_threshold(self) -> float:
        """``(2 + 2β1) / ((1 − β1) η)``: ``m`` is an EMA of the gradient (as Adam's)."""
        lr = float(keras.ops.convert_to_numpy(self.learning_rate))
        return stability_threshold(lr, self.beta_1, "ema")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "hessian_power": self.hessian_power,
                "step_cap": self.step_cap,
                "n_samples": self.n_samples,
                "update_each": self.update_each,
                "seed": self.seed,
            }
        )
        return config
