"""SketchySGD (Frangella, Rathore, Zhao, Udell 2023): SGD preconditioned by a Nyström sketch.

The math is in :mod:`keras_curv.optimizers.sketchy_math` and
:func:`keras_curv.curvature.nystrom_factors`; :class:`SketchySGD` is the Keras shell
around them. ``docs/sketchy_sgd.md`` explains the choices.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import flat, validation
from keras_curv._internal.keras_privates import (
    clipped_gradients,
    track_optimizer_variable,
    variable_index,
)
from keras_curv._internal.numerics import exact_cast
from keras_curv.curvature.eigensolvers import nystrom_factors
from keras_curv.optimizers import _labels, distribute
from keras_curv.optimizers import sketchy_math as skm
from keras_curv.optimizers._graph import StepGate, stacked_map
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch

CURVATURES = ("gauss_newton", "hessian")
_LEVELS = 2**30


def _gaussian(shape: tuple, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Standard normal draws that are the same with and without XLA.

    XLA's ``stateless_normal`` and float ``stateless_uniform`` give other numbers than
    the CPU kernels for the same seed (integer draws agree): integers in ``[0, 2³⁰)``,
    mapped through the normal quantile function.
    """
    levels = tf.random.stateless_uniform(shape, seed, 0, _LEVELS, dtype=tf.int32, alg="philox")
    uniform = (tf.cast(levels, dtype) + 0.5) / _LEVELS
    return tf.math.ndtri(uniform)


def _learning_rate(value: Any) -> Any:
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(
                f'`learning_rate` must be "auto", a float, a LearningRateSchedule or a '
                f"callable; received learning_rate={value!r}."
            )
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return validation.non_negative(value, "learning_rate")
    return value


def refresh_due(iteration: tf.Tensor, update_every: int) -> tf.Tensor:
    """Whether step ``t`` (from 0) refreshes the sketch: ``t ∈ {0, 1, 2, 4, 8, ...}`` below
    ``update_every``, then every ``update_every``-th step.

    The curvature of a network changes fastest in its first steps (it grows tenfold in
    five steps on a small CNN); a preconditioner kept from step 0 for ``update_every``
    steps overshoots there.
    """
    iteration = tf.cast(iteration, tf.int64)
    power_of_two = tf.equal(tf.bitwise.bitwise_and(iteration, iteration - 1), 0)
    early = tf.logical_and(iteration < update_every, power_of_two)
    return tf.logical_or(early, tf.equal(tf.math.floormod(iteration, update_every), 0))


def _project(rows: list, tensors: list) -> tf.Tensor:
    """``Ûᵀ v`` from per-variable rows ``(r, *shape)`` and the pieces of ``v``."""
    return tf.add_n(
        [tf.tensordot(r, tf.cast(t, r.dtype), axes=len(t.shape)) for r, t in zip(rows, tensors)]
    )


