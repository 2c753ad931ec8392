"""``ClassSubspaceNewton``: Newton in the class-gradient subspace, SGD in its complement.

The optimizer of the class-subspace paper (eq. 5–17). Its math is in
:mod:`~keras_curv.optimizers.class_subspace_math` (pure functions), its batch statistics
in :mod:`~keras_curv.optimizers.class_statistics` (class directions) and
:mod:`~keras_curv.optimizers.eigen_statistics` (``directions="eigen"``); this module is
the Keras shell: arguments, state, and the per-variable update.
``docs/class_subspace_newton.md`` explains the method, its options and its cost.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import memory, validation
from keras_curv._internal.keras_privates import clipped_gradients, variable_index
from keras_curv._internal.losses import loss_family
from keras_curv._internal.model import output_shapes
from keras_curv.curvature.class_gradients import num_classes_of
from keras_curv.curvature.stability import stability_threshold
from keras_curv.curvature.structured import LowRankPlusDiagonal
from keras_curv.optimizers import _labels, class_statistics, distribute, eigen_statistics
from keras_curv.optimizers import class_subspace_math as csm
from keras_curv.optimizers._graph import StepGate, under_xla
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch

CURVATURES = ("paper", "gauss_newton", "projected_newton", "hessian")
INVERSES = ("diagonal", "exact")
DIRECTIONS = ("class", "eigen")
MOMENTUM_ON = ("step", "complement")
# `curvature=None` means these, per kind of directions: the variants that train
# (docs/class_subspace_newton.md, "What we found"); "paper" is eq. 15-17 as published.
DEFAULT_CURVATURE = {"class": "projected_newton", "eigen": "gauss_newton"}
# Loss families the class-subspace curvature model (softmax cross-entropy) describes.
_CLASSIFICATION = ("categorical", "categorical_focal")


@keras.saving.register_keras_serializable(package="keras_curv")
class ClassSubspaceNewton(CurvatureOptimizer):
    """Newton in the span of the class gradients, SGD in its complement (eq. 15–17).

    Each step absorbs the batch's class gradients c^B_k and curvatures λ^B_k into
    bias-corrected EMAs (eq. 16–17; per class, classes absent from the batch unchanged),
    forms the unit directions v_k = c_k / |c_k|, and steps

    ```
    d = η g + Σ_k a_k v_k,    a_k = (1/λ_k − η) v_kᵀ g      (eq. 15)
    θ ← θ − d                                             (or heavy ball on d)
    ```

    The default, ``curvature="projected_newton"``, is Newton on the whole C x C
    Gauss–Newton block of the subspace, damped by 1/η (proximal: never longer than the
    SGD step along the class directions); ``curvature="paper"`` is eq. 15–17 exactly.
    Options: ``"gauss_newton"`` (the Gauss–Newton Rayleigh quotients),
    ``inverse="exact"`` (no orthogonality assumption), ``directions="eigen"`` (the top-C
    eigenvectors of the batch Gauss–Newton matrix or Hessian instead of the class
    directions), ``momentum_on`` (heavy ball on the whole step or on the SGD part only,
    the default except for ``"paper"``), ``damping``, ``max_inverse_curvature``,
    ``update_each``. See
    ``docs/class_subspace_newton.md``.

    Args:
        learning_rate: η, a float or a Keras learning-rate schedule.
        gamma: EMA decay γ in (0, 1).
        momentum: Heavy-ball momentum μ in ``[0, 1)``.
        curvature: ``"paper"`` (eq. 17 exactly), ``"gauss_newton"`` or
            ``"projected_newton"`` for class directions; ``"gauss_newton"`` or
            ``"hessian"`` (the operator whose eigenvectors are used) for eigen
            directions; ``None``: ``"projected_newton"`` (the variant that trains),
            resp. ``"gauss_newton"``.
        inverse: ``"diagonal"`` (eq. 13–15) or ``"exact"``.
        damping: δ ≥ 0 added to each λ_k (δ VᵀV to the block for ``"projected_newton"``), or
            ``None``: 1/η for ``"projected_newton"`` and eigen directions, else 0.
        max_inverse_curvature: Optional positive cap on 1/λ_k.
        update_each: Refresh the statistics every this many steps (int ≥ 1).
        num_classes: C, or ``None`` to read it from the model output on the first step.
        directions: ``"class"`` (v_k = c_k / |c_k|) or ``"eigen"`` (the top-C Ritz
            vectors of the batch curvature, one warm-started subspace iteration per
            refresh, with their Rayleigh quotients as λ_k).
        momentum_on: ``"step"`` (heavy ball on d) or ``"complement"`` (heavy ball on the
            SGD part, the Newton part added unamplified); ``None``: ``"step"`` for
            ``"paper"`` (as published), else ``"complement"``.
        diagnostics: Also measure the Gauss–Newton quotients v_kᵀ G_B v_k of the class
            directions at each refresh (for ``curvature_summary()``; C extra
            double-backward passes for ``"paper"``). Never changes the step.
        eigen_iterations: Subspace-iteration passes per refresh (C products each).
        eigen_tolerance: ``directions="eigen"`` takes a Newton step along a Ritz vector
            u_k only when its relative residual ``‖A u_k − θ_k u_k‖ / |θ_k|`` on the
            batch is at most this (else the SGD step); ``None``: always.
        seed: Seed of the random start block of ``directions="eigen"``.
        name: Optimizer name.
        **kwargs: Keras's optimizer arguments (``weight_decay``, ``clipnorm``, ``use_ema``...).

    Example:
        >>> model.compile(optimizer=keras_curv.ClassSubspaceNewton(0.05),
        ...               loss="sparse_categorical_crossentropy")
        >>> model.fit(x, y, batch_size=128)
        >>> model.optimizer.class_curvatures        # lambda_k, shape (C,)
    """

    def __init__(
        self,
        learning_rate: Any = 0.1,
        gamma: float = 0.9,
        momentum: float = 0.0,
        curvature: str | None = None,
        inverse: str = "diagonal",
        damping: float | None = None,
        max_inverse_curvature: float | None = None,
        update_each: int = 1,
        num_classes: int | None = None,
        directions: str = "class",
        momentum_on: str | None = None,
        diagnostics: bool = False,
        eigen_iterations: int = 1,
        eigen_tolerance: float | None = 0.1,
        seed: int | None = None,
        name: str = "class_subspace_newton",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.gamma = validation.decay(gamma, "gamma", allow_zero=False)
        self.momentum = validation.decay(momentum, "momentum")
        self.directions = validation.choice(directions, "directions", DIRECTIONS)
        if curvature is None:
            curvature = DEFAULT_CURVATURE[self.directions]
        self.curvature = validation.choice(curvature, "curvature", CURVATURES)
        allowed = eigen_statistics.OPERATORS if self.directions == "eigen" else CURVATURES[:3]
        if self.curvature not in allowed:
            raise ValueError(
                f"`curvature={self.curvature!r}` does not go with `directions="
                f"{self.directions!r}`: pass one of {allowed} (or None for "
                f"{DEFAULT_CURVATURE[self.directions]!r})."
            )
        self.inverse = validation.choice(inverse, "inverse", INVERSES)
        self.damping = validation.non_negative(damping, "damping", allow_none=True)
        self.max_inverse_curvature = validation.positive(
            max_inverse_curvature, "max_inverse_curvature", allow_none=True
        )
        self.update_each = validation.integer(update_each, "update_each", minimum=1)
        self.num_classes = validation.integer(
            num_classes, "num_classes", minimum=2, allow_none=True
        )
        if momentum_on is None:
            # The paper's heavy ball is on the whole step; elsewhere the Newton part is
            # kept out of the buffer (1/(1 - mu) times a Newton step overshoots).
            momentum_on = "step" if self.curvature == "paper" else "complement"
        self.momentum_on = validation.choice(momentum_on, "momentum_on", MOMENTUM_ON)
        if not isinstance(diagnostics, bool):
            raise ValueError(f"`diagnostics` must be True or False; got {diagnostics!r}.")
        self.diagnostics = diagnostics
        self.eigen_iterations = validation.integer(eigen_iterations, "eigen_iterations", minimum=1)
        self.eigen_tolerance = validation.positive(
            eigen_tolerance, "eigen_tolerance", allow_none=True
        )
        self.seed = validation.seed(seed)
        self._class_state_built = False

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Creates the momentum buffers and, once C is known, the class statistics."""
        if self.built:
            return
        super().build(var_list)
        self._momentums = []
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(var_list, "momentum")
        if self.num_classes is not None:
            self._build_class_state()

    def build_for_model(self, model: keras.Model) -> None:
        """Creates the class statistics when C can be read off the model's output shape."""
        if self._class_state_built:
            return
        leaves = []
        keras.tree.map_shape_structure(leaves.append, output_shapes(model) or [])
        if len(leaves) == 1 and len(leaves[0]) == 2 and (leaves[0][-1] or 0) >= 2:
            self._ensure_class_state(int(leaves[0][-1]))

    def _build_class_state(self) -> None:
        """The per-class state: see ``_state_size`` for the layout."""
        if self._class_state_built:
            return
        variables = self._trainable_variables
        num = self.num_classes
        memory.ensure_fits(
            num + 1,
            variables,
            f"ClassSubspaceNewton with C = {num} classes (C class averages and the momentum)",
            "Use fewer classes, a smaller model, or an optimizer whose state does not grow "
            "with C (see docs/class_subspace_newton.md#memory).",
        )
        self._stat_dtype = variables[0].dtype
        # Derived from replica-reduced statistics, equal on every replica.
        shared = {"aggregation": "only_first_replica"}

        def per_variable(name, **kwargs):
            return [
                self.add_variable((num, *v.shape), dtype=v.dtype, name=f"{name}_{i}", **kwargs)
                for i, v in enumerate(variables)
            ]

        if self.directions == "eigen":
            start = keras.initializers.RandomNormal(seed=self.seed)
            self._eigen_basis = per_variable("eigen_basis", initializer=start, **shared)
            self._eigen_directions = per_variable("eigen_direction", **shared)
            self._eigen_curvature = self.add_variable(
                (num,), dtype=self._stat_dtype, name="eigen_curvature", **shared
            )
            self._eigen_residual = self.add_variable(
                (num,), dtype=self._stat_dtype, name="eigen_residual", **shared
            )
        else:
            self._class_sums = per_variable("class_gradient", **shared)
            self._curvature_sq = self.add_variable(
                (num,), dtype=self._stat_dtype, name="curvature_sq", **shared
            )
        self._class_steps = self.add_variable(
            (num,), dtype=self._stat_dtype, name="class_steps", **shared
        )
        if self.curvature == "projected_newton":
            self._subspace_curvature = self.add_variable(
                (num, num), dtype=self._stat_dtype, name="subspace_curvature", **shared
            )
        if self._tracks_quotients:
            self._quotients = self.add_variable(
                (num,), dtype=self._stat_dtype, name="gauss_newton_quotient", **shared
            )
        self._class_state_built = True

    @property
    def _tracks_quotients(self) -> bool:
        return self.diagnostics and self.directions == "class"

    def _state_size(self) -> int:
        """How many variables the class state holds (for :meth:`load_own_variables`)."""
        eigen = self.directions == "eigen"
        size = (2 if eigen else 1) * len(self._trainable_variables) + (3 if eigen else 2)
        size += 1 if self.curvature == "projected_newton" else 0
        return size + (1 if self._tracks_quotients else 0)

    def load_own_variables(self, store: Any) -> None:
        """Restores the state, creating the class statistics first if the store has them.

        The class statistics exist once C is known (first traced step, or
        ``num_classes``). A fresh optimizer restoring a trained one's checkpoint
        (``BackupAndRestore``, ``model.load_weights``) reads C from the stored
        ``(C, *shape)`` state instead of letting Keras skip the whole state.
        """
        if self.built and not self._class_state_built:
            base = len(self.variables)
            if len(store.keys()) == base + self._state_size():
                first = store[str(base)]
                variable = self._trainable_variables[0]
                if tuple(first.shape[1:]) == tuple(variable.shape) and first.shape[0] >= 2:
                    self._ensure_class_state(int(first.shape[0]))
        super().load_own_variables(store)

    def _ensure_class_state(self, num_classes: int) -> None:
        if self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(
                f"{type(self).__name__} was set up for {self.num_classes} classes but the "
                f"model outputs {num_classes}. Use a fresh optimizer for a different model."
            )
        self.num_classes = num_classes
        if self._class_state_built:
            return
        try:
            with tf.init_scope():
                self._build_class_state()
        except ValueError as error:  # tf.function allows new variables on a first call only
            self.num_classes = None
            raise ValueError(
                f"{type(self).__name__} could not read the number of classes off model "
                "outputs before training; pass `num_classes=C` to the optimizer."
            ) from error

    def _read_state(self) -> tuple:
        """``(sums, curvature_sq, steps)``, or for eigen directions
        ``(block, directions, curvature, residual)``."""
        if self.directions == "eigen":
            return (
                [tf.convert_to_tensor(q) for q in self._eigen_basis],
                [tf.convert_to_tensor(u) for u in self._eigen_directions],
                tf.convert_to_tensor(self._eigen_curvature),
                tf.convert_to_tensor(self._eigen_residual),
            )
        return (
            [tf.convert_to_tensor(m) for m in self._class_sums],
            tf.convert_to_tensor(self._curvature_sq),
            tf.convert_to_tensor(self._class_steps),
        )

    # -------------------------------------------------------------- statistics

    def _check_model(self, batch: TrainBatch) -> int:
        name = type(self).__name__
        if isinstance(batch.y_pred, (list, tuple, dict)):
            raise ValueError(
                f"{name} needs a C-way classifier with one output of shape (batch, C); model "
                f"{batch.model.name!r} has {len(batch.y_pred)} outputs. Multi-output models "
                "have no single class subspace."
            )
        num_classes = num_classes_of(batch.model, batch.y_pred)
        family = loss_family(getattr(batch.model, "loss", None))
        if family is not None and family not in _CLASSIFICATION:
            raise ValueError(
                f"{name} is a Newton method for softmax cross-entropy over C classes, but "
                f"model {batch.model.name!r} is compiled with a {family!r} loss. Compile with "
                "'sparse_categorical_crossentropy' (integer labels) or "
                "'categorical_crossentropy' (one-hot labels), with from_logits=True for a "
                "logits output; for other losses use keras_curv.AdaHessian."
            )
        return num_classes

    def _damping(self, dtype: tf.DType, learning_rate: Any) -> tf.Tensor:
        """The damping in force: ``damping``, or 0 (class ``paper``/``gauss_newton``), or 1/η."""
        if self.damping is not None:
            return tf.constant(self.damping, dtype)
        if self.curvature != "projected_newton" and self.directions != "eigen":
            return tf.constant(0.0, dtype)
        return 1.0 / tf.cast(learning_rate, dtype)

    def _parts(self, stats: dict, block: tf.Tensor | None, lr: tf.Tensor) -> tuple:
        """``(n, b)``: the step is ``d = lr (g − Σ_k b_k v_k) + Σ_k n_k v_k``."""
        damping = self._damping(lr.dtype, lr)
        projections = stats["projections"]
        if self.curvature == "projected_newton":
            gram = self._gram(stats["directions"])
            return csm.projected_newton_parts(gram, block, damping, projections)
        # Eigen directions: |θ| (a Hessian's Ritz values may be negative: saddle-free).
        curvature = csm.effective_curvature(
            tf.abs(stats["curvature"]), damping, self.max_inverse_curvature
        )
        if self.inverse == "diagonal" or self.directions == "eigen":
            return csm.diagonal_parts(curvature, projections)
        return csm.exact_parts(self._gram(stats["directions"]), curvature, projections)

    def _gram(self, directions: list[tf.Tensor]) -> tf.Tensor:
        rows = csm.flat_directions(directions, self.num_classes)
        return tf.matmul(rows, rows, transpose_b=True)

    def _clipped(self, replica: TrainBatch) -> list[tf.Tensor]:
        # The gradient update_step will see: unscaled, clipped (before Keras sums it over
        # replicas, which is linear, so the projections can be summed instead).
        dtypes = [v.dtype for v in replica.variables]
        return clipped_gradients(self, [tf.cast(g, d) for g, d in zip(replica.gradients(), dtypes)])

    def _replica_statistics(self, replica: TrainBatch, num_classes: int, gate: StepGate):
        if self.directions == "eigen":
            return eigen_statistics.replica_statistics(
                replica,
                operator=self.curvature,
                dtype=self._stat_dtype,
                gate=gate,
                iterations=self.eigen_iterations,
                state=self._read_state(),
                gradients=self._clipped,
            )
        return class_statistics.replica_statistics(
            replica,
            num_classes=num_classes,
            dtype=self._stat_dtype,
            curvature_mode=self.curvature,
            gate=gate,
            state=self._read_state(),
            gamma=self.gamma,
            gradients=self._clipped,
            gauss_newton_quotients=self._tracks_quotients,
        )

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """Absorbs the batch's statistics and forms this step's Newton coefficients."""
        num_classes = self._check_model(batch)
        self._ensure_class_state(num_classes)
        labels_valid = _labels.guard_training_labels(
            batch, num_classes, type(self).__name__, always=True
        )
        with batch.step_graph():
            self._warn_if_gate_cannot_skip()
            refresh = tf.equal(self.iterations % self.update_each, 0)
            gate = StepGate(refresh if self.update_each > 1 else None)
            stats = distribute.replica_sum(
                batch, lambda replica: self._replica_statistics(replica, num_classes, gate)
            )
            block = None
            if self.curvature == "projected_newton":
                stored = tf.convert_to_tensor(self._subspace_curvature)
                block = tf.where(tf.reduce_any(stats["present"]), stats["block"], stored)
            lr = tf.cast(self.learning_rate, self._stat_dtype)
            newton, projection = self._parts(stats, block, lr)
            coefficients = csm.coefficients((newton, projection), lr)
            # A direction that is not there (a class never seen, a zero class gradient, a
            # lost eigen direction) takes no Newton step, nor does one whose coefficient
            # is not finite (lambda_k underflowed to 0): it gets the SGD step instead.
            usable = tf.logical_and(stats["alive"], tf.math.is_finite(coefficients))
            if self.directions == "eigen" and self.eigen_tolerance is not None:
                # Newton only along converged Ritz vectors: early on (a random start
                # block) and in the bulk, Ritz values are not curvatures of anything.
                tolerance = tf.constant(self.eigen_tolerance, stats["residual"].dtype)
                usable = tf.logical_and(usable, stats["residual"] <= tolerance)
            coefficients = tf.where(usable, coefficients, tf.zeros_like(coefficients))
            newton = tf.where(usable, newton, tf.zeros_like(newton))
        shared = {"coefficients": coefficients, "newton": newton}
        per_variable = {"direction": stats["directions"]}
        if self.directions == "eigen":
            per_variable["basis"] = stats["basis"]
            shared["curvature"] = stats["curvature"]
            shared["residual"] = stats["residual"]
            shared["refreshed"] = stats["refreshed"]
        else:
            per_variable["sum"] = stats["sums"]
            shared["curvature_sq"] = stats["curvature_sq"]
            shared["steps"] = stats["steps"]
            shared["present"] = stats["present"]
            if self._tracks_quotients:
                shared["quotients"] = stats["quotients"]
        if block is not None:
            shared["block"] = block
        return StepStatistics(
            per_variable=per_variable,
            shared=shared,
            checks=[_labels.as_finite_flag(labels_valid)],
        )

    def _warn_if_gate_cannot_skip(self) -> None:
        if self.update_each == 1 or not under_xla() or getattr(self, "_warned_xla", False):
            return
        self._warned_xla = True
        warnings.warn(
            f"{type(self).__name__}(update_each={self.update_each}) under jit_compile: XLA "
            "has no dead-branch pruning for the Jacobian, so the class statistics are "
            "computed every step and absorbed only every update_each steps. Compile "
            "without jit_compile to skip their cost.",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ update

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """``d = lr g + Σ_k a_k v_k[variable]``; ``θ ← θ − d`` (or heavy ball)."""
        statistics = self.statistics_for(variable)
        direction = statistics["direction"]
        step = csm.subspace_step(gradient, statistics["coefficients"], direction, learning_rate)
        step = tf.cast(step, variable.dtype)
        if self.momentum == 0:
            self.assign_sub(variable, step)
            return
        momentum = tf.constant(self.momentum, variable.dtype)
        buffer = self._momentums[variable_index(self, variable)]
        if self.momentum_on == "step":
            self.assign(buffer, momentum * buffer + step)
            self.assign_sub(variable, buffer)
            return
        # Heavy ball on the SGD part only: the Newton part is not amplified by 1/(1 - mu).
        newton = tf.cast(csm.newton_step(statistics["newton"], direction), variable.dtype)
        self.assign(buffer, momentum * buffer + (step - newton))
        self.assign_sub(variable, buffer + newton)

    def finish_step(self, statistics: StepStatistics) -> None:
        shared = statistics.shared
        if self.directions == "eigen":
            for slot, value in zip(self._eigen_basis, statistics.per_variable["basis"]):
                self.assign(slot, value)
            for slot, value in zip(self._eigen_directions, statistics.per_variable["direction"]):
                self.assign(slot, value)
            self.assign(self._eigen_curvature, shared["curvature"])
            self.assign(self._eigen_residual, shared["residual"])
            refreshed = tf.cast(shared["refreshed"], self._stat_dtype)
            self.assign_add(self._class_steps, refreshed * tf.ones_like(self._class_steps))
        else:
            for slot, value in zip(self._class_sums, statistics.per_variable["sum"]):
                self.assign(slot, value)
            self.assign(self._curvature_sq, shared["curvature_sq"])
            self.assign(self._class_steps, shared["steps"])
            if "quotients" in shared:
                stored = tf.convert_to_tensor(self._quotients)
                self.assign(
                    self._quotients, tf.where(shared["present"], shared["quotients"], stored)
                )
        if "block" in shared:
            self.assign(self._subspace_curvature, shared["block"])

    # ------------------------------------------------------------- diagnostics

    def _check_state(self) -> None:
        if not self._class_state_built:
            raise ValueError(
                "The class statistics do not exist yet: train at least one step "
                "(or pass `num_classes`) first."
            )

    def _current(self) -> tuple:
        """``(means, curvature, directions, alive)`` as the next step starts from."""
        self._check_state()
        if self.directions == "eigen":
            directions = [tf.convert_to_tensor(u) for u in self._eigen_directions]
            curvature = tf.convert_to_tensor(self._eigen_curvature)
            return None, curvature, directions, None
        return csm.derived(*self._read_state(), self.gamma)

    @property
    def class_curvatures(self) -> tf.Tensor:
        """The curvatures λ_k, shape ``(C,)`` (1 for classes not yet seen).

        With ``directions="eigen"``: the Ritz values θ_k of the last refresh (0 before it).
        """
        return self._current()[1]

    @property
    def class_means(self) -> list[tf.Tensor]:
        """The bias-corrected class gradients c_k, per variable ``(C, *shape)``."""
        if self.directions == "eigen":
            raise ValueError(
                "class_means: with directions='eigen' the optimizer keeps no class "
                "gradients; read class_directions() for the eigenvectors it uses."
            )
        return self._current()[0]

    def class_directions(self) -> tf.Tensor:
        """The unit directions v_k in the flat layout, shape ``(C, dim)``.

        The diagnostic callbacks' protocol: ``SubspaceAlignment`` compares these rows with
        the top Hessian eigenvectors.
        """
        return csm.flat_directions(self._current()[2], self.num_classes)

    @property
    def class_counts(self) -> tf.Tensor:
        """How many statistics updates each class received (t_k), shape ``(C,)``."""
        self._check_state()
        return tf.convert_to_tensor(self._class_steps)

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The curvature state for the diagnostic callbacks (read only).

        Returns:
            ``curvature`` (λ_k), ``inverse_curvature`` (1/λ_k after damping and cap),
            ``class_updates`` (t_k), each ``(C,)``; ``skipped_steps``;
            ``max_direction_cosine`` (the largest ``|cos(v_i, v_j)|``) and
            ``min_complement_eigenvalue`` (of ``I − Σ_k v_k v_kᵀ``; below 0 it is no
            projection); with ``directions="eigen"`` ``eigen_residual``; with
            ``diagnostics=True`` also ``gauss_newton_quotient``
            (v_kᵀ G_B v_k on the last refresh's batch) and ``curvature_over_quotient``.
        """
        curvature = self.class_curvatures
        damping = self._damping(curvature.dtype, self.learning_rate)
        effective = csm.effective_curvature(tf.abs(curvature), damping, self.max_inverse_curvature)
        rows = tf.cast(self.class_directions(), curvature.dtype)
        max_cosine, min_eigenvalue = csm.direction_overlap(tf.matmul(rows, rows, transpose_b=True))
        summary = {
            "curvature": curvature,
            "inverse_curvature": 1.0 / effective,
            "class_updates": tf.cast(self.class_counts, curvature.dtype),
            "skipped_steps": tf.cast(self._skipped_steps, curvature.dtype),
            "max_direction_cosine": max_cosine,
            "min_complement_eigenvalue": min_eigenvalue,
        }
        if self.directions == "eigen":
            summary["eigen_residual"] = tf.convert_to_tensor(self._eigen_residual)
        if self._tracks_quotients:
            quotient = tf.convert_to_tensor(self._quotients)
            summary["gauss_newton_quotient"] = quotient
            summary["curvature_over_quotient"] = tf.math.divide_no_nan(curvature, quotient)
        return summary

    # ----------------------------------------------- the diagnostic callbacks' protocol

    def _subspace_matrices(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(V, A, model core, lr)``: ``V`` the ``(dim, C)`` directions, the step's
        ``d = lr g + V A Vᵀ g`` and the curvature model ``V core Vᵀ``, at the current state."""
        _, curvature, directions, alive = self._current()
        rows = csm.flat_directions(directions, self.num_classes)
        lr = tf.cast(self.learning_rate, rows.dtype)
        damping = self._damping(rows.dtype, lr)
        gram = tf.matmul(rows, rows, transpose_b=True)
        if self.directions == "eigen":
            # Orthonormal Ritz vectors, λ_k = |θ_k| (+ damping), Newton only where converged.
            curvature = tf.cast(curvature, rows.dtype)
            alive = tf.linalg.diag_part(gram) > 0.5
            if self.eigen_tolerance is not None:
                residual = tf.cast(tf.convert_to_tensor(self._eigen_residual), rows.dtype)
                alive = tf.logical_and(alive, residual <= self.eigen_tolerance)
            effective = csm.effective_curvature(
                tf.abs(curvature), damping, self.max_inverse_curvature
            )
            inverse = tf.linalg.diag(1.0 / effective - lr)
            core = tf.linalg.diag(curvature)
        elif self.curvature == "projected_newton":
            block = tf.cast(tf.convert_to_tensor(self._subspace_curvature), rows.dtype)
            newton, pinv = csm.projected_newton_matrices(gram, block, damping)
            inverse = newton - lr * pinv
            core = tf.matmul(tf.matmul(pinv, block), pinv)  # Vᵀ (V core Vᵀ) V = block
        else:
            effective = csm.effective_curvature(curvature, damping, self.max_inverse_curvature)
            if self.inverse == "diagonal":
                inverse = tf.linalg.diag(1.0 / effective - lr)
            else:
                newton = csm.sym_pinv(tf.matmul(gram * effective[None, :], gram))
                inverse = newton - lr * csm.sym_pinv(gram)
            core = tf.linalg.diag(curvature)
        # As in the step: a class without a direction, or with a non-finite coefficient,
        # takes no Newton step.
        usable = tf.logical_and(alive, tf.reduce_all(tf.math.is_finite(inverse), axis=1))
        keep = tf.cast(usable, rows.dtype)
        inverse = tf.where(keep[:, None] * keep[None, :] > 0, inverse, tf.zeros_like(inverse))
        return tf.transpose(rows), inverse, core, lr

    def curvature_model(self) -> LowRankPlusDiagonal:
        """``Σ_k λ_k v_k v_kᵀ`` (``V K̃ Vᵀ`` for ``"projected_newton"``; protocol, read only).

        The low-rank Hessian of eq. 10 in the flat layout of the optimizer's variables.
        """
        basis, _, core, _ = self._subspace_matrices()
        return LowRankPlusDiagonal(basis, core, 0.0)

    def preconditioner(self) -> LowRankPlusDiagonal:
        """``P`` with ``d = lr P⁻¹ g``: ``P⁻¹ = I + V (A / lr) Vᵀ`` (protocol, read only).

        For orthonormal directions and ``inverse="diagonal"``, ``P = I + Σ_k (lr λ_k − 1)
        v_k v_kᵀ``: curvature ``λ_k`` along ``v_k``, ``1/lr`` elsewhere, in units of ``1/lr``.
        With far-from-orthogonal directions ``P⁻¹`` may be indefinite (the diagonal
        inverse assumes orthogonality); its power ``-1/2`` then raises ``ValueError``.
        """
        basis, inverse, _, lr = self._subspace_matrices()
        return LowRankPlusDiagonal(basis, inverse / lr, 1.0).power(-1)

    def stability_threshold(self) -> float:
        """``(2 + 2μ) / η``: heavy-ball momentum ``μ`` (on the whole step, or on the SGD
        part, whose rate is η, with ``momentum_on="complement"``)."""
        lr = float(keras.ops.convert_to_numpy(self.learning_rate))
        return stability_threshold(lr, self.momentum, "heavy_ball")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "gamma": self.gamma,
                "momentum": self.momentum,
                "curvature": self.curvature,
                "inverse": self.inverse,
                "damping": self.damping,
                "max_inverse_curvature": self.max_inverse_curvature,
                "update_each": self.update_each,
                "num_classes": self.num_classes,
                "directions": self.directions,
                "momentum_on": self.momentum_on,
                "diagnostics": self.diagnostics,
                "eigen_iterations": self.eigen_iterations,
                "eigen_tolerance": self.eigen_tolerance,
                "seed": self.seed,
            }
        )
        return config
