"""``KFAC``: Kronecker-factored natural gradient (Martens & Grosse 2015) through ``fit``.

The math is in :mod:`~keras_curv.optimizers.kfac_math` (pure functions), the likelihoods
in :mod:`~keras_curv.optimizers.kfac_fisher`, the per-layer blocks in
:mod:`~keras_curv.optimizers.kfac_blocks` and their operators for the diagnostics in
:mod:`~keras_curv.optimizers.kfac_operators`; this module is the Keras shell: arguments,
state, the step's statistics and the per-variable update. ``docs/kfac.md`` explains the
method, its defaults and its cost.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal import validation
from keras_curv._internal.keras_privates import (
    clipped_gradients,
    track_optimizer_variable,
    variable_index,
)
from keras_curv.curvature.operators import LinearOperator
from keras_curv.curvature.stability import stability_threshold
from keras_curv.optimizers import _labels, distribute
from keras_curv.optimizers import kfac_fisher as kf
from keras_curv.optimizers import kfac_math as km
from keras_curv.optimizers import kfac_operators as ko
from keras_curv.optimizers._graph import StepGate, stacked_map, under_xla
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import LayerCall, TrainBatch
from keras_curv.optimizers.contract import model_of
from keras_curv.optimizers.kfac_blocks import (
    MAX_FACTOR_SIZE,
    MAX_PATCHES_PER_EXAMPLE,
    Block,
    DiagonalBlock,
    KroneckerBlock,
    NormBlock,
    plan_blocks,
)

_SHARED = {"aggregation": "only_first_replica"}
FALLBACKS = ("isotropic", "diagonal")
# The random streams of a step, each folded from the step's seed.
_STREAMS = {"uniform": 1, "normal": 2, "sign": 3, "patches": 4}


@keras.saving.register_keras_serializable(package="keras_curv")
class KFAC(CurvatureOptimizer):
    """K-FAC: natural gradient with a Kronecker-factored Fisher, one block per layer.

    For a layer ``s = a W (+ b)`` the Fisher block is ``A ⊗ G`` with ``A`` the moving
    average of the input second moment (with a homogeneous coordinate for the bias) and
    ``G`` that of the per-sample gradients with respect to ``s``. At step ``t``, with
    ``g`` the gradient, ``λ`` the damping and ``π`` the π-adjustment:

    ```
    Δ_W = (A + π√λ I)⁻¹ ∇_W L (G + √λ/π I)⁻¹        (diagonal blocks: g / (d + λ))
    ν   = min(1, sqrt(c / (η² Σ Δᵀg)))               (norm_constraint=c, else 1)
    m  ← μ m + ν Δ;     θ ← θ − η m
    ```

    Kronecker blocks: ``Dense``, ``Conv1D``/``Conv2D`` (KFC), ``DepthwiseConv1D/2D`` (one
    per channel), ``Embedding`` (diagonal ``A``); diagonal blocks: the normalizations'
    scale and shift, and every other variable (see :attr:`blocks`). ``G`` comes from
    labels drawn from the model (``fisher="model"``), the true labels (``"empirical"``) or
    the exact expectation (``"exact"``, one backward pass per output). See
    ``docs/kfac.md``.

    Args:
        learning_rate: ``η``: a float, a ``LearningRateSchedule`` or a callable.
        damping: ``λ ≥ 0``, the Tikhonov damping (the initial one with ``adapt_damping``).
        momentum: ``μ`` in ``[0, 1)``.
        ema_decay: Decay of the factors' bias-corrected moving averages, in ``[0, 1)``.
        curvature_update_every: Update the factors every this many steps.
        inverse_update_every: Recompute the eigendecompositions every this many steps.
        fisher: ``"model"``, ``"empirical"`` or ``"exact"``.
        norm_constraint: ``c > 0`` bounding ``η² Δᵀ F̂ Δ``, or ``None``.
        adapt_damping: Adapt ``λ`` by the Levenberg–Marquardt rule from the reduction
            ratio (the loss at the trial step on the same batch over the K-FAC quadratic
            model's prediction) every ``damping_adaptation_every`` steps.
        damping_adaptation_every: Steps between adaptations.
        damping_adaptation_decay: ``λ`` changes by ``ω = decay ** every`` per adaptation.
        min_damping: Lower bound of the adapted damping.
        max_damping: Upper bound of the adapted damping (``None``: none).
        max_factor_size: Factors larger than this are kept diagonal.
        max_patches_per_example: Estimate a convolution's ``A`` from at most this many
            of each example's patches, drawn at random (unbiased; ``None``: every patch,
            exact KFC).
        fallback: The block of variables no layer block takes: ``"isotropic"`` (the mean
            of the variable's diagonal Fisher) or ``"diagonal"``.
        seed: Seed of the sampled labels, signs and patches, or ``None``.
        name: Name of the optimizer.
        **kwargs: Keras's optimizer arguments (``weight_decay``, ``clipnorm``, ``use_ema``...).

    Example:
        >>> model.compile(optimizer=keras_curv.KFAC(),
        ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> model.fit(x, y, batch_size=128, epochs=5)
    """

    uses_layer_taps = True

    def __init__(
        self,
        learning_rate: Any = 0.1,
        damping: float = 0.1,
        momentum: float = 0.8,
        ema_decay: float = 0.95,
        curvature_update_every: int = 1,
        inverse_update_every: int = 10,
        fisher: str = "model",
        norm_constraint: float | None = 0.01,
        adapt_damping: bool = False,
        damping_adaptation_every: int = 5,
        damping_adaptation_decay: float = 0.95,
        min_damping: float = 1e-8,
        max_damping: float | None = None,
        max_factor_size: int = MAX_FACTOR_SIZE,
        max_patches_per_example: int | None = MAX_PATCHES_PER_EXAMPLE,
        fallback: str = "isotropic",
        seed: int | None = None,
        name: str = "kfac",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.damping = validation.non_negative(damping, "damping")
        self.momentum = validation.decay(momentum, "momentum")
        self.ema_decay = validation.decay(ema_decay, "ema_decay")
        self.curvature_update_every = validation.integer(
            curvature_update_every, "curvature_update_every", minimum=1
        )
        self.inverse_update_every = validation.integer(
            inverse_update_every, "inverse_update_every", minimum=1
        )
        self.fisher = validation.choice(fisher, "fisher", kf.FISHERS)
        self.norm_constraint = validation.positive(
            norm_constraint, "norm_constraint", allow_none=True
        )
        if not isinstance(adapt_damping, bool):
            raise ValueError(
                f"`adapt_damping` must be a bool; received adapt_damping={adapt_damping!r}."
            )
        self.adapt_damping = adapt_damping
        self.damping_adaptation_every = validation.integer(
            damping_adaptation_every, "damping_adaptation_every", minimum=1
        )
        self.damping_adaptation_decay = validation.decay(
            damping_adaptation_decay, "damping_adaptation_decay", allow_zero=False
        )
        self.min_damping = validation.non_negative(min_damping, "min_damping")
        self.max_damping = validation.positive(max_damping, "max_damping", allow_none=True)
        if self.max_damping is not None and self.max_damping < self.min_damping:
            raise ValueError(
                f"`max_damping` must be >= min_damping={self.min_damping}; received "
                f"max_damping={self.max_damping}."
            )
        self.max_factor_size = validation.integer(max_factor_size, "max_factor_size", minimum=1)
        self.max_patches_per_example = validation.integer(
            max_patches_per_example, "max_patches_per_example", minimum=1, allow_none=True
        )
        self.fallback = validation.choice(fallback, "fallback", FALLBACKS)
        self.seed = validation.seed(seed)
        object.__setattr__(self, "_blocks", None)

    # ------------------------------------------------------------------ state

    def build(self, var_list: list) -> None:
        """Creates the momentum buffers, counters, damping and RNG; the factors once the
        model is known (:meth:`build_for_model`)."""
        if self.built:
            return
        dtype = "float64" if any(v.dtype == "float64" for v in var_list) else "float32"
        object.__setattr__(self, "_state_dtype", dtype)
        self._momentums = []
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(var_list, "momentum")
        counter = {"shape": (), "initializer": "zeros", "dtype": "int64", **_SHARED}
        self._curvature_updates = self.add_variable(name="curvature_updates", **counter)
        self._inverse_updates = self.add_variable(name="inverse_updates", **counter)
        scalar = {"shape": (), "dtype": dtype, **_SHARED}
        # Not keras.initializers.Constant: it would round a float64 damping through float32.
        self._damping = self.add_variable(
            initializer=lambda shape, dtype: tf.constant(self.damping, dtype, shape),
            name="damping",
            **scalar,
        )
        self._last = {
            name: self.add_variable(initializer="zeros", name=name, **scalar)
            for name in ("quadratic_model_change", "reduction_ratio", "norm_constraint_scale")
        }
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="kfac_labels")
        track_optimizer_variable(self, self._seed_generator.state)
        super().build(var_list)

    def build_for_model(self, model: keras.Model) -> None:
        """Plans the blocks of ``model`` and creates their factors and eigendecompositions."""
        if self._blocks is not None or model is None:
            return
        blocks = plan_blocks(
            model,
            self._trainable_variables,
            self.max_factor_size,
            isotropic_fallback=self.fallback == "isotropic",
            max_patches=self.max_patches_per_example,
        )
        try:
            with tf.init_scope():
                factors, eigens = [], []
                for i, block in enumerate(blocks):
                    factors.append(self._block_variables(i, block.state_shapes(), block.dtype))
                    eigens.append(self._block_variables(i, block.eigen_shapes(), block.dtype))
        except ValueError as error:  # tf.function allows new variables on a first call only
            raise ValueError(
                "KFAC could not create its factors: the train function was traced before "
                "the optimizer met the model. Call keras_curv.attach(model, layer_taps=True) "
                "before the first fit, or compile the model again."
            ) from error
        object.__setattr__(self, "_blocks", tuple(blocks))
        object.__setattr__(self, "_factors", tuple(factors))
        object.__setattr__(self, "_eigens", tuple(eigens))

    def _block_variables(self, i: int, shapes: dict, dtype: tf.DType) -> dict:
        return {
            name: self.add_variable(
                shape, initializer="zeros", dtype=dtype, name=f"block{i}_{name}", **_SHARED
            )
            for name, shape in shapes.items()
        }

    def load_own_variables(self, store: Any) -> None:
        """Restores the state, planning the blocks first if a checkpoint has them."""
        if self.built and self._blocks is None and len(store.keys()) > len(self.variables):
            self.build_for_model(model_of(self))
        super().load_own_variables(store)

    @property
    def blocks(self) -> list[dict]:
        """Which block each variable got: one dict per block (layer, kind, variables, shapes).

        ``kind`` is ``"kronecker"``, ``"depthwise"``, ``"norm"`` or ``"diagonal"`` (the
        fallback, with the reason per variable).
        """
        self._check_blocks()
        out = []
        for block in self._blocks:
            entry = {
                "layer": block.name,
                "kind": block.kind,
                "variables": [self._trainable_variables[i].path for i in block.indices],
                "factor_shapes": block.state_shapes(),
            }
            if isinstance(block, DiagonalBlock):
                entry["reasons"] = list(block.reasons)
                entry["isotropic"] = block.isotropic
            out.append(entry)
        return out

    def _check_blocks(self) -> None:
        self._check_built()
        if self._blocks is None:
            raise ValueError("KFAC has no blocks yet: train at least one step first.")

    # -------------------------------------------------------------- statistics

    def _likelihood(self, batch: TrainBatch) -> kf.Likelihood:
        loss = getattr(batch.model, "loss", None)
        if batch.loss_function is not None and loss is None:
            raise ValueError(
                "KFAC needs the loss's likelihood; in curvature_step pass a Keras loss "
                "(name or keras.losses.Loss) and compile the model with it."
            )
        if isinstance(batch.y_pred, (list, tuple, dict)):
            raise ValueError(
                "KFAC needs a single-output model (one likelihood); model "
                f"{batch.model.name!r} has {len(batch.y_pred)} outputs."
            )
        return kf.likelihood_of(loss, type(self).__name__)

    def _schedule(self, every: int) -> tf.Tensor:
        iteration = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)
        return tf.equal(tf.math.floormod(iteration, every), 0)

    def step_statistics(self, batch: TrainBatch) -> StepStatistics:
        """This step's factors, eigendecompositions, directions, ``ν`` and damping."""
        likelihood = self._likelihood(batch)
        self.build_for_model(batch.model)
        labels_valid = _labels.guard_training_labels(batch, None, type(self).__name__)
        with batch.step_graph():
            self._warn_if_gates_cannot_skip()
            seed = keras.random.randint(
                (2,), 0, 2**31 - 1, dtype="int32", seed=self._seed_generator
            )
            if batch.replicas is not None:
                distribute.mirror_copies(self._seed_generator.state)
            is_curvature = self._schedule(self.curvature_update_every)
            gates = {
                "curvature": StepGate(is_curvature if self.curvature_update_every > 1 else None),
                "adapt": StepGate(self._schedule(self.damping_adaptation_every)),
            }
            result = distribute.replica_sum(
                batch,
                lambda replica: self._replica_statistics(
                    replica, likelihood, seed, gates, is_curvature
                ),
            )
        return StepStatistics(
            per_variable={"direction": result.pop("directions")},
            shared=result,
            checks=[_labels.as_finite_flag(labels_valid), result["gradient_dot_direction"]],
            proceed=tf.logical_or(result["updated"], self._curvature_updates > 0),
        )

    def _replica_statistics(self, replica, likelihood, seed, gates, is_curvature):
        """Generator for ``replica_sum``: sizes, then the statistics, then the trial loss."""
        dtype = self._state_dtype
        z = kf.scores(likelihood, replica.y_pred)
        weights = kf.element_weights(likelihood, z, replica.y, replica.sample_weight)
        local = tf.cast(tf.shape(z)[0], dtype)
        sizes = tf.one_hot(replica.replica_id, replica.num_replicas, dtype=dtype) * local
        totals = yield {"samples": sizes, "weights": tf.cast(tf.reduce_sum(weights), dtype)}
        samples = tf.reduce_sum(totals["samples"])
        offset = tf.reduce_sum(totals["samples"][: replica.replica_id])
        normalizer = kf.reduction_normalizer(likelihood, z, samples, totals["weights"])
        constant = kf.loss_constant(likelihood, int(z.shape[-1]))
        scale = tf.sqrt(weights * tf.cast(constant * normalizer, weights.dtype))
        noise = _noise(seed, z, samples, offset, local)
        gate = gates["curvature"]
        columns = gate.enter(kf.cotangents(likelihood, self.fisher, z, replica.y, scale, noise))
        uniforms = _patch_uniforms(seed, samples, offset)
        sums = [
            {k: gate.exit(v) for k, v in s.items()}
            for s in self._block_sums(replica, z, columns, gate, uniforms)
        ]
        gradients = [
            tf.cast(g, dtype)
            for g in clipped_gradients(
                self, [tf.cast(g, v.dtype) for g, v in zip(replica.gradients(), replica.variables)]
            )
        ]
        totals = yield {"sums": sums, "gradients": gradients}
        out = self._step(totals["sums"], totals["gradients"], samples, is_curvature, replica)
        if self.adapt_damping:
            actual = yield self._trial_change(replica, out["steps"], gates["adapt"])
            out.update(self._adapted(out, actual, gates["adapt"].predicate))
        del out["steps"]
        return out

    def _block_sums(self, replica: TrainBatch, z, columns, gate, uniforms) -> list[dict]:
        """Per block, this replica's sums (see ``Block.statistics``)."""
        layer_calls: dict[int, list[LayerCall]] = {}
        for call in replica.layer_calls:
            layer_calls.setdefault(id(call.layer), []).append(call)
        handles = replica.handles()
        targets, slots = [], []
        for b, block in enumerate(self._blocks):
            if isinstance(block, DiagonalBlock):
                for i in block.indices:
                    slots.append((b, None))
                    targets.append(handles[i])
            else:
                for call in layer_calls.get(id(block.layer), []):
                    slots.append((b, call))
                    targets.append(call.outputs)
        gradients = _fisher_backward(z, columns, targets) if targets else []
        per_block: list[dict] = [{"calls": [], "gradients": []} for _ in self._blocks]
        for (b, call), gradient in zip(slots, gradients):
            per_block[b]["calls"].append(call)
            per_block[b]["gradients"].append(gradient)
        sums = []
        for b, (block, parts) in enumerate(zip(self._blocks, per_block)):
            calls = [
                LayerCall(c.layer, gate.enter(c.inputs), c.outputs) for c in parts["calls"] if c
            ]
            if isinstance(block, DiagonalBlock):
                sums.append(block.statistics(parts["gradients"]))
            elif not calls:  # a layer this step never called: no statistics
                sums.append({})
            elif isinstance(block, NormBlock):
                gamma = handles[block.indices[0]] if "gamma" in block.roles else None
                sums.append(block.statistics(calls, parts["gradients"], gamma, gate))
            else:
                block_uniforms = functools.partial(uniforms, b)
                sums.append(block.statistics(calls, parts["gradients"], block_uniforms))
        return sums

    def _step(self, sums, gradients, samples, is_curvature, replica) -> dict:
        """Factors, eigendecompositions, directions, ``ν`` and the quadratic model."""
        old = [{k: tf.convert_to_tensor(v) for k, v in f.items()} for f in self._factors]
        fresh = [block.factors(s, samples) if s else {} for block, s in zip(self._blocks, sums)]
        updated = tf.logical_and(
            is_curvature, distribute.all_finite([t for f in fresh for t in f.values()])
        )
        count = self._curvature_updates + tf.cast(updated, tf.int64)
        factors = [
            {
                k: tf.where(updated, km.weighted_ema(o[k], f[k], self.ema_decay, count), o[k])
                if k in f
                else o[k]
                for k in o
            }
            for o, f in zip(old, fresh)
        ]
        stored = [{k: tf.convert_to_tensor(v) for k, v in e.items()} for e in self._eigens]
        is_inverse = tf.logical_and(
            tf.logical_or(self._schedule(self.inverse_update_every), self._inverse_updates == 0),
            count > 0,
        )

        def decompose():
            return [
                block.eigen(f) if isinstance(block, KroneckerBlock) else {}
                for block, f in zip(self._blocks, factors)
            ]

        candidate = tf.cond(is_inverse, decompose, lambda: stored)
        inverted = tf.logical_and(
            is_inverse, distribute.all_finite([t for e in candidate for t in e.values()])
        )
        eigens = [{k: tf.where(inverted, c[k], s[k]) for k in s} for c, s in zip(candidate, stored)]
        damping = tf.convert_to_tensor(self._damping)
        directions = _solve(self._blocks, factors, eigens, gradients, damping)
        dot = tf.add_n([tf.reduce_sum(d * g) for d, g in zip(directions, gradients)])
        lr = tf.cast(self.learning_rate, dot.dtype)
        nu = km.norm_constraint_scale(lr, dot, self.norm_constraint)
        steps = [
            -lr * km.velocity(self._momentum_of(i), nu * d, self.momentum)
            for i, d in enumerate(directions)
        ]
        curvature = tf.add_n(
            [_curvature(block, f, steps) for block, f in zip(self._blocks, factors)]
        )
        change = km.quadratic_model_change(
            tf.add_n([tf.reduce_sum(g * tf.cast(s, g.dtype)) for g, s in zip(gradients, steps)]),
            curvature,
            tf.add_n([tf.reduce_sum(tf.square(s)) for s in steps]),
            damping,
        )
        return {
            "directions": directions,
            "steps": steps,
            "factors": factors,
            "eigens": eigens,
            "updated": updated,
            "inverted": inverted,
            "norm_constraint_scale": nu,
            "gradient_dot_direction": dot,
            "quadratic_model_change": change,
            "damping": damping,
            "reduction_ratio": tf.convert_to_tensor(self._last["reduction_ratio"]),
        }

    def _momentum_of(self, index: int) -> tf.Tensor:
        if self.momentum == 0:
            return tf.zeros([], self._state_dtype)
        return tf.cast(tf.convert_to_tensor(self._momentums[index]), self._state_dtype)

    def _trial_change(self, replica: TrainBatch, steps, gate: StepGate) -> tf.Tensor:
        """This replica's ``L(θ + δ) − L(θ)`` on its batch (on adaptation steps)."""
        values = [
            gate.enter(tf.cast(h, tf.as_dtype(self._state_dtype)) + s)
            for h, s in zip(replica.handles(), steps)
        ]
        trial = replica.loss_at(values)
        return gate.exit(tf.cast(trial - replica.loss, self._state_dtype))

    def _adapted(self, out: dict, actual: tf.Tensor, is_adapt: tf.Tensor) -> dict:
        ratio = km.reduction_ratio(actual, out["quadratic_model_change"])
        omega = self.damping_adaptation_decay**self.damping_adaptation_every
        new = km.adapted_damping(out["damping"], ratio, omega, self.min_damping, self.max_damping)
        return {
            "damping": tf.where(is_adapt, new, out["damping"]),
            "reduction_ratio": tf.where(is_adapt, ratio, out["reduction_ratio"]),
        }

    def _warn_if_gates_cannot_skip(self) -> None:
        if getattr(self, "_warned_xla", False) or not under_xla():
            return
        if self.curvature_update_every == 1 and not self.adapt_damping:
            return
        object.__setattr__(self, "_warned_xla", True)
        warnings.warn(
            "KFAC under jit_compile: XLA has no dead-branch pruning for the statistics' "
            "backward pass, so the factor statistics (and the damping trial) are computed "
            "every step and used only on their scheduled steps. The eigendecompositions "
            "are still skipped between inverse updates.",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ update

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """``m ← μ m + ν Δ``; ``θ ← θ − η m`` with this step's ``Δ`` for the variable."""
        statistics = self.statistics_for(variable)
        direction = tf.cast(
            statistics["norm_constraint_scale"] * statistics["direction"], variable.dtype
        )
        lr = tf.cast(learning_rate, variable.dtype)
        if self.momentum == 0:
            self.assign_sub(variable, lr * direction)
            return
        buffer = self._momentums[variable_index(self, variable)]
        new = km.velocity(buffer, direction, self.momentum)
        self.assign(buffer, new)
        self.assign_sub(variable, lr * new)

    def finish_step(self, statistics: StepStatistics) -> None:
        shared = statistics.shared
        for slots, values in zip(self._factors, shared["factors"]):
            for name, variable in slots.items():
                variable.assign(values[name])
        for slots, values in zip(self._eigens, shared["eigens"]):
            for name, variable in slots.items():
                variable.assign(values[name])
        self._curvature_updates.assign_add(tf.cast(shared["updated"], tf.int64))
        self._inverse_updates.assign_add(tf.cast(shared["inverted"], tf.int64))
        self._damping.assign(tf.cast(shared["damping"], self._damping.dtype))
        for name, variable in self._last.items():
            variable.assign(tf.cast(shared[name], variable.dtype))

    # ------------------------------------------------------------- diagnostics

    @property
    def curvature_updates(self) -> tf.Variable:
        """How many steps updated the factors."""
        self._check_built()
        return self._curvature_updates

    @property
    def inverse_updates(self) -> tf.Variable:
        """How many steps recomputed the eigendecompositions."""
        self._check_built()
        return self._inverse_updates

    @property
    def current_damping(self) -> tf.Variable:
        """``λ`` in force (adapted with ``adapt_damping``)."""
        self._check_built()
        return self._damping

    def factors(self, layer: str) -> dict[str, tf.Tensor]:
        """The moving-average factors of ``layer``'s block (``"a"``, ``"g"``, or per role).

        Raises:
            ValueError: no block for that layer name.
        """
        self._check_blocks()
        for block, slots in zip(self._blocks, self._factors):
            if block.name == layer:
                return {k: tf.convert_to_tensor(v) for k, v in slots.items()}
        raise ValueError(f"KFAC has no block for a layer named {layer!r}; see `blocks`.")

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        """The curvature state for the diagnostic callbacks (read only).

        Returns:
            ``damping``, ``quadratic_model_change`` (the last step's predicted change of the
            loss), ``reduction_ratio`` (the last adaptation's), ``norm_constraint_scale``,
            ``curvature_updates``, ``inverse_updates``, ``skipped_steps``, and per Kronecker
            block (in :attr:`blocks` order) ``input_factor_eigenvalue_min/max`` and
            ``output_factor_eigenvalue_min/max`` (vectors).
        """
        self._check_blocks()
        summary = {
            "damping": tf.cast(self._damping, tf.float32),
            **{name: tf.cast(v, tf.float32) for name, v in self._last.items()},
            "curvature_updates": tf.cast(self._curvature_updates, tf.float32),
            "inverse_updates": tf.cast(self._inverse_updates, tf.float32),
            "skipped_steps": tf.cast(self._skipped_steps, tf.float32),
        }
        kronecker = [e for b, e in zip(self._blocks, self._eigens) if isinstance(b, KroneckerBlock)]
        for side, name in (("a", "input"), ("g", "output")):
            values = [tf.cast(e[f"{side}_values"], tf.float32) for e in kronecker]
            if values:
                summary[f"{name}_factor_eigenvalue_min"] = tf.stack(
                    [tf.reduce_min(v) for v in values]
                )
                summary[f"{name}_factor_eigenvalue_max"] = tf.stack(
                    [tf.reduce_max(v) for v in values]
                )
        return summary

    def preconditioner(self) -> LinearOperator | None:
        """``P``: the damped K-FAC curvature the update inverts, ``Δ = P⁻¹ g`` (protocol).

        One block per :attr:`blocks` entry, in the flat layout of the optimizer's
        variables: ``(A + π√λ I) ⊗ (G + √λ/π I)`` per Kronecker block (per channel for a
        depthwise convolution) from the stored eigendecompositions (stale between inverse
        updates, as the update uses them), ``diag(d + λ)`` per diagonal variable, and
        ``(mean d + λ) I`` per isotropic fallback variable; ``λ`` is the damping in force.
        The norm constraint ``ν`` and the learning rate stay out of ``P``. ``None`` before
        the first inverse update.
        """
        return self._flat_curvature(damped=True)

    def curvature_model(self) -> LinearOperator | None:
        """The same blocks without damping: K-FAC's Fisher estimate ``F̂`` (protocol)."""
        return self._flat_curvature(damped=False)

    def stability_threshold(self) -> float:
        """``(2 + 2μ) / η``: the update is heavy ball on ``P⁻¹ g`` (protocol)."""
        lr = float(keras.ops.convert_to_numpy(self.learning_rate))
        return stability_threshold(lr, self.momentum, "heavy_ball")

    def _flat_curvature(self, damped: bool) -> LinearOperator | None:
        if not self.built or self._blocks is None or int(self._inverse_updates.numpy()) == 0:
            return None
        damping = tf.convert_to_tensor(self._damping) if damped else None
        pieces = []
        for block, slots, eigen_slots in zip(self._blocks, self._factors, self._eigens):
            if isinstance(block, KroneckerBlock):
                eigen = {k: tf.convert_to_tensor(v) for k, v in eigen_slots.items()}
                pieces.append((block.indices, ko.kronecker_block_operator(block, eigen, damping)))
                continue
            factors = {k: tf.convert_to_tensor(v) for k, v in slots.items()}
            isotropic = isinstance(block, DiagonalBlock) and block.isotropic
            for i, d in zip(block.indices, block.diagonals(factors)):
                pieces.append(((i,), ko.diagonal_operator(d, damping, isotropic)))
        sizes = [int(np.prod(v.shape)) for v in self._trainable_variables]
        return ko.flat_operator(pieces, sizes)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "damping": self.damping,
                "momentum": self.momentum,
                "ema_decay": self.ema_decay,
                "curvature_update_every": self.curvature_update_every,
                "inverse_update_every": self.inverse_update_every,
                "fisher": self.fisher,
                "norm_constraint": self.norm_constraint,
                "adapt_damping": self.adapt_damping,
                "damping_adaptation_every": self.damping_adaptation_every,
                "damping_adaptation_decay": self.damping_adaptation_decay,
                "min_damping": self.min_damping,
                "max_damping": self.max_damping,
                "max_factor_size": self.max_factor_size,
                "max_patches_per_example": self.max_patches_per_example,
                "fallback": self.fallback,
                "seed": self.seed,
            }
        )
        return config


# ---------------------------------------------------------------- step helpers


def _uniform(shape, key) -> tf.Tensor:
    """Float64 uniforms in ``(0, 1)`` from integer draws (XLA reproduces those bit for bit)."""
    bits = tf.random.stateless_uniform(shape, key, minval=None, maxval=None, dtype=tf.uint32)
    return (tf.cast(bits, tf.float64) + 0.5) * 2.0**-32


def _fold(key, data) -> tf.Tensor:
    """A key from ``key`` and ``data`` with non-negative entries (XLA's draws need them)."""
    return tf.bitwise.bitwise_and(tf.random.experimental.stateless_fold_in(key, data), 2**31 - 1)


def _noise(seed, z, samples, offset, local):
    """``noise(kind)``: this replica's slice of draws made for the whole global batch.

    Drawn for all ``samples`` of the global batch from the step's seed and sliced at this
    replica's ``offset``, so that every sample gets the same draw on one device and on
    several replicas. Built from integer draws with non-negative keys, which XLA
    reproduces bit for bit (its float draws, and its integer draws from keys with a
    negative entry, differ from TensorFlow's).
    """
    total = tf.cast(samples, tf.int32)
    start = tf.cast(offset, tf.int32)
    size = tf.cast(local, tf.int32)
    dtype = tf.float64 if z.dtype == tf.float64 else tf.float32

    def draw(kind: str) -> tf.Tensor:
        key = _fold(seed, _STREAMS[kind])
        shape = [total] if kind == "sign" else tf.concat([[total], tf.shape(z)[1:]], 0)
        u = _uniform(shape, key)
        if kind == "sign":
            values = tf.where(u < 0.5, -tf.ones_like(u), tf.ones_like(u))
        elif kind == "normal":  # Box–Muller
            v = _uniform(shape, _fold(key, 1))
            values = tf.sqrt(-2.0 * tf.math.log(u)) * tf.cos(2.0 * np.pi * v)
        else:
            values = u
        return tf.cast(values[start : start + size], dtype)

    return draw


def _patch_uniforms(seed, samples, offset):
    """``uniforms(block, call, examples, count)``: the uniforms of a convolution's patch sample.

    Like :func:`_noise`, drawn per sample of the global batch (``count`` per sample, one
    stream per block and call) and taken at this replica's samples, so that each sample
    gets the same patches on one device and on several replicas. A call whose leading
    axis is not the replica's batch takes the draws cyclically (still uniform).
    """
    total = tf.cast(samples, tf.int32)
    start = tf.cast(offset, tf.int32)

    def uniforms(block: int, call: int, examples, count: int) -> tf.Tensor:
        key = _fold(_fold(_fold(seed, _STREAMS["patches"]), block), call)
        u = _uniform([total, count], key)
        return tf.gather(u, tf.math.floormod(start + tf.range(examples), total))

    return uniforms


def _fisher_backward(z: tf.Tensor, columns: tf.Tensor, targets: list) -> list[tf.Tensor]:
    """``d ⟨column, z⟩ / d target`` for every cotangent column: each ``(K', *target.shape)``."""

    def one(column):
        grads = tf.gradients(z, targets, grad_ys=column)
        return [
            tf.zeros_like(t) if g is None else tf.convert_to_tensor(g)
            for g, t in zip(grads, targets)
        ]

    if columns.shape[0] == 1:
        return [g[None] for g in one(columns[0])]
    return stacked_map(one, columns)


def _solve(blocks: tuple[Block, ...], factors, eigens, gradients, damping) -> list[tf.Tensor]:
    """The preconditioned direction of every variable."""
    directions: list[Any] = [None] * len(gradients)
    for block, f, e in zip(blocks, factors, eigens):
        tensors = [gradients[i] for i in block.indices]
        if isinstance(block, KroneckerBlock):
            solved = block.solve(e, tensors, damping)
        else:
            solved = [
                km.damped_diagonal_solve(t, d, damping) for t, d in zip(tensors, block.diagonals(f))
            ]
        for i, d in zip(block.indices, solved):
            directions[i] = tf.cast(d, gradients[i].dtype)
    return directions


def _curvature(block: Block, factors: dict, steps: list[tf.Tensor]) -> tf.Tensor:
    """``δᵀ F̂ δ`` of one block (the current factors, undamped)."""
    tensors = [steps[i] for i in block.indices]
    if isinstance(block, KroneckerBlock):
        return tf.cast(block.curvature(factors, tensors), steps[0].dtype)
    return tf.add_n(
        [
            tf.reduce_sum(tf.cast(d, t.dtype) * tf.square(t))
            for d, t in zip(block.diagonals(factors), tensors)
        ]
    )