@keras.saving.register_keras_serializable(package="keras_curv")
class SketchySGD(CurvatureOptimizer):
    r"""SketchySGD: SGD preconditioned by a randomized Nyström sketch of the curvature.

    Every ``update_every`` steps, from ``s = rank + oversampling`` curvature-vector
    products ``Y = H Ω`` on the step's batch (``H`` the Gauss–Newton matrix or the
    Hessian of the training loss, regularization included):

    ```
    Û Λ̂ Ûᵀ  = rank-r part of  Y (Ωᵀ Y)⁺ Yᵀ           (randomized Nyström)
    ρ       = λ̂_{r+1}           (default; or `rho`)
    P       = Û Λ̂ Ûᵀ + ρ I
    η       = step_scale / λ_max(P^{-1/2} H P^{-1/2})   (learning_rate="auto")
    ```

    and at every step, with ``m`` the gradient itself (``momentum=0``) or its
    bias-corrected moving average:

    ```
    θ ← θ − η P⁻¹ m,      P⁻¹ m = m/ρ + Û ((Λ̂ + ρ)⁻¹ − ρ⁻¹) Ûᵀ m   (Woodbury, O(p r))
    ```

    ``λ_max`` comes from ``power_iterations`` products on the step's batch. With
    ``learning_rate="auto"`` the optimizer writes ``η`` into its ``learning_rate`` at
    each refresh (so the progress bar, TensorBoard and weight decay see it). A
    refresh whose sketch is not finite keeps the previous preconditioner; before the
    first finite one, steps are skipped and counted in :attr:`skipped_steps`. See
    ``docs/sketchy_sgd.md`` (defaults, cost, XLA, distribution).

    Args:
        learning_rate: ``"auto"`` (default), or a fixed float, schedule or callable
            (then no power iterations are run).
        rank: ``r``, eigenpairs kept (int ≥ 1).
        rho: ``ρ``, a fixed shift > 0, or ``None`` for ``λ̂_{r+1}`` of each sketch.
        oversampling: Extra sketch directions beyond ``rank`` (int ≥ 1 when ``rho`` is
            ``None``, else ≥ 0).
        update_every: Refresh the preconditioner every this many steps (int ≥ 1).
        hessian_batch_size: Sketch on the first this many samples of the step's batch
            (a stateless forward pass of its own), or ``None`` for the whole batch.
        step_scale: Factor on the automatic step (the authors' 0.5), in ``(0, 2)``.
        power_iterations: Products spent on ``λ_max`` per refresh (int ≥ 1).
        momentum: Decay of the gradient's moving average ``m``, in ``[0, 1)``.
        curvature: ``"gauss_newton"`` (default; positive semi-definite) or
            ``"hessian"``.
        seed: Seed of the sketches, or ``None`` (follows ``keras.utils.set_random_seed``).
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay``, ``clipnorm``, ``use_ema``...).

    Example:
        >>> model.compile(optimizer=keras_curv.SketchySGD(), loss="mse")
        >>> model.fit(x, y, batch_size=256, epochs=10)
    """

    def __init__(
        self,
        learning_rate: Any = "auto",
        rank: int = 10,
        rho: float | None = None,
        oversampling: int = 5,
        update_every: int = 20,
        hessian_batch_size: int | None = None,
        step_scale: float = 0.5,
        power_iterations: int = 10,
        tracking_iterations: int = 1,
        momentum: float = 0.0,
        curvature: str = "gauss_newton",
        seed: int | None = None,
        name: str = "sketchysgd",
        **kwargs: Any,
    ) -> None:
        learning_rate = _learning_rate(learning_rate)
        automatic = learning_rate == "auto"
        super().__init__(learning_rate=0.0 if automatic else learning_rate, name=name, **kwargs)
        self.automatic = automatic
        self.rank = validation.integer(rank, "rank", minimum=1)
        self.rho = validation.positive(rho, "rho", allow_none=True)
        self.oversampling = validation.integer(
            oversampling, "oversampling", minimum=1 if rho is None else 0
        )
        self.update_every = validation.integer(update_every, "update_every", minimum=1)
        self.hessian_batch_size = validation.integer(
            hessian_batch_size, "hessian_batch_size", minimum=1, allow_none=True
        )
        self.step_scale = validation.number(
            step_scale, "step_scale", low=0.0, high=2.0, low_open=True, high_open=True
        )
        self.power_iterations = validation.integer(power_iterations, "power_iterations", minimum=1)
        self.tracking_iterations = validation.integer(
            tracking_iterations, "tracking_iterations", minimum=0
        )
        if self.tracking_iterations > self.power_iterations:
            raise ValueError(
                "`tracking_iterations` must not exceed `power_iterations`; received "
                f"tracking_iterations={tracking_iterations}, power_iterations={power_iterations}."
            )
        self.momentum = validation.decay(momentum, "momentum")
        self.curvature = validation.choice(curvature, "curvature", CURVATURES)
        self.seed = validation.seed(seed)

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Creates the sketch (``Ûᵀ`` per variable, ``Λ̂``, ``ρ``), the momentum and the RNG."""
        if self.built:
            return
        size = self.rank + self.oversampling
        if size > flat.flat_dim(var_list):
            raise ValueError(
                f"`rank` + `oversampling` = {size} exceeds the model's "
                f"{flat.flat_dim(var_list)} trainable parameters; pass a smaller `rank`."
            )
        super().build(var_list)
        self._state_dtype = (
            tf.float64 if any(v.dtype == "float64" for v in var_list) else tf.float32
        )
        # Derived from replica-reduced statistics: equal on every replica.
        shared = {"aggregation": "only_first_replica", "dtype": self._state_dtype}
        self._eigenvector_rows = [
            self.add_variable((self.rank, *v.shape), name=f"eigenvectors_{i}", **shared)
            for i, v in enumerate(var_list)
        ]
        self._eigenvalues = self.add_variable((self.rank,), name="eigenvalues", **shared)
        self._rho = self.add_variable((), initializer="ones", name="rho", **shared)
        self._preconditioned_curvature = self.add_variable(
            (), name="preconditioned_curvature", **shared
        )
        self._sketch_updates = self.add_variable(
            (), dtype="int64", name="sketch_updates", aggregation="only_first_replica"
        )
        self._momentums = []
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="sketchysgd_sketch")
        track_optimizer_variable(self, self._seed_generator.state)

    # -------------------------------------------------------------- statistics

    def _product(self, batch: TrainBatch, tangents: list) -> list[tf.Tensor]:
        if self.curvature == "hessian":
            return batch.hessian_vector_product(tangents)
        return batch.gauss_newton_vector_product(tangents)

    def _flat_product(self, batch: TrainBatch, vector: tf.Tensor) -> tf.Tensor:
        """``H v`` in the flat layout; ``v`` scaled to unit max first (float16 range)."""
        scale = tf.reduce_max(tf.abs(vector))
        scale = tf.where(scale > 0, scale, tf.ones_like(scale))
        tangents = flat.unflatten(vector / scale, flat.variable_shapes(batch.variables))
        return flat.flatten(self._product(batch, tangents), vector.dtype) * scale

    def _clipped_gradients(self, batch: TrainBatch) -> list[tf.Tensor]:
        """This replica's clipped gradient: what ``update_step`` will see (summed)."""
        dtypes = [v.dtype for v in batch.variables]
        return clipped_gradients(self, [tf.cast(g, d) for g, d in zip(batch.gradients(), dtypes)])

    def _source(self, replica: TrainBatch) -> TrainBatch:
        """The batch the curvature is measured on: the step's, or its first samples."""
        if self.hessian_batch_size is None:
            return replica
        return replica.subset(math.ceil(self.hessian_batch_size / replica.num_replicas))

    def _sketch(self, replica: TrainBatch, gate: StepGate, omega: tf.Tensor):
        """Generator for ``replica_sum``: the refreshed rank-r factor and ``ρ``."""
        source = self._source(replica)
        if self.curvature == "hessian":
            source.scaled_gradients()  # once, outside the vectorised function below
        local = stacked_map(lambda row: self._flat_product(source, row), tf.transpose(omega))
        sketch = gate.enter((yield gate.exit(local)))
        # LAPACK's eigendecomposition raises on NaN: factor zeros instead, and report.
        finite = distribute.all_finite([sketch])
        sketch = tf.where(finite, sketch, tf.zeros_like(sketch))
        # Factored at unit max (the approximation is homogeneous in Y): a finite sketch
        # of 1e20 would overflow the float32 core ΩᵀY and fail the eigendecomposition.
        # A power of two, so that the scaling itself rounds nothing.
        largest = tf.reduce_max(tf.abs(sketch))
        exponent = tf.math.floor(tf.math.log(largest) / math.log(2.0))
        scale = tf.where(largest > 0, tf.pow(tf.cast(2, sketch.dtype), exponent), 1)
        values, vectors = nystrom_factors(omega, tf.transpose(sketch / scale))
        values = values * scale
        values, vectors, rho = skm.split_spectrum(values, vectors, self.rank, self.rho)
        return [gate.exit(t) for t in (values, vectors, rho, finite)]

    def _power(self, replica: TrainBatch, gate: StepGate, preconditioner: tuple, start):
        """Generator for ``replica_sum``: ``λ_max(P^{-1/2} H P^{-1/2})``.

        Starts from ``P^{1/2} d`` for this step's direction ``d``. The first
        ``tracking_iterations`` power steps run at every step, the others on refresh
        steps only. Returns the estimate after all
        of them on refresh steps; otherwise the larger of the stored estimate and the
        tracking steps' (so the step size can only shrink between refreshes).
        """
        source = self._source(replica)
        values, vectors, rho = preconditioner
        every_step = StepGate(None)
        vector = start
        tracked = (tf.convert_to_tensor(self._preconditioned_curvature), start)
        final = tracked
        for i in range(self.power_iterations):
            live = every_step if i < self.tracking_iterations else gate
            here = live.enter(vector)
            tangent = skm.shifted_power(vectors, values, rho, here, -0.5)
            product = yield live.exit(self._flat_product(source, tangent))
            estimate, here = skm.power_iteration_step(
                vectors, values, rho, here, live.enter(product)
            )
            final = (live.exit(estimate), live.exit(here))
            if i == self.tracking_iterations - 1:
                tracked = final
            vector = final[1]
        refresh = gate.predicate if gate.predicate is not None else tf.constant(True)
        # Between refreshes the estimate only grows: a power step from a stale vector
        # can badly underestimate λ_max, and the step size must never jump up on that.
        stored = tf.convert_to_tensor(self._preconditioned_curvature)
        return tf.where(refresh, final[0], tf.maximum(tracked[0], stored))

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """This step's preconditioner (refreshed or stored), step size and ``w ⊙ Ûᵀ m``."""
        dtype = self._state_dtype
        dim = flat.flat_dim(batch.variables)
        shapes = flat.variable_shapes(batch.variables)
        size = self.rank + self.oversampling
        with batch.step_graph():
            iteration = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)
            refresh = refresh_due(iteration, self.update_every)
            gate = StepGate(refresh if self.update_every > 1 else None)
            # Drawn at every step, so the sketches do not depend on update_every.
            sketch_seed, start_seed = tf.unstack(
                tf.random.experimental.stateless_split(self._seed_generator.next(), 2, alg="philox")
            )
            if batch.replicas is not None:
                distribute.mirror_copies(self._seed_generator.state)
            gaussian = _gaussian((dim, size), gate.enter(sketch_seed), dtype)
            omega, _ = tf.linalg.qr(gaussian)
            values, vectors, rho, finite = distribute.replica_sum(
                batch, lambda replica: self._sketch(replica, gate, omega)
            )
            finite = tf.logical_and(finite, distribute.all_finite([values, vectors, rho]))
            updated = tf.logical_and(refresh, finite)
            updated = tf.logical_and(updated, rho > 0)
            new_rows = flat.unflatten_rows(tf.transpose(vectors), shapes)
            rows = [
                tf.where(updated, new, tf.convert_to_tensor(old))
                for new, old in zip(new_rows, self._eigenvector_rows)
            ]
            values = tf.where(updated, values, tf.convert_to_tensor(self._eigenvalues))
            rho = tf.where(updated, rho, tf.convert_to_tensor(self._rho))
            shared = {"updated": updated, "eigenvalues": values, "rho": rho}
            if self.automatic:
                # The whole gradient (summed over replicas): the step's direction d is
                # needed here, to measure the curvature along it.
                def gradient(replica):
                    return (yield flat.flatten(self._clipped_gradients(replica), dtype))

                previous = flat.flatten(self._momentums, dtype) if self._momentums else None
                moment = self._moment(distribute.replica_sum(batch, gradient), previous)
                vectors = tf.transpose(flat.flatten_rows(rows))
                projections = tf.linalg.matvec(vectors, moment, transpose_a=True)
                direction = skm.shifted_power(vectors, values, rho, moment, -1.0)
                # From z = P^{1/2} d the first power step's Rayleigh quotient is
                # dᵀHd / dᵀPd: the curvature along this step's own direction.
                start = skm.shifted_power(vectors, values, rho, direction, 0.5)
                random = _gaussian((dim,), start_seed, dtype)
                start = skm.unit(tf.where(tf.reduce_any(start != 0), start, random))
                curvature = distribute.replica_sum(
                    batch,
                    lambda replica: self._power(replica, gate, (values, vectors, rho), start),
                )
                usable = tf.logical_and(curvature > 0, tf.math.is_finite(curvature))
                curvature = tf.where(
                    usable, curvature, tf.convert_to_tensor(self._preconditioned_curvature)
                )
                shared.update(
                    preconditioned_curvature=curvature,
                    step_size=exact_cast(self.step_scale, dtype) / curvature,
                )
            else:

                def projected(replica):
                    gradients = self._clipped_gradients(replica)
                    return (yield _project(rows, gradients))

                previous = _project(rows, self._momentums) if self._momentums else None
                projections = self._moment(distribute.replica_sum(batch, projected), previous)
            shared["coefficients"] = skm.inverse_weights(values, rho) * projections
            labels_valid = _labels.guard_training_labels(batch, None, type(self).__name__)
        # Before the first finite sketch and step size there is nothing to step with.
        ready = tf.logical_or(updated, self._sketch_updates > 0)
        if self.automatic:
            ready = tf.logical_and(ready, shared["preconditioned_curvature"] > 0)
        return StepStatistics(
            per_variable={"eigenvector_rows": rows},
            shared=shared,
            checks=[_labels.as_finite_flag(labels_valid)],
            proceed=ready,
        )

    def _moment(self, gradient: tf.Tensor, previous: tf.Tensor | None) -> tf.Tensor:
        """``m̂``, or a linear map of it, from the same map of ``g`` and of the stored ``m``."""
        if self.momentum == 0:
            return gradient
        beta = exact_cast(self.momentum, gradient.dtype)
        moment = beta * tf.cast(previous, gradient.dtype) + (1 - beta) * gradient
        return moment / self._bias_correction(moment.dtype)

    def _bias_correction(self, dtype: tf.DType) -> tf.Tensor:
        step = tf.cast(self.iterations + 1, dtype)
        return 1 - tf.pow(exact_cast(self.momentum, dtype), step)

    # ------------------------------------------------------------------ update

    def begin_step(self, statistics: StepStatistics) -> None:
        if self.automatic:
            self.learning_rate.assign(
                tf.cast(statistics.shared["step_size"], self.learning_rate.dtype)
            )

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """``θ ← θ − η P⁻¹ m`` for one variable, with this step's ``Û`` rows for it."""
        statistics = self.statistics_for(variable)
        dtype = self._state_dtype
        gradient = tf.convert_to_tensor(gradient)  # dense (an Embedding's is IndexedSlices)
        moment = tf.cast(gradient, dtype)
        if self.momentum > 0:
            buffer = self._momentums[variable_index(self, variable)]
            beta = exact_cast(self.momentum, buffer.dtype)
            new = buffer + (1 - beta) * (tf.cast(gradient, buffer.dtype) - buffer)
            self.assign(buffer, new)
            moment = tf.cast(new, dtype) / self._bias_correction(dtype)
        direction = skm.sketchy_direction(
            moment,
            statistics["eigenvector_rows"],
            statistics["coefficients"],
            statistics["rho"],
        )
        step = tf.cast(learning_rate, dtype) * direction
        self.assign_sub(variable, tf.cast(step, variable.dtype))

    def finish_step(self, statistics: StepStatistics) -> None:
        shared = statistics.shared

        def store():
            for slot, rows in zip(
                self._eigenvector_rows, statistics.per_variable["eigenvector_rows"]
            ):
                self.assign(slot, rows)
            self.assign(self._eigenvalues, shared["eigenvalues"])
            self.assign(self._rho, shared["rho"])
            self.assign_add(self._sketch_updates, tf.constant(1, tf.int64))

        tf.cond(shared["updated"], store, lambda: None)
        if self.automatic:
            self.assign(self._preconditioned_curvature, shared["preconditioned_curvature"])

    # ------------------------------------------------------------- diagnostics

    @property
    def eigenvalues(self) -> tf.Variable:
        """``Λ̂``: the kept sketched eigenvalues, descending (zeros before the first sketch)."""
        self._check_built()
        return self._eigenvalues

    @property
    def eigenvectors(self) -> tf.Tensor:
        """``Ûᵀ`` in the flat parameter layout, shape ``(rank, dim)``."""
        self._check_built()
        return flat.flatten_rows(self._eigenvector_rows)

    @property
    def shift(self) -> tf.Variable:
        """``ρ`` in use (1 before the first sketch)."""
        self._check_built()
        return self._rho

    @property
    def sketch_updates(self) -> tf.Variable:
        """The number of refreshes of the preconditioner so far."""
        self._check_built()
        return self._sketch_updates

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The preconditioner's state for the diagnostic callbacks (read only).

        Returns:
            ``eigenvalues`` (``Λ̂``, a vector), ``rho``, ``preconditioned_curvature``
            (``λ_max(P^{-1/2} H P^{-1/2})``, with ``learning_rate="auto"``), ``step_size``,
            ``sketch_updates`` and ``skipped_steps``.
        """
        self._check_built()
        summary = {
            "eigenvalues": tf.cast(self._eigenvalues, tf.float32),
            "rho": tf.cast(self._rho, tf.float32),
            "step_size": tf.cast(self.learning_rate, tf.float32),
            "sketch_updates": tf.cast(self._sketch_updates, tf.float32),
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }
        if self.automatic:
            summary["preconditioned_curvature"] = tf.cast(
                self._preconditioned_curvature, tf.float32
            )
        return summary

    def get_config(self) -> dict:
        config = super().get_config()
        if self.automatic:
            config["learning_rate"] = "auto"
        config.update(
            {
                "rank": self.rank,
                "rho": self.rho,
                "oversampling": self.oversampling,
                "update_every": self.update_every,
                "hessian_batch_size": self.hessian_batch_size,
                "step_scale": self.step_scale,
                "power_iterations": self.power_iterations,
                "tracking_iterations": self.tracking_iterations,
                "momentum": self.momentum,
                "curvature": self.curvature,
                "seed": self.seed,
            }
        )
        return config
