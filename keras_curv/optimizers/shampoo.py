"""Shampoo (Gupta, Koren & Singer 2018) with the practice of Distributed Shampoo (Anil et al. 2020).

A gradient-only optimizer: it needs nothing but the gradient, so it subclasses
``keras.optimizers.Optimizer`` directly and works wherever Keras's Adam does
(``compile``/``fit``, ``apply_gradients`` in hand-written loops). The math is in
:mod:`keras_curv.optimizers.shampoo_math`; ``docs/shampoo.md`` explains the choices.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal import validation
from keras_curv._internal.keras_privates import use_fresh_collective_keys, variable_index
from keras_curv._internal.numerics import curvature_dtype, exact_cast
from keras_curv.curvature.operators import LinearOperator
from keras_curv.curvature.stability import stability_threshold
from keras_curv.curvature.structured import (
    BlockDiagonalOperator,
    DiagonalOperator,
    IdentityOperator,
    KroneckerOperator,
    PermutedOperator,
)
from keras_curv.optimizers import distribute
from keras_curv.optimizers.shampoo_math import (
    adam_denominator,
    adam_grafting,
    block_order,
    block_shapes,
    graft_ratio,
    inverse_root,
    merge_blocks,
    momentum,
    precondition,
    preconditioner_shape,
    split_blocks,
    update_statistics,
)

GRAFTING = ("adam", "sgd", "none")


def _squared_norm(gradient: Any) -> tf.Tensor:
    """``‖g‖²`` in the statistics' dtype (of the values of an ``IndexedSlices``)."""
    values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
    return tf.reduce_sum(tf.square(tf.cast(values, curvature_dtype(values.dtype))))


