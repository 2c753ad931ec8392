"""``ClassSubspaceNewton``: Newton in the class-gradient subspace, SGD in its complement.

The optimizer of the class-subspace paper (eq. 5–17). Its math is in
:mod:`~keras_curv.optimizers.class_subspace_math` (pure functions) and its batch
statistics in :mod:`~keras_curv.optimizers.class_statistics`; this module is the Keras
shell: arguments, state, and the per-variable update. ``docs/class_subspace_newton.md``
explains the method, its options and its cost.
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
from keras_curv.optimizers import _labels, class_statistics, distribute
from keras_curv.optimizers import class_subspace_math as csm
from keras_curv.optimizers._graph import StepGate, under_xla
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import TrainBatch

CURVATURES = ("paper", "gauss_newton", "projected_newton")
INVERSES = ("diagonal", "exact")
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

    The defaults are eq. 15–17 exactly. Options: ``curvature="gauss_newton"`` (the
    Gauss–Newton Rayleigh quotients), ``"projected_newton"`` (Newton on the whole C x C
    block, damped by 1/η by default), ``inverse="exact"`` (no orthogonality assumption),
    ``damping``, ``max_inverse_curvature``, ``update_each``. See
    ``docs/class_subspace_newton.md``.

    Args:
        learning_rate: η, a float or a Keras learning-rate schedule.
        gamma: EMA decay γ in (0, 1).
        momentum: Heavy-ball momentum on the whole step, in ``[0, 1)``.
        curvature: ``"paper"`` (eq. 17), ``"gauss_newton"`` or ``"projected_newton"``.
        inverse: ``"diagonal"`` (eq. 13–15) or ``"exact"``.
        damping: δ ≥ 0 added to each λ_k (to the block for ``"projected_newton"``), or
            ``None``: 0, resp. 1/η.
        max_inverse_curvature: Optional positive cap on 1/λ_k.
        update_each: Refresh the class statistics every this many steps (int ≥ 1).
        num_classes: C, or ``None`` to read it from the model output on the first step.
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
        curvature: str = "paper",
        inverse: str = "diagonal",
        damping: float | None = None,
        max_inverse_curvature: float | None = None,
        update_each: int = 1,
        num_classes: int | None = None,
        name: str = "class_subspace_newton",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.gamma = validation.decay(gamma, "gamma", allow_zero=False)
        self.momentum = validation.decay(momentum, "momentum")
        self.curvature = validation.choice(curvature, "curvature", CURVATURES)
        self.inverse = validation.choice(inverse, "inverse", INVERSES)
        self.damping = validation.non_negative(damping, "damping", allow_none=True)
        self.max_inverse_curvature = validation.positive(
            max_inverse_curvature, "max_inverse_curvature", allow_none=True
        )
        self.update_each = validation.integer(update_each, "update_each", minimum=1)
        self.num_classes = validation.integer(
            num_classes, "num_classes", minimum=2, allow_none=True
        )
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
        """``(C, *shape)`` EMA sums per variable, ``(C,)`` curvature EMA and counts."""
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
        self._class_sums = [
            self.add_variable((num, *v.shape), dtype=v.dtype, name=f"class_gradient_{i}", **shared)
            for i, v in enumerate(variables)
        ]
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
        self._class_state_built = True

    def load_own_variables(self, store: Any) -> None:
        """Restores the state, creating the class statistics first if the store has them.

        The class statistics exist once C is known (first traced step, or
        ``num_classes``). A fresh optimizer restoring a trained one's checkpoint
        (``BackupAndRestore``, ``model.load_weights``) reads C from the stored
        ``(C, *shape)`` sums instead of letting Keras skip the whole state.
        """
        if self.built and not self._class_state_built:
            base = len(self.variables)
            extra = len(self._trainable_variables) + 2
            extra += 1 if self.curvature == "projected_newton" else 0
            if len(store.keys()) == base + extra:
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

    def _read_state(self) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
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
        """The damping in force: ``damping``, or 0 (``paper``/``gauss_newton``), or 1/η."""
        if self.damping is not None:
            return tf.constant(self.damping, dtype)
        if self.curvature != "projected_newton":
            return tf.constant(0.0, dtype)
        return 1.0 / tf.cast(learning_rate, dtype)

    def _coefficients(self, stats: dict, block: tf.Tensor | None, lr: tf.Tensor) -> tf.Tensor:
        """``a`` of the step ``d = lr g + Σ_k a_k v_k``."""
        damping = self._damping(lr.dtype, lr)
        projections = stats["projections"]
        if self.curvature == "projected_newton":
            gram = self._gram(stats["directions"])
            return csm.projected_newton_coefficients(gram, block, damping, projections, lr)
        curvature = csm.effective_curvature(
            stats["curvature"], damping, self.max_inverse_curvature
        )
        if self.inverse == "diagonal":
            return csm.diagonal_coefficients(curvature, projections, lr)
        return csm.exact_coefficients(self._gram(stats["directions"]), curvature, projections, lr)

    def _gram(self, directions: list[tf.Tensor]) -> tf.Tensor:
        rows = csm.flat_directions(directions, self.num_classes)
        return tf.matmul(rows, rows, transpose_b=True)

    def _clipped(self, replica: TrainBatch) -> list[tf.Tensor]:
        # The gradient update_step will see: unscaled, clipped (before Keras sums it over
        # replicas, which is linear, so the projections can be summed instead).
        dtypes = [v.dtype for v in replica.variables]
        return clipped_gradients(self, [tf.cast(g, d) for g, d in zip(replica.gradients(), dtypes)])

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """Absorbs the batch's class statistics and forms this step's Newton coefficients."""
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
                batch,
                lambda replica: class_statistics.replica_statistics(
                    replica,
                    num_classes=num_classes,
                    dtype=self._stat_dtype,
                    curvature_mode=self.curvature,
                    gate=gate,
                    state=self._read_state(),
                    gamma=self.gamma,
                    gradients=self._clipped,
                ),
            )
            block = None
            if self.curvature == "projected_newton":
                stored = tf.convert_to_tensor(self._subspace_curvature)
                block = tf.where(tf.reduce_any(stats["present"]), stats["block"], stored)
            lr = tf.cast(self.learning_rate, self._stat_dtype)
            coefficients = self._coefficients(stats, block, lr)
            # A class without a direction (never seen, or a zero class gradient) takes no
            # Newton step, nor does one whose coefficient is not finite (lambda_k
            # underflowed to 0): it gets the SGD step instead.
            usable = tf.logical_and(stats["alive"], tf.math.is_finite(coefficients))
            coefficients = tf.where(usable, coefficients, tf.zeros_like(coefficients))
        shared = {
            "coefficients": coefficients,
            "curvature_sq": stats["curvature_sq"],
            "steps": stats["steps"],
        }
        if block is not None:
            shared["block"] = block
        return StepStatistics(
            per_variable={"direction": stats["directions"], "sum": stats["sums"]},
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
        """``d = lr g + Σ_k a_k v_k[variable]``; ``θ ← θ − d`` (or heavy ball on ``d``)."""
        statistics = self.statistics_for(variable)
        step = csm.subspace_step(
            gradient, statistics["coefficients"], statistics["direction"], learning_rate
        )
        step = tf.cast(step, variable.dtype)
        if self.momentum > 0:
            buffer = self._momentums[variable_index(self, variable)]
            self.assign(buffer, tf.constant(self.momentum, variable.dtype) * buffer + step)
            self.assign_sub(variable, buffer)
        else:
            self.assign_sub(variable, step)

    def finish_step(self, statistics: StepStatistics) -> None:
        for slot, value in zip(self._class_sums, statistics.per_variable["sum"]):
            self.assign(slot, value)
        self.assign(self._curvature_sq, statistics.shared["curvature_sq"])
        self.assign(self._class_steps, statistics.shared["steps"])
        if "block" in statistics.shared:
            self.assign(self._subspace_curvature, statistics.shared["block"])

    # ------------------------------------------------------------- diagnostics

    def _check_state(self) -> None:
        if not self._class_state_built:
            raise ValueError(
                "The class statistics do not exist yet: train at least one step "
                "(or pass `num_classes`) first."
            )

    def _current(self) -> tuple:
        self._check_state()
        return csm.derived(*self._read_state(), self.gamma)

    @property
    def class_curvatures(self) -> tf.Tensor:
        """The curvatures λ_k, shape ``(C,)`` (1 for classes not yet seen)."""
        return self._current()[1]

    @property
    def class_means(self) -> list[tf.Tensor]:
        """The bias-corrected class gradients c_k, per variable ``(C, *shape)``."""
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
            ``class_updates`` (t_k), each ``(C,)``, and ``skipped_steps``.
        """
        curvature = self.class_curvatures
        damping = self._damping(curvature.dtype, self.learning_rate)
        effective = csm.effective_curvature(curvature, damping, self.max_inverse_curvature)
        return {
            "curvature": curvature,
            "inverse_curvature": 1.0 / effective,
            "class_updates": tf.cast(self.class_counts, curvature.dtype),
            "skipped_steps": tf.cast(self._skipped_steps, curvature.dtype),
        }

    # ----------------------------------------------- the diagnostic callbacks' protocol

    def _subspace_matrices(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(V, A, model core, lr)``: ``V`` the ``(dim, C)`` directions, the step's
        ``d = lr g + V A Vᵀ g`` and the curvature model ``V core Vᵀ``, at the current state."""
        _, curvature, directions, alive = self._current()
        rows = csm.flat_directions(directions, self.num_classes)
        lr = tf.cast(self.learning_rate, rows.dtype)
        damping = self._damping(rows.dtype, lr)
        gram = tf.matmul(rows, rows, transpose_b=True)
        if self.curvature == "projected_newton":
            block = tf.cast(tf.convert_to_tensor(self._subspace_curvature), rows.dtype)
            eye = tf.eye(self.num_classes, dtype=rows.dtype)
            inverse = csm.sym_pinv(block + damping * eye) - lr * csm.sym_pinv(gram)
            pinv = csm.sym_pinv(gram)
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
        """``(2 + 2μ) / η``: heavy-ball momentum ``μ`` on the whole step."""
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
            }
        )
        return config
