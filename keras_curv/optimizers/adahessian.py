"""AdaHessian: Adam with the gradient's second moment replaced by a Hessian diagonal.

The Hessian diagonal is estimated with Hutchinson's method from one (or a few)
Hessian-vector products per step, built by reverse-over-reverse differentiation
of the very train step that produced the gradient (see
:mod:`keras_curv.optimizers.integration`), so the optimizer works with
``model.compile``/``model.fit``.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from keras_curv._internal import flat as _flat
from keras_curv.optimizers import _hardening, _labels, integration


class _StepStats:
    """Per-step statistics built in the train step's graph, read by ``update_step``.

    A plain holder: assigning tensors to optimizer attributes would go through
    Keras's attribute tracking.
    """

    def __init__(self) -> None:
        self.diagonals: dict | None = None
        self.updated: tf.Tensor | None = None


def _spatial_average(diagonal: tf.Tensor) -> tf.Tensor:
    """Averages a Hessian-diagonal estimate over a convolution kernel's spatial axes.

    Keras kernels are laid out ``(kh, kw, in, out)`` (rank 4) and ``(kw, in, out)``
    (rank 3): the spatial axes are ``(0, 1)`` and ``(0,)``. Other ranks (biases,
    dense kernels, ``Conv3D`` kernels) are left as they are.
    """
    rank = diagonal.shape.rank
    if rank == 4:
        axes = [0, 1]
    elif rank == 3:
        axes = [0]
    else:
        return diagonal
    return tf.broadcast_to(tf.reduce_mean(diagonal, axis=axes, keepdims=True), tf.shape(diagonal))


@keras.saving.register_keras_serializable(package="keras_curv")
class AdaHessian(keras.optimizers.Optimizer):
    """AdaHessian (Yao et al., 2021): Adam preconditioned by a Hessian-diagonal estimate.

    At step ``t`` (counted from 1), with gradient ``g``, Rademacher probes
    ``z_s`` (entries ±1, ``s = 1..S`` with ``S = n_samples``) and the Hessian ``H``
    of the training loss (regularization losses included) at the current weights:

    ```
    D    = spatial_avg( | (1/S) sum_s z_s ⊙ (H z_s) | )       (Hutchinson estimate)
    m    ← β1 m + (1 − β1) g
    v    ← β2 v + (1 − β2) D²                               (on Hessian steps only)
    den  = ( sqrt(v) / sqrt(1 − β2^τ) )^k + ε
    θ    ← θ − lr · wd · θ                                  (if weight_decay is set)
    θ    ← θ − lr · ( m / (1 − β1^t) ) / den
    ```

    ``E[z ⊙ Hz] = diag(H)``, so with ``S = 1`` this is ``D = |z ⊙ Hz| = |Hz|`` as in
    the authors' code; with ``S > 1`` the probes are averaged *before* the absolute
    value, so the estimate tends to ``|diag(H)|`` as ``S`` grows.
    ``spatial_avg`` replaces each entry of a convolution kernel's estimate by its
    mean over the kernel's spatial positions (keepdims, broadcast back): axes
    ``(0, 1)`` of a ``Conv2D`` kernel ``(kh, kw, in, out)`` (the authors' choice,
    which reduces the estimate's variance) and, by the same reasoning, axis ``0`` of
    a ``Conv1D`` kernel ``(kw, in, out)``. Tensors of rank ≤ 2 (dense kernels,
    biases) and of rank ≥ 5 are not averaged. ``k`` is ``hessian_power``, applied
    after the square root and the bias correction.

    Hessian steps: with ``update_each = u`` the Hessian-vector products are computed
    (inside the compiled step, behind a ``Switch``/``Merge`` conditional, so skipped
    steps do not pay for them; not so under ``jit_compile``) only at steps whose
    zero-based index ``t − 1`` is a multiple of ``u``. On the other steps ``v`` is
    left untouched (the stale ``D`` is not re-absorbed into
    the average) and the previous ``v`` is reused. ``τ`` is the number of steps at
    which ``v`` was updated so far (this step included), kept in its own counter
    (:attr:`hessian_iterations`), so the bias correction of ``v`` counts only real
    updates. A Hessian step whose estimate is not finite (e.g. an overflow under
    ``mixed_float16``) is treated as skipped for ``v`` and ``τ``.

    Weight decay is decoupled (AdamW-style, Keras's ``weight_decay`` mechanism),
    which equals the authors' ``θ ← θ − lr·(m̂/den + wd·θ)``.

    The probes are drawn inside the compiled step from a
    ``keras.random.SeedGenerator`` owned by the optimizer: fresh at every step,
    reproducible under ``keras.utils.set_random_seed`` (or a fixed ``seed``), and
    its state is one of ``optimizer.variables``, so it is saved and restored with
    the model and resumed training draws the same probes as uninterrupted training.

    Cost: each Hessian step adds ``n_samples`` Hessian-vector products, each about
    one extra backward pass through the step's gradient graph (roughly 1–2× the
    cost of the gradient), plus the memory of the second-order graph. With
    ``n_samples > 1`` the products are vectorised (``tf.vectorized_map``, holding
    ``n_samples`` copies of the parameters), or unrolled under ``jit_compile``.
    ``update_each > 1`` spreads this cost over several steps, except under
    ``jit_compile`` where the products are computed at every step (XLA cannot skip
    them, see below) and only ``v``'s update is skipped. State: two slots (``m``,
    ``v``) per variable, as Adam.

    Hardening (see ``docs/hardening.md``): under a ``tf.distribute`` strategy the
    replicas draw the same probes and their estimates are summed before ``|.|``, so a
    step equals the single-device step on the global batch. A step whose loss or
    gradient is not finite, or whose first Hessian estimate is not, is skipped
    (weights and state untouched, ``iterations`` included) and counted in
    :attr:`skipped_steps`. With Keras's (sparse) categorical cross-entropy, every step
    checks its labels (sparse: whole numbers in ``[0, C)``; one-hot: non-negative rows
    summing to 1) and raises ``InvalidArgumentError`` naming the problem before the loss
    runs; under ``jit_compile`` (no assertions in XLA) such a step is skipped and counted.

    The optimizer needs the batch, not only gradients: use it through
    ``model.compile``/``model.fit`` (also with ``jit_compile``, ``steps_per_execution``
    and mixed precision) or :func:`keras_curv.optimizers.curvature_step`; calling
    ``apply_gradients`` eagerly raises ``CurvatureContextError``.

    Args:
        learning_rate: A float, a ``keras.optimizers.schedules.LearningRateSchedule``
            or a callable. Defaults to ``0.15`` (the authors' default).
        beta_1: Decay rate of the gradient's moving average, in ``[0, 1)``.
        beta_2: Decay rate of the moving average of ``D²``, in ``[0, 1)``.
        epsilon: Added to the denominator, ``> 0``. Defaults to ``1e-4``.
        hessian_power: The power ``k`` in ``(0, 1]`` applied to the bias-corrected
            root-mean-square Hessian diagonal.
        n_samples: Number of Rademacher probes per Hessian step (int ≥ 1).
        update_each: Recompute the Hessian diagonal every ``update_each`` steps
            (int ≥ 1); see above.
        seed: Integer seed of the probes' generator, or ``None`` to draw it from
            Python's global RNG when the optimizer is built (seeded by
            ``keras.utils.set_random_seed``).
        weight_decay: Decoupled weight decay coefficient, or ``None``.
        clipnorm: As for every Keras optimizer (also ``clipvalue``,
            ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
            ``ema_overwrite_frequency`` and ``loss_scale_factor``).
        gradient_accumulation_steps: Not supported (the curvature would be that of
            one micro-batch); must be ``None``.
        name: Name of the optimizer.
        **kwargs: Passed to ``keras.optimizers.Optimizer``.

    Example:
        >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
        >>> model.compile(
        ...     optimizer=keras_curv.optimizers.AdaHessian(learning_rate=0.1),
        ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...     metrics=["accuracy"])
        >>> model.fit(x, y, batch_size=128, epochs=5)
        >>> float(model.optimizer.mean_curvature())  # diagnostics
    """

    def __init__(
        self,
        learning_rate: Any = 0.15,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-4,
        hessian_power: float = 1.0,
        n_samples: int = 1,
        update_each: int = 1,
        seed: int | None = None,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str = "adahessian",
        **kwargs: Any,
    ) -> None:
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                raise ValueError(f"`{arg}` must be a float in [0, 1); received {arg}={value!r}.")
        if not isinstance(epsilon, (int, float)) or not float(epsilon) > 0.0:
            raise ValueError(f"`epsilon` must be a float > 0; received epsilon={epsilon!r}.")
        if not isinstance(hessian_power, (int, float)) or not 0.0 < float(hessian_power) <= 1.0:
            raise ValueError(
                "`hessian_power` must be in (0, 1] (the range of the AdaHessian paper); "
                f"received hessian_power={hessian_power!r}."
            )
        for arg, value in (("n_samples", n_samples), ("update_each", update_each)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be an int >= 1; received {arg}={value!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None; received seed={seed!r}.")
        if gradient_accumulation_steps is not None:
            raise ValueError(
                "AdaHessian does not support `gradient_accumulation_steps` (its curvature "
                "would be that of a single micro-batch); pass gradient_accumulation_steps="
                "None and use a larger batch instead."
            )
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.hessian_power = float(hessian_power)
        self.n_samples = int(n_samples)
        self.update_each = int(update_each)
        self.seed = seed
        self._stats = _StepStats()

    def build(self, var_list: list) -> None:
        """Creates ``m`` and ``v`` per variable, the Hessian-step counter and the RNG."""
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._hessian_emas = self.add_optimizer_variables(
            var_list, ["momentum", "hessian_ema"]
        )
        # Counters are equal on every replica: "only_first_replica" lets a replica
        # context update them under a distribution strategy.
        self._hessian_iterations = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="int64",
            name="hessian_iteration",
            aggregation="only_first_replica",
        )
        self._skipped_steps = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="int64",
            name="skipped_steps",
            aggregation="only_first_replica",
        )
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="adahessian_probes")
        # Tracked so the RNG state is saved, loaded and resumed with the optimizer.
        self._track_variable(self._seed_generator.state)

    # ------------------------------------------------------------------ curvature

    def _draw_probes(self, num: int) -> tf.Tensor:
        """``(n_samples, num)`` Rademacher signs (int32) from the optimizer's generator."""
        # maxval is exclusive: {0, 1} -> {-1, +1}.
        bits = keras.random.randint(
            (self.n_samples, num), 0, 2, dtype="int32", seed=self._seed_generator
        )
        return 2 * bits - 1

    def _probe_estimates(self, batch: integration.TrainBatch, signs: tf.Tensor) -> list:
        """``(1/S) sum_s z_s ⊙ (H z_s)`` per variable of ``batch``; built in the step graph.

        ``H`` is the Hessian of this replica's loss (Keras divides it by the number of
        replicas), so the sum of the estimates over replicas is that of the global
        batch.
        """
        batch.scaled_gradients()  # once, outside the vectorised function below
        shapes = _flat.variable_shapes(batch.variables)

        def estimate(flat_signs):
            probes = _flat.unflatten(flat_signs, shapes)
            products = batch.hessian_vector_product(probes)
            return [tf.cast(z, hz.dtype) * hz for z, hz in zip(probes, products)]

        if self.n_samples == 1:
            return estimate(signs[0])
        estimates = integration.stacked_map(estimate, signs)
        return [tf.reduce_mean(e, axis=0) for e in estimates]

    def _hessian_diagonals(self, batch, signs, is_hessian_step=None) -> list:
        """``D`` per variable, reduced over replicas; zeros where ``is_hessian_step`` fails.

        With a predicate, every op of the Hessian-vector products depends on the
        gated probes, so they do not run on skipped steps (see
        :class:`~keras_curv.optimizers.integration.StepGate`); under XLA they run at
        every step and only the use of ``D`` (the update of ``v``) is skipped. The
        replicas' estimates are summed before the absolute value, so ``D`` is the
        estimate of the global batch.
        """
        gate = integration.StepGate(is_hessian_step)

        def diagonals(replica):
            probes = gate.enter(signs)
            estimates = yield [gate.exit(e) for e in self._probe_estimates(replica, probes)]
            return [_spatial_average(tf.abs(e)) for e in estimates]

        return _hardening.replica_sum(batch, diagonals)

    def _step_statistics(self, batch: integration.TrainBatch) -> tuple:
        """This step's ``D`` per variable and whether it updates ``v``, in the step graph."""
        with batch.step_graph():
            # Drawn at every step, Hessian step or not, so the probe sequence does not
            # depend on update_each or on the execution mode.
            signs = self._draw_probes(_flat.flat_dim(batch.variables))
            if batch.replicas is not None:
                _hardening.mirror_copies(self._seed_generator.state)
            if self.update_each == 1:
                is_hessian_step = tf.constant(True)
                diagonals = self._hessian_diagonals(batch, signs)
            else:
                iteration = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)
                is_hessian_step = tf.equal(tf.math.floormod(iteration, self.update_each), 0)
                diagonals = self._hessian_diagonals(batch, signs, is_hessian_step)
            updated = tf.logical_and(is_hessian_step, _hardening.all_finite(diagonals))
        return diagonals, updated

    def apply(self, grads: list, trainable_variables: list | None = None):
        """Builds this step's Hessian-diagonal estimate, then applies or skips the update.

        The step is skipped (weights and every state variable untouched,
        ``iterations`` included; :attr:`skipped_steps` counts it) when the loss or a
        gradient is not finite, or when this step's Hessian estimate is not finite and
        no earlier estimate exists to precondition with. A non-finite estimate after
        that skips only the update of ``v`` (the step uses the stored ``v``).
        """
        batch = integration.current_batch(self)
        if not self.built:
            if trainable_variables is None:
                return super().apply(grads, trainable_variables)  # raises Keras's error
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        variables = batch.variables
        diagonals, updated = _hardening.once_per_step(
            self, batch, lambda: self._step_statistics(batch)
        )
        labels_valid = _labels.guard_training_labels(batch, None, type(self).__name__)
        # Invalid labels raise in graph mode; under XLA (no assertions) they skip the step.
        gradients_finite = _hardening.all_finite_on_every_replica(
            [*grads, batch.loss, _labels.as_finite_flag(labels_valid)], batch
        )
        has_curvature = tf.logical_or(updated, self._hessian_iterations > 0)
        proceed = tf.logical_and(gradients_finite, has_curvature)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        stats = {self._var_key(v): d for v, d in zip(variables, diagonals)}
        _hardening.apply_or_skip(
            proceed,
            self._apply_with_stats,
            (list(grads), trainable_variables, stats, updated),
            self._skipped_steps,
        )

    def _apply_with_stats(self, grads, trainable_variables, diagonals, updated) -> None:
        self._stats.diagonals = diagonals
        self._stats.updated = updated
        try:
            super().apply(grads, trainable_variables)
            self._hessian_iterations.assign_add(tf.cast(updated, tf.int64))
        finally:
            self._stats.diagonals = None
            self._stats.updated = None

    def update_step(self, gradient, variable, learning_rate) -> None:
        """Update of one variable given its gradient and this step's ``D``."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        diagonal = ops.cast(self._stats.diagonals[self._var_key(variable)], dtype)
        updated = self._stats.updated
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._hessian_emas[index]

        step = ops.cast(self.iterations + 1, dtype)
        hessian_step = ops.cast(
            ops.maximum(self._hessian_iterations + ops.cast(updated, "int64"), 1), dtype
        )
        one = ops.cast(1.0, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)

        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), one - beta_1))
        new_v = ops.add(v, ops.multiply(ops.subtract(ops.square(diagonal), v), one - beta_2))
        self.assign(v, ops.where(updated, new_v, v))

        rms = ops.sqrt(v) / ops.sqrt(one - ops.power(beta_2, hessian_step))
        if self.hessian_power != 1.0:
            rms = ops.power(rms, ops.cast(self.hessian_power, dtype))
        denominator = rms + ops.cast(self.epsilon, dtype)
        m_hat = m / (one - ops.power(beta_1, step))
        self.assign_sub(variable, lr * m_hat / denominator)

    # ---------------------------------------------------------------- diagnostics

    @property
    def hessian_diagonal_ema(self) -> list:
        """The moving averages ``v`` of ``D²``, one variable per trainable variable.

        Not bias-corrected; see :meth:`mean_curvature`.
        """
        self._check_built()
        return list(self._hessian_emas)

    @property
    def hessian_iterations(self):
        """Number of steps at which ``v`` was updated (the ``τ`` of the bias correction)."""
        self._check_built()
        return self._hessian_iterations

    @property
    def skipped_steps(self):
        """Number of steps skipped for a non-finite loss, gradient or first curvature.

        Skipped steps leave the weights and all other state untouched (``iterations``
        does not advance). :class:`keras_curv.callbacks.SkippedSteps` copies this
        count into the training logs.
        """
        self._check_built()
        return self._skipped_steps

    def _bias_corrected_rms(self) -> list[tf.Tensor]:
        """``sqrt(v / (1 − β2^τ))`` per variable, in float32 (zeros before any Hessian step)."""
        self._check_built()
        tau = tf.cast(self._hessian_iterations, tf.float32)
        correction = tf.where(tau > 0, 1.0 - tf.pow(self.beta_2, tau), 1.0)
        return [tf.sqrt(tf.cast(v, tf.float32) / correction) for v in self._hessian_emas]

    def mean_curvature(self) -> tf.Tensor:
        """Mean over all parameters of ``sqrt(v / (1 − β2^τ))``, in float32.

        The bias-corrected root-mean-square Hessian-diagonal magnitude: a scalar
        summary of the curvature the optimizer currently preconditions with (0
        before the first Hessian step).
        """
        rms = self._bias_corrected_rms()
        count = sum(int(tf.size(r)) for r in rms)
        return tf.add_n([tf.reduce_sum(r) for r in rms]) / float(max(count, 1))

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The curvature state for the diagnostic callbacks (read only).

        Returns:
            ``hessian_diagonal_rms``: :meth:`mean_curvature`;
            ``hessian_diagonal_rms_per_variable``: the same mean for each trainable
            variable, in order (a vector: a histogram and one scalar per variable in
            TensorBoard); ``hessian_updates``: ``τ``, the number of Hessian steps;
            ``skipped_steps``: :attr:`skipped_steps`.
        """
        rms = self._bias_corrected_rms()
        return {
            "hessian_diagonal_rms": self.mean_curvature(),
            "hessian_diagonal_rms_per_variable": tf.stack([tf.reduce_mean(r) for r in rms]),
            "hessian_updates": tf.cast(self._hessian_iterations, tf.float32),
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }

    def _check_built(self) -> None:
        if not self.built:
            raise ValueError(
                "The AdaHessian optimizer has no state yet: train (or call "
                "`optimizer.build(model.trainable_variables)`) first."
            )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "hessian_power": self.hessian_power,
                "n_samples": self.n_samples,
                "update_each": self.update_each,
                "seed": self.seed,
            }
        )
        return config