@keras.saving.register_keras_serializable(package="keras_curv")
class Shampoo(keras.optimizers.Optimizer):
    r"""Shampoo: per-axis Kronecker-factored preconditioning, grafted onto Adam's step size.

    For a weight ``W`` of shape ``(m, n)`` with gradient ``G`` at step ``t``:

    ```
    L ← β₂ L + (1 − β₂) G Gᵀ        R ← β₂ R + (1 − β₂) Gᵀ G
    P = L̂^(−1/4) G R̂^(−1/4)          (L̂ = L / (1 − β₂ᵗ), roots every `precondition_every` steps)
    A = G / (√v̂ + ε_g)               (grafting="adam"; A = G for "sgd")
    D = P · ‖A‖ / ‖P‖                 (layer-wise grafting, per block)
    m ← β₁ m + (1 − β₁) D
    W ← W − lr · m / (1 − β₁ᵗ)
    ```

    A rank-``p`` weight keeps one statistic per axis and roots ``−1/(2p)``; convolution
    kernels are merged into the matrix ``(kh·kw·in, out)`` first (Distributed Shampoo's
    ``merge_small_dims``, see :func:`~keras_curv.optimizers.shampoo_math.preconditioner_shape`);
    axes longer than ``block_size`` are split into blocks with statistics of their own.
    The inverse roots come from ``eigh`` in float32 (float64 for float64 weights) with
    the eigenvalues regularised by ``ε λ_max``. Weights of rank ``< 2`` and the first
    ``start_preconditioning_step`` steps use ``D = A``. Weight decay (``weight_decay``)
    is decoupled, as in Keras's AdamW. A step with a non-finite gradient is skipped,
    weights and state untouched, and counted in :attr:`skipped_steps`.

    Args:
        learning_rate: A float, a ``LearningRateSchedule`` or a callable.
        beta_1: Decay of the momentum ``m`` of the grafted direction, in ``[0, 1)``.
        beta_2: Decay of the statistics ``L, R`` and of Adam grafting's ``v``, in ``[0, 1)``.
        epsilon: ``ε``, the statistics' regularisation relative to their largest
            eigenvalue, ``> 0``.
        precondition_every: Inverse roots are recomputed every this many steps (int ≥ 1).
        start_preconditioning_step: Steps that use the grafting direction alone, before
            the first inverse roots (int ≥ 0; ``None``: ``precondition_every``).
        block_size: Largest block along any axis (int ≥ 1).
        grafting: ``"adam"``, ``"sgd"`` or ``"none"`` (the raw Shampoo direction).
        grafting_epsilon: ``ε_g`` of Adam grafting, ``> 0``.
        merge_small_axes: Merge the leading axes of rank ≥ 3 weights (see above);
            ``False`` keeps one statistic per axis.
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay``, ``clipnorm``, ``use_ema``,
            ``gradient_accumulation_steps``...).

    Example:
        >>> model.compile(optimizer=keras_curv.Shampoo(1e-3),
        ...               loss="sparse_categorical_crossentropy")
        >>> model.fit(x, y, batch_size=128, epochs=5)
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-12,
        precondition_every: int = 10,
        start_preconditioning_step: int | None = None,
        block_size: int = 1024,
        grafting: str = "adam",
        grafting_epsilon: float = 1e-8,
        merge_small_axes: bool = True,
        name: str = "shampoo",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = validation.decay(beta_1, "beta_1")
        self.beta_2 = validation.decay(beta_2, "beta_2")
        self.epsilon = validation.positive(epsilon, "epsilon")
        self.precondition_every = validation.integer(
            precondition_every, "precondition_every", minimum=1
        )
        self.start_preconditioning_step = validation.integer(
            start_preconditioning_step, "start_preconditioning_step", minimum=0, allow_none=True
        )
        self.block_size = validation.integer(block_size, "block_size", minimum=1)
        self.grafting = validation.choice(grafting, "grafting", GRAFTING)
        self.grafting_epsilon = validation.positive(grafting_epsilon, "grafting_epsilon")
        self.merge_small_axes = validation.boolean(merge_small_axes, "merge_small_axes")

    @property
    def _start(self) -> int:
        start = self.start_preconditioning_step
        return self.precondition_every if start is None else start

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Creates ``m`` (and ``v``) per variable, and the statistics and roots per block."""
        if self.built:
            return
        # A new strategy would reuse an earlier one's collective keys (TensorFlow bug).
        use_fresh_collective_keys()
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        if self.grafting == "adam":
            self._second_moments = self.add_optimizer_variables(var_list, "grafting_second_moment")
        self._shapes, self._statistics, self._roots, self._graft_ratios = [], [], [], []
        for variable in var_list:
            shape = preconditioner_shape(variable.shape, self.block_size, self.merge_small_axes)
            self._shapes.append(shape)
            self._statistics.append([])
            self._roots.append([])
            self._graft_ratios.append([])
            if shape is None:
                continue
            dtype = curvature_dtype(variable.dtype)
            # As Keras names slots (a plain tf.Variable has a name but no path).
            prefix = str(getattr(variable, "path", variable.name))
            prefix = prefix.replace("/", "_").replace(":", "_")
            for b, sizes in enumerate(block_shapes(shape, self.block_size)):
                self._statistics[-1].append(
                    [
                        self.add_variable((n, n), "zeros", dtype, name=f"{prefix}_stat_{b}_{k}")
                        for k, n in enumerate(sizes)
                    ]
                )
                self._roots[-1].append(
                    [
                        self.add_variable(
                            (n, n),
                            keras.initializers.Identity(),
                            dtype,
                            name=f"{prefix}_root_{b}_{k}",
                        )
                        for k, n in enumerate(sizes)
                    ]
                )
                if self.grafting != "none":
                    # The last step's ‖A‖/‖P‖ for `preconditioner()`; the update never uses it.
                    self._graft_ratios[-1].append(
                        self.add_variable((), "ones", dtype, name=f"{prefix}_graft_ratio_{b}")
                    )
        self._skipped_steps = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="int64",
            name="skipped_steps",
            aggregation="only_first_replica",
        )

    @property
    def skipped_steps(self) -> tf.Variable:
        """Steps skipped for a non-finite gradient (weights, state and ``iterations`` untouched)."""
        self._check_built()
        return self._skipped_steps

    def _check_built(self) -> None:
        if not self.built:
            raise ValueError(
                "The Shampoo optimizer has no state yet: train (or call "
                "`optimizer.build(model.trainable_variables)`) first."
            )

    # ------------------------------------------------------------------ apply

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Keras's ``apply``, skipped (and counted) when a gradient or its squared norm is not
        finite on some replica."""
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        if not self.built:
            return super().apply(grads, trainable_variables)  # raises Keras's error
        # ‖g‖² finite means every entry of every G_(k) G_(k)ᵀ is, and so are the
        # statistics (convex combinations of finite values); NaN and inf show up there too.
        squares = [None if g is None else _squared_norm(g) for g in grads]
        finite = distribute.all_finite_on_every_replica(squares)
        distribute.apply_or_skip(
            finite, super().apply, (grads, trainable_variables), self._skipped_steps
        )

    def _schedule(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(t, refresh, precondition)``: the update step counted from 1, whether it
        recomputes the roots, and whether it uses the Shampoo direction."""
        # Keras's `iterations` counts update steps (micro-batches over the accumulation).
        count = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)
        since = count - self._start
        refresh = tf.logical_and(since >= 0, tf.math.floormod(since, self.precondition_every) == 0)
        return count + 1, refresh, since >= 0

    # ------------------------------------------------------------------ update

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One variable's Shampoo update."""
        index = variable_index(self, variable)
        gradient = tf.cast(tf.convert_to_tensor(gradient), curvature_dtype(variable.dtype))
        step, refresh, active = self._schedule()

        if self.grafting == "adam":
            second_moment = self._second_moments[index]
            reference, v = adam_grafting(
                gradient, second_moment, step, self.beta_2, self.grafting_epsilon
            )
            self.assign(second_moment, v)
        else:
            reference = gradient
        direction = reference
        if self._shapes[index] is not None:
            direction = self._shampoo_direction(index, gradient, reference, step, refresh, active)

        m = self._momentums[index]
        update, new_m = momentum(m, direction, step, self.beta_1)
        self.assign(m, new_m)
        self.assign_sub(variable, tf.cast(learning_rate, variable.dtype) * update)

    def _shampoo_direction(self, index, gradient, reference, step, refresh, active):
        """The grafted Shampoo direction of variable ``index`` (``reference`` before the start)."""
        shape = self._shapes[index]
        blocks = split_blocks(tf.reshape(gradient, shape), self.block_size)
        statistics, roots = self._statistics[index], self._roots[index]
        new_statistics = []
        for block, stats in zip(blocks, statistics):
            new = update_statistics(stats, block, self.beta_2)
            for variable, value in zip(stats, new):
                self.assign(variable, value)
            new_statistics.append(new)

        def refresh_roots():
            correction = 1 - tf.pow(
                exact_cast(self.beta_2, gradient.dtype), tf.cast(step, gradient.dtype)
            )
            for stats, block_roots in zip(new_statistics, roots):
                for statistic, root in zip(stats, block_roots):
                    value = inverse_root(statistic, 2 * len(shape), self.epsilon, correction)
                    # Belt and braces: the skip rule in `apply` keeps both finite.
                    finite = distribute.all_finite([statistic, value])
                    self.assign(root, tf.where(finite, value, tf.convert_to_tensor(root)))
            return tf.constant(True)

        tf.cond(refresh, refresh_roots, lambda: tf.constant(False))
        if self.grafting == "none":
            references = [None] * len(blocks)
        else:
            references = split_blocks(tf.reshape(reference, shape), self.block_size)

        ratios = self._graft_ratios[index] or [None] * len(blocks)
        parts = []
        for block, block_reference, block_roots, kept in zip(blocks, references, roots, ratios):
            part = precondition(block, block_roots)
            if block_reference is not None:
                ratio = graft_ratio(part, block_reference)
                # A zero block steps by 0 whatever the ratio: the last one is kept for P.
                self.assign(kept, tf.where(ratio > 0, ratio, tf.convert_to_tensor(kept)))
                part = part * ratio
            parts.append(part)
        preconditioned = tf.reshape(merge_blocks(parts, shape, self.block_size), reference.shape)

        # A select, not a cond: the preconditioning is cheap next to a cond's overhead on
        # every later step, and with the identity roots of before the start it is finite.
        return tf.where(active, preconditioned, reference)

    # ------------------------------------------------------------- diagnostics

    def preconditioner_shapes(self) -> list[tuple[int, ...] | None]:
        """Per trainable variable, the shape it is preconditioned as (``None``: grafting alone)."""
        self._check_built()
        return list(self._shapes)

    @property
    def statistics(self) -> list[list[list[tf.Variable]]]:
        """Per trainable variable, per block, the statistic of every axis (not bias-corrected)."""
        self._check_built()
        return [[list(block) for block in blocks] for blocks in self._statistics]

    @property
    def inverse_roots(self) -> list[list[list[tf.Variable]]]:
        """Per trainable variable, per block, the inverse root of every axis's statistic."""
        self._check_built()
        return [[list(block) for block in blocks] for blocks in self._roots]

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The preconditioner state for the diagnostic callbacks (read only).

        Returns:
            ``statistics_log10_condition_per_variable`` (per trainable variable, the
            largest ``log10(λ_max / max(λ_min, ε λ_max))`` over its statistics; 0 for
            weights under grafting alone), ``preconditioned_fraction`` (of the
            parameters), ``root_updates`` (inverse-root computations so far) and
            ``skipped_steps``.
        """
        self._check_built()
        conditions = []
        for blocks in self._statistics:
            worst = 0.0
            for statistic in (s for block in blocks for s in block):
                values = np.linalg.eigvalsh(np.asarray(statistic, np.float64))
                largest = values[-1]
                if largest > 0:
                    smallest = max(values[0], self.epsilon * largest)
                    worst = max(worst, float(np.log10(largest / smallest)))
            conditions.append(worst)
        sizes = [int(np.prod(v.shape)) for v in self._trainable_variables]
        covered = sum(n for n, s in zip(sizes, self._shapes) if s is not None)
        # Roots were computed at update steps start, start + k, ... below the count.
        since = int(np.asarray(self.iterations)) - self._start
        updates = 0 if since <= 0 else (since - 1) // self.precondition_every + 1
        return {
            "statistics_log10_condition_per_variable": tf.constant(conditions, tf.float32),
            "preconditioned_fraction": tf.constant(covered / max(sum(sizes), 1), tf.float32),
            "root_updates": tf.constant(float(updates), tf.float32),
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }

    @property
    def graft_ratios(self) -> list[list[tf.Variable]]:
        """Per trainable variable, per block, the last step's grafting ratio ``‖A‖ / ‖P‖``
        (no entries for ``grafting="none"`` and for weights under grafting alone)."""
        self._check_built()
        return [list(ratios) for ratios in self._graft_ratios]

    def preconditioner(self) -> BlockDiagonalOperator | None:
        """The last step's ``P``, its direction being ``D = P⁻¹ g`` (protocol, read only).

        Per preconditioned block ``(L̂^(−1/4) ⊗ R̂^(−1/4))⁻¹ / s`` from the cached inverse
        roots (``−1/2p`` for rank ``p``) and the last grafting ratio ``s``; for weights of
        rank ``< 2``, and for every weight before ``start_preconditioning_step``, grafting's
        own ``diag(√v̂ + ε_g)`` (``"adam"``) or ``I``. In the flat layout of the
        optimizer's variables; ``None`` before the first step.
        """
        self._check_built()
        # Update steps (micro-batches over the accumulation), as `update_step` numbers them.
        count = int(np.asarray(self.iterations))
        if count == 0:
            return None
        active = count - 1 >= self._start
        return BlockDiagonalOperator(
            [
                self._shampoo_preconditioner(index)
                if active and shape is not None
                else self._grafting_preconditioner(index, count)
                for index, shape in enumerate(self._shapes)
            ]
        )

    def _grafting_preconditioner(self, index: int, count: int) -> LinearOperator:
        variable = self._trainable_variables[index]
        dtype = curvature_dtype(variable.dtype)
        if self.grafting != "adam":
            return IdentityOperator(int(np.prod(variable.shape)), 1.0, dtype)
        v = tf.cast(tf.reshape(tf.convert_to_tensor(self._second_moments[index]), [-1]), dtype)
        return DiagonalOperator(adam_denominator(v, count, self.beta_2, self.grafting_epsilon))

    def _shampoo_preconditioner(self, index: int) -> LinearOperator:
        roots = self._roots[index]
        ratios = self._graft_ratios[index] or [None] * len(roots)
        blocks = []
        for block_roots, ratio in zip(roots, ratios):
            inverse = KroneckerOperator([tf.convert_to_tensor(r) for r in block_roots]).power(-1)
            factors = list(inverse.factors)
            if ratio is not None:
                factors[0] = factors[0] / tf.cast(ratio, factors[0].dtype)
            blocks.append(KroneckerOperator(factors))
        if len(blocks) == 1:
            return blocks[0]
        order = block_order(self._shapes[index], self.block_size)
        operator = BlockDiagonalOperator(blocks)
        # Blocks cut along the first axis only are consecutive in the flat layout.
        if np.array_equal(order.numpy(), np.arange(operator.dim)):
            return operator
        return PermutedOperator(operator, order)

    def stability_threshold(self) -> float:
        """``(2 + 2β1) / ((1 − β1) η)``: ``m`` is an EMA of the direction (as Adam's)."""
        lr = float(keras.ops.convert_to_numpy(self.learning_rate))
        return stability_threshold(lr, self.beta_1, "ema")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "precondition_every": self.precondition_every,
                "start_preconditioning_step": self.start_preconditioning_step,
                "block_size": self.block_size,
                "grafting": self.grafting,
                "grafting_epsilon": self.grafting_epsilon,
                "merge_small_axes": self.merge_small_axes,
            }
        )
        return config
