"""Sophia (Liu et al., 2023): momentum clipped by a diagonal Hessian estimate.

The math is in the pure functions :func:`sophia_moments`, :func:`debiased_hessian`,
:func:`sophia_direction` and :func:`clipped_fraction`; the estimates ``ĥ`` come from
``_hutchinson.py`` (Sophia-H) and ``_sampled_labels.py`` (Sophia-G); :class:`Sophia` is
the Keras shell around them.
``docs/sophia.md`` explains the parametrisation and the defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_curv._internal import flat, validation
from keras_curv._internal.keras_privates import track_optimizer_variable, variable_index
from keras_curv._internal.numerics import curvature_dtype, exact_cast
from keras_curv.curvature.stability import stability_threshold
from keras_curv.curvature.structured import DiagonalOperator
from keras_curv.optimizers import _labels, _sampled_labels, distribute
from keras_curv.optimizers._graph import StepGate, refresh_gate
from keras_curv.optimizers._hutchinson import next_seed, probe_estimates, rademacher
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch

ESTIMATORS = ("hutchinson", "gauss_newton_bartlett")

# ------------------------------------------------------------------ the math


def sophia_moments(
    gradient: Any,
    m: Any,
    h: Any,
    estimate: Any,
    updated: Any,
    beta_1: float,
    beta_2: float,
) -> tuple[Any, Any]:
    """``m ← β1 m + (1−β1) g``; ``h ← β2 h + (1−β2) ĥ`` where ``updated``, else ``h``.

    Args:
        gradient: ``g``.
        m: First moment (no bias correction, as in the authors' code).
        h: Moving average of the Hessian-diagonal estimates.
        estimate: ``ĥ``, this step's estimate (ignored unless ``updated``).
        updated: Boolean scalar: whether this step absorbs ``ĥ``.
        beta_1: Decay of ``m``.
        beta_2: Decay of ``h``.

    Returns:
        ``(m, h)`` after the step.
    """
    dtype = m.dtype
    b1 = exact_cast(beta_1, dtype)
    b2 = exact_cast(beta_2, dtype)
    new_m = b1 * m + (1 - b1) * ops.cast(gradient, dtype)
    refreshed = b2 * h + (1 - b2) * ops.cast(estimate, dtype)
    return new_m, ops.where(updated, refreshed, h)


def debiased_hessian(h: Any, count: Any, beta_2: float) -> Any:
    """``h / (1 − β2^n)`` for ``n ≥ 1`` absorbed estimates; ``h`` itself (zero) for ``n = 0``.

    An EMA that starts at 0 is ``(1 − β2^n)`` times the weighted mean of the ``n``
    estimates it absorbed; the division (Adam's bias correction of its second moment)
    gives that mean, so the first estimate counts in full instead of by ``1 − β2``.

    Args:
        h: The moving average of the estimates.
        count: ``n``, an integer scalar.
        beta_2: Decay of ``h``.
    """
    dtype = h.dtype
    count = ops.maximum(ops.cast(count, dtype), 1)
    return h / (1 - ops.power(exact_cast(beta_2, dtype), count))


def _ratio(m: Any, h: Any, rho: float, epsilon: float) -> Any:
    """``|m| / (ρ·max(h, 0) + ε)``: a negative curvature estimate gives a clipped step."""
    dtype = m.dtype
    denominator = exact_cast(rho, dtype) * ops.maximum(h, 0) + exact_cast(epsilon, dtype)
    return ops.abs(m) / denominator


def sophia_direction(m: Any, h: Any, rho: float, epsilon: float) -> Any:
    """``sign(m) · min(|m| / (ρ·max(h, 0) + ε), 1)``: the step is ``−lr`` times this.

    Args:
        m: First moment after the step.
        h: Hessian-diagonal average after the step.
        rho: ``ρ``.
        epsilon: ``ε``.
    """
    return ops.sign(m) * ops.minimum(_ratio(m, h, rho, epsilon), 1)


def clipped_fraction(
    momentums: Sequence[Any], hessians: Sequence[Any], rho: float, epsilon: float
) -> tf.Tensor:
    """The fraction of coordinates whose step is clipped (``|m| ≥ ρ·max(h, 0) + ε``).

    One minus the authors' "win rate"; a float32 scalar.
    """
    wide = any(tf.as_dtype(m.dtype) == tf.float64 for m in momentums)
    dtype = tf.float64 if wide else tf.as_dtype(momentums[0].dtype)
    # One flat vector: a handful of ops per step, whatever the number of variables.
    ratio = _ratio(flat.flatten(momentums, dtype), flat.flatten(hessians, dtype), rho, epsilon)
    return tf.reduce_mean(tf.cast(ratio >= 1, tf.float32))


# ------------------------------------------------------------------ the optimizer


@keras.saving.register_keras_serializable(package="keras_curv")
class Sophia(CurvatureOptimizer):
    r"""Sophia: momentum clipped coordinate-wise by a diagonal Hessian estimate.

    At every step (the authors' rule; ``m`` and ``h`` start at 0):

    ```
    θ ← θ (1 − lr·wd)
    m ← β1 m + (1 − β1) g
    θ ← θ − lr · sign(m) · min(|m| / (ρ·max(h, 0) + ε), 1)
    ```

    and at steps ``t = k, 2k, ...`` (``k = update_every``), before the update,
    ``h ← β2 h + (1 − β2) ĥ`` with ``ĥ = u ⊙ (H u)`` for a Rademacher ``u``
    (``estimator="hutchinson"``, Sophia-H) or ``ĥ = ∇L̂ ⊙ ∇L̂`` for the loss ``L̂`` on
    labels sampled from the model (``"gauss_newton_bartlett"``, Sophia-G: the official
    ``B·ĝ⊙ĝ``, batch-size factor included, so ``ρ`` is the official one). ``h``
    estimates the diagonal of the Hessian (resp. Gauss–Newton matrix) of the compiled
    batch-mean loss. Other steps leave ``h`` as it is.

    With ``bias_correction=True`` the estimates start at ``t = 0`` and the step divides
    by ``h / (1 − β2^n)`` after ``n`` of them (Adam's correction of its second moment)
    instead of ``h``: the first steps are not all full sign steps ``lr·sign(m)`` while
    ``h`` grows from 0. Not the default: it helped Sophia-H on a MobileNetV2 at
    initialisation but not Sophia-G (``docs/sophia.md``). :attr:`clip_fraction` (in
    :meth:`curvature_summary`; ``OptimizerLogs`` puts it in the logs) is the fraction
    of clipped coordinates at the last step. See ``docs/sophia.md`` (the
    parametrisations of the official code, optax and levanter, defaults, cost).

    Args:
        learning_rate: A float, a ``LearningRateSchedule`` or a callable: the largest
            step of a coordinate.
        beta_1: Decay of ``m``, in ``[0, 1)``.
        beta_2: Decay of ``h``, in ``[0, 1)``.
        rho: ``ρ > 0``; larger clips less.
        weight_decay: Decoupled weight decay ``wd`` (Keras's, applied first), or ``None``.
        update_every: ``k``, steps between Hessian estimates (int ≥ 1).
        estimator: ``"hutchinson"`` (any loss) or ``"gauss_newton_bartlett"`` (softmax
            or sigmoid cross-entropy, mean squared error).
        epsilon: ``ε > 0``.
        bias_correction: ``False`` (default): the authors' rule; ``True``: estimate
            from the first step and divide ``h`` by ``1 − β2^n``.
        seed: Seed of the probes / sampled labels, or ``None`` (drawn when built;
            follows ``keras.utils.set_random_seed``).
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``clipnorm``, ``use_ema``...).

    Example:
        >>> model.compile(optimizer=keras_curv.Sophia(1e-3),
        ...               loss="sparse_categorical_crossentropy")
        >>> model.fit(x, y, batch_size=128, epochs=5)
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        beta_1: float = 0.965,
        beta_2: float = 0.99,
        rho: float = 0.04,
        weight_decay: float | None = 0.1,
        update_every: int = 10,
        estimator: str = "hutchinson",
        epsilon: float = 1e-12,
        bias_correction: bool = False,
        seed: int | None = None,
        name: str = "sophia",
        **kwargs: Any,
    ) -> None:
        weight_decay = validation.non_negative(weight_decay, "weight_decay", allow_none=True)
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        self.beta_1 = validation.decay(beta_1, "beta_1")
        self.beta_2 = validation.decay(beta_2, "beta_2")
        self.rho = validation.positive(rho, "rho")
        self.update_every = validation.integer(update_every, "update_every", minimum=1)
        self.estimator = validation.choice(estimator, "estimator", ESTIMATORS)
        self.epsilon = validation.positive(epsilon, "epsilon")
        self.bias_correction = validation.boolean(bias_correction, "bias_correction")
        self.seed = validation.seed(seed)

    def build(self, var_list: list) -> None:
        """Creates ``m`` and ``h`` per variable, the estimate counter and the RNG."""
        if self.built:
            return
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="sophia_draws")
        super().build(var_list)
        self._momentums, self._hessians = self.add_optimizer_variables(
            var_list, ["momentum", "hessian"]
        )
        self._hessian_updates = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="int64",
            name="hessian_updates",
            aggregation="only_first_replica",
        )
        track_optimizer_variable(self, self._seed_generator.state)

    def build_for_model(self, model: keras.Model) -> None:
        """Checks, before the first step, that Sophia-G can sample labels for the loss."""
        if self.estimator == "gauss_newton_bartlett" and getattr(model, "loss", None) is not None:
            self._sampling_spec(model)

    def _sampling_spec(self, model: keras.Model) -> _sampled_labels.SamplingSpec:
        return _sampled_labels.sampling_spec(
            getattr(model, "loss", None),
            'Sophia(estimator="gauss_newton_bartlett")',
            'Use Sophia(estimator="hutchinson"), which works with any loss.',
        )

    # -------------------------------------------------------------- statistics

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """``ĥ`` per variable (replica-reduced) and whether this step absorbs it."""
        with batch.step_graph():
            # The authors' schedule starts after k steps; the corrected h needs an
            # estimate from the first step on.
            start = 0 if self.bias_correction else self.update_every
            is_estimate_step, gate = refresh_gate(self.iterations, self.update_every, start=start)
            seed = gate.enter(next_seed(self._seed_generator, batch))
            if self.estimator == "hutchinson":
                estimate = self._hutchinson(batch, seed, gate)
            else:
                estimate = self._gauss_newton_bartlett(batch, seed, gate)
            updated = tf.logical_and(is_estimate_step, distribute.all_finite(estimate))
            labels_valid = _labels.guard_training_labels(batch, None, type(self).__name__)
        return StepStatistics(
            per_variable={"estimate": estimate},
            shared={"updated": updated},
            checks=[_labels.as_finite_flag(labels_valid)],
            # Always true (a non-finite estimate is not absorbed, the step still runs),
            # but it makes the step's tf.cond wait for the gated estimate. Without that
            # data dependency, a gated estimate feeding the cond's branches only made
            # TensorFlow 2.21 intermittently corrupt the train function's outputs
            # ("OptionalHasValue ... expected a variant tensor") on a small CNN.
            proceed=tf.logical_or(updated, tf.logical_not(updated)),
        )

    def _hutchinson(self, batch: TrainBatch, seed: tf.Tensor, gate: StepGate) -> list:
        """``u ⊙ (H u)`` of the global batch's loss, one Rademacher ``u`` for all replicas."""
        signs = rademacher(seed, 1, flat.flat_dim(batch.variables))

        def estimates(replica: TrainBatch):
            summed = yield [gate.exit(e) for e in probe_estimates(replica, signs)]
            return summed

        return distribute.replica_sum(batch, estimates)

    def _gauss_newton_bartlett(self, batch: TrainBatch, seed: tf.Tensor, gate: StepGate) -> list:
        """``∇L̂ ⊙ ∇L̂`` for the loss on sampled labels of the global batch."""
        spec = self._sampling_spec(batch.model)
        dtype = curvature_dtype(batch.variables[0].dtype)

        def estimates(replica: TrainBatch):
            spec_r, outputs = _sampled_labels.prepare(spec, replica.y_pred, dtype)
            rows = tf.shape(outputs)[0]
            count = _sampled_labels.element_count(outputs)
            weight = _weight_sum(replica.sample_weight, count, dtype)
            offset, total_rows = 0, rows
            if replica.num_replicas > 1:
                # Every replica draws the global batch's noise and takes its own rows, so
                # the labels (and the estimate) equal one device's on the same batch.
                sizes = tf.one_hot(replica.replica_id, replica.num_replicas, dtype=dtype)
                sizes, count, weight = yield sizes * tf.cast(rows, dtype), count, weight
                offset = tf.cast(tf.reduce_sum(sizes[: replica.replica_id]), tf.int32)
                total_rows = tf.cast(tf.reduce_sum(sizes), tf.int32)
            shape = tf.concat([[total_rows], tf.shape(outputs)[1:]], 0)
            noise = _sampled_labels.noise_for(spec_r, shape, seed, dtype)[offset : offset + rows]
            labels = _sampled_labels.sample_labels(spec_r, outputs, noise)
            normaliser = {"sum": tf.ones([], dtype), "mean_with_sample_weight": weight}
            loss = _sampled_labels.bartlett_loss(
                spec_r, outputs, labels, replica.sample_weight,
                normaliser.get(spec.reduction, count),
            )  # fmt: skip
            summed = yield [gate.exit(g) for g in replica.gradients_of(loss)]
            return [g * g for g in summed]

        return distribute.replica_sum(batch, estimates)

    # ------------------------------------------------------------------ update

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One variable's Sophia update, with this step's ``ĥ`` for it."""
        statistics = self.statistics_for(variable)
        index = variable_index(self, variable)
        m = self._momentums[index]
        h = self._hessians[index]

        new_m, new_h = sophia_moments(
            gradient, m, h, statistics["estimate"], statistics["updated"], self.beta_1, self.beta_2
        )
        self.assign(m, new_m)
        self.assign(h, new_h)
        if self.bias_correction:
            count = self._hessian_updates + ops.cast(statistics["updated"], "int64")
            new_h = debiased_hessian(new_h, count, self.beta_2)
        direction = sophia_direction(new_m, new_h, self.rho, self.epsilon)
        self.assign_sub(variable, ops.cast(learning_rate, variable.dtype) * direction)

    def finish_step(self, statistics: StepStatistics) -> None:
        self._hessian_updates.assign_add(tf.cast(statistics.shared["updated"], tf.int64))

    # ------------------------------------------------------------- diagnostics

    @property
    def hessian_diagonal_ema(self) -> list:
        """The moving averages ``h``, one per trainable variable (not bias-corrected)."""
        self._check_built()
        return list(self._hessians)

    def _used_hessians(self) -> list[tf.Tensor]:
        """The ``h`` the last step divided by: bias-corrected with ``bias_correction``."""
        hessians = [tf.convert_to_tensor(h) for h in self._hessians]
        if not self.bias_correction:
            return hessians
        count = tf.convert_to_tensor(self._hessian_updates)
        return [debiased_hessian(h, count, self.beta_2) for h in hessians]

    @property
    def hessian_updates(self) -> tf.Variable:
        """The number of estimates absorbed into ``h`` (non-finite ones are not)."""
        self._check_built()
        return self._hessian_updates

    @property
    def clip_fraction(self) -> tf.Tensor:
        """The fraction of coordinates whose last step was clipped to ``lr·sign(m)``.

        Computed when read, from ``m`` and ``h`` (the last step's, as they are saved in
        the state), so training never pays for it.
        """
        self._check_built()
        momentums = [tf.convert_to_tensor(m) for m in self._momentums]
        return clipped_fraction(momentums, self._used_hessians(), self.rho, self.epsilon)

    def _flat_hessian(self) -> tf.Tensor | None:
        """The ``h`` of the step over all variables, flat; ``None`` before the first estimate."""
        self._check_built()
        if int(np.asarray(tf.convert_to_tensor(self._hessian_updates))) == 0:
            return None
        return flat.flatten(self._used_hessians())

    def curvature_model(self) -> DiagonalOperator | None:
        """``diag(h)`` (bias-corrected if asked): the Hessian (Gauss–Newton) diagonal estimate.

        The optimizer protocol's curvature model.

        Flat layout of the optimizer's variables; ``None`` before the first estimate.
        """
        h = self._flat_hessian()
        return None if h is None else DiagonalOperator(h)

    def preconditioner(self) -> DiagonalOperator | None:
        """``P = diag(ρ·max(h, 0) + ε)``: the unclipped step is ``−lr·P⁻¹m`` (protocol).

        The clip stays out of ``P``: a clipped coordinate moves by less than ``lr·P⁻¹m``.
        ``None`` before the first estimate (every coordinate is clipped until then).
        """
        h = self._flat_hessian()
        if h is None:
            return None
        rho, epsilon = exact_cast(self.rho, h.dtype), exact_cast(self.epsilon, h.dtype)
        return DiagonalOperator(rho * tf.maximum(h, 0) + epsilon)

    def stability_threshold(self) -> float:
        """``(2 + 2β1) / ((1 − β1) η)``: ``m`` is an EMA of the gradient (protocol)."""
        lr = float(keras.ops.convert_to_numpy(self.learning_rate))
        return stability_threshold(lr, self.beta_1, "ema")

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The optimizer's state for the diagnostic callbacks (read only).

        Returns:
            ``clip_fraction`` and ``win_rate`` (its complement, the authors' tuning
            signal, ideally 0.1–0.5), ``hessian_diagonal_mean`` (the mean of the
            ``h`` the step divides by), ``hessian_updates`` and ``skipped_steps``.
        """
        self._check_built()
        clipped = self.clip_fraction
        hessians = [tf.cast(h, tf.float32) for h in self._used_hessians()]
        size = sum(int(np.prod(h.shape)) for h in hessians)
        mean = tf.add_n([tf.reduce_sum(h) for h in hessians]) / float(max(size, 1))
        return {
            "clip_fraction": clipped,
            "win_rate": 1.0 - clipped,
            "hessian_diagonal_mean": mean,
            "hessian_updates": tf.cast(self._hessian_updates, tf.float32),
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "rho": self.rho,
                "update_every": self.update_every,
                "estimator": self.estimator,
                "epsilon": self.epsilon,
                "bias_correction": self.bias_correction,
                "seed": self.seed,
            }
        )
        return config


def _weight_sum(sample_weight: Any, count: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Keras's divisor for ``"mean_with_sample_weight"``: Σ w, or the element count."""
    if sample_weight is None:
        return count
    return tf.reduce_sum(tf.cast(sample_weight, dtype))
