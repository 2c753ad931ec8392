"""``TrainBatch``: what a curvature optimizer receives for one train step.

A :class:`TrainBatch` holds the tensors of the traced train step (inputs, targets,
sample weights, the forward pass's outputs, the training loss as compiled and its
gradients) and builds second-order quantities of that loss by differentiating the
very forward pass that produced the gradient: no second forward pass, the same dropout
masks and BatchNorm batch statistics. It is the one contract between the Keras train
step and every optimizer of this package; ``docs/integration.md`` documents it for
authors of new optimizers.

Everything is built symbolically, in the train step's graph (:meth:`TrainBatch.step_graph`),
and only when asked for: a method that is never called adds nothing to the step.

Under a ``tf.distribute`` strategy a ``TrainBatch`` is one replica's: Keras divides each
replica's loss by the number of replicas, so sums over replicas of this loss's
gradients, Hessian-vector products and Gauss–Newton products are those of the global
batch-mean loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import flat
from keras_curv._internal.keras_privates import softmax_logits, with_softmax_logits
from keras_curv._internal.losses import replica_share
from keras_curv._internal.model import recording_paused, stateless_outputs
from keras_curv._internal.numerics import curvature_dtype, exact_cast
from keras_curv.optimizers._graph import stacked_map


@dataclass(frozen=True)
class LayerCall:
    """One call of a tapped layer in the step's forward pass.

    Attributes:
        layer: The layer.
        inputs: Its (first) input tensor, as the layer's ``call`` received it.
        outputs: Its output *before* the activation (``Dense``, ``Conv*``,
            ``DepthwiseConv*``), else its output.
    """

    layer: keras.layers.Layer
    inputs: tf.Tensor
    outputs: tf.Tensor


@dataclass(frozen=True)
class LayerTap:
    """A tapped layer call with the gradient of a loss with respect to its outputs.

    Attributes:
        layer: The layer.
        inputs: Its input in the step's forward pass (``a`` of K-FAC).
        outputs: Its pre-activation output (``s = a W + b``).
        output_gradient: ``d loss / d outputs`` (for the batch-mean loss: multiply by the
            batch size for per-sample gradients).
    """

    layer: keras.layers.Layer
    inputs: tf.Tensor
    outputs: tf.Tensor
    output_gradient: tf.Tensor


def _leaves(structure: Any) -> list[tf.Tensor]:
    return [tf.convert_to_tensor(t) for t in tf.nest.flatten(structure) if t is not None]


def _split_point(output: tf.Tensor) -> tf.Tensor:
    """Where the Gauss–Newton product splits the loss for one model output.

    The pre-softmax logits when Keras cached them on a softmax output: Keras's
    cross-entropies then read the logits, not the probabilities, so the loss does not
    depend on the output tensor itself. Elsewhere the output.
    """
    logits = softmax_logits(output)
    return output if logits is None else logits


def _rejoin(output: tf.Tensor, fixed: tf.Tensor) -> tf.Tensor:
    """The output rebuilt from its split point's value ``fixed`` (see :func:`_split_point`)."""
    if softmax_logits(output) is None:
        return fixed
    return with_softmax_logits(tf.nn.softmax(fixed, axis=-1), fixed)


@dataclass
class TrainBatch:
    """The tensors of one traced train step, and the second-order quantities of its loss.

    Attributes:
        model: The model being trained.
        x: The step's inputs.
        y: Its targets.
        y_pred: The model outputs of the step's forward pass.
        sample_weight: Per-sample weights (class weights included), or ``None``.
        loss: The scalar training loss as compiled (regularization losses included),
            not loss-scaled; per replica under a strategy.
        variables: The model's trainable variables, in ``optimizer.variables`` order.
        loss_scale: Factor by which the step's gradients are scaled
            (``LossScaleOptimizer``'s dynamic scale, or the optimizer's
            ``loss_scale_factor``; 1 otherwise).
        scaled_gradient_tensors: The step's gradients of ``loss * loss_scale``, aligned
            with ``variables``, or ``None`` to recompute them from ``loss``.
        replica_id: This replica's index in the sync group (0 without a strategy).
        num_replicas: Number of replicas in sync (1 without a strategy).
        layer_calls: The tapped layer calls of the forward pass, in call order (empty
            unless the optimizer asked for layer taps, see :func:`~keras_curv.attach`).
        device: This replica's device, where it is known.
        replicas: Every replica's batch, where the statistics must be summed in the step
            graph instead of all-reduced (a ``LossScaleOptimizer`` on a strategy that
            needs ``merge_call``), else ``None``.
        loss_function: ``fn(y, y_pred, sample_weight)`` giving the loss without the
            regularization losses, when it is not the model's compiled loss
            (:func:`~keras_curv.curvature_step`); ``None`` for the compiled loss.
        training: The mode of the forward passes at other weights (:meth:`loss_at` and
            the ``*_at`` products): ``True`` in a train step; :func:`~keras_curv.minimize`
            evaluates a fixed data set in inference mode.
    """

    model: keras.Model
    x: Any
    y: Any
    y_pred: Any
    sample_weight: Any
    loss: tf.Tensor
    variables: list
    loss_scale: Any = 1.0
    scaled_gradient_tensors: list | None = None
    replica_id: int = 0
    num_replicas: int = 1
    layer_calls: tuple[LayerCall, ...] = ()
    device: str | None = None
    replicas: list[TrainBatch] | None = None
    loss_function: Callable[[Any, Any, Any], tf.Tensor] | None = None
    training: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------- the step graph

    @property
    def graph(self) -> tf.Graph:
        """The graph the step's tensors live in; second-order ops are built here."""
        return tf.convert_to_tensor(self.loss).graph

    def step_graph(self) -> contextlib.AbstractContextManager:
        """Context in which to build per-batch statistics (random probes included).

        Inside a ``LossScaleOptimizer``'s ``tf.cond`` branch the step's tensors cannot
        be differentiated; ops built in this context live in the step's graph and are
        captured by the branch where they are used.
        """
        return self.graph.as_default()

    def handles(self) -> list:
        """The values of ``variables`` that this replica's forward pass read.

        Differentiate the step's tensors with respect to these.
        """
        values = [getattr(v, "value", v) for v in self.variables]
        if self.replicas is None:
            return values
        # Outside its replica context a mirrored variable resolves to its primary copy;
        # this replica's forward pass read its own copy.
        return [self._own_copy(v) for v in values]

    def _own_copy(self, value: Any) -> Any:
        if not isinstance(value, tf.distribute.DistributedValues):
            return value
        copies = list(value.values)
        for copy in copies:
            if self.device and tf.DeviceSpec.from_string(copy.device).to_string() == self.device:
                return copy
        return copies[min(self.replica_id, len(copies) - 1)]

    # ---------------------------------------------------------------- first order

    def scaled_gradients(self) -> list[tf.Tensor]:
        """Dense gradients of ``loss * loss_scale``, recomputed only if not kept.

        Dense because curvature code differentiates them again, and Keras hands an
        ``Embedding``'s gradient over as ``tf.IndexedSlices``.
        """
        if "scaled_gradients" not in self._cache:
            handles = self.handles()
            gradients = self.scaled_gradient_tensors
            if gradients is None:
                with self.step_graph():
                    scaled = self.loss * exact_cast(self.loss_scale, self.loss.dtype)
                    gradients = tf.gradients(scaled, handles)
            self._cache["scaled_gradients"] = flat.zeros_for_none(gradients, handles)
        return list(self._cache["scaled_gradients"])

    def gradients(self) -> list[tf.Tensor]:
        """Dense gradients of ``loss`` (unscaled), in float32 at least."""
        return self._unscale(self.scaled_gradients())

    def gradients_of(self, value: tf.Tensor) -> list[tf.Tensor]:
        """Dense gradients of another scalar of the step's graph (unscaled, float32 at least).

        For a loss built from the step's tensors, such as the loss on labels sampled from
        the model (Sophia's Gauss–Newton–Bartlett estimate). It is differentiated times
        ``loss_scale`` and unscaled, like :meth:`gradients`, so that float16 backward
        passes keep their precision.

        Args:
            value: A scalar that depends on the trainable variables through this
                replica's forward pass.

        Returns:
            One tensor per variable.
        """
        handles = self.handles()
        with self.step_graph():
            scaled = value * exact_cast(self.loss_scale, value.dtype)
            gradients = tf.gradients(scaled, handles)
        return self._unscale(flat.zeros_for_none(gradients, handles))

    def _unscale(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        dtype = curvature_dtype(tensors[0].dtype) if tensors else tf.float32
        scale = exact_cast(self.loss_scale, dtype)
        return [tf.cast(t, dtype) / scale for t in tensors]

    # --------------------------------------------------------------- second order

    def hessian_vector_product(self, tangents: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """``H v`` of ``loss``, by reverse-over-reverse differentiation.

        Call it under :meth:`step_graph`, or inside a function built there (such as
        :func:`~keras_curv.optimizers._graph.stacked_map`'s): it builds its ops where it
        is called, so that it can be vectorised over several tangents. The products are
        returned in float32 at least, so that float16 models keep finite statistics.

        Args:
            tangents: One tensor per variable, shaped like it.

        Returns:
            One tensor per variable.
        """
        grads = self.scaled_gradients()
        handles = self.handles()
        tangents = [tf.cast(t, g.dtype) for t, g in zip(tangents, grads)]
        products = tf.gradients(grads, handles, grad_ys=tangents)
        return self._unscale(flat.zeros_for_none(products, handles))

    def _output_leaves(self) -> list[tf.Tensor]:
        return _leaves(self.y_pred)

    def gauss_newton_vector_product(self, tangents: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """``G v`` of ``loss``: the generalised Gauss–Newton matrix, split at ``y_pred``.

        For a model ending in a softmax whose logits Keras cached (``_keras_logits``), the
        split is at the logits: the loss reads them, and the cross-entropy's Hessian there,
        ``diag(p) − ppᵀ``, is the usual Gauss–Newton (Fisher) matrix of a classifier.

        ```
        G v = Jᵀ (∇²_ŷ L) J v + ∇²_θ L_direct v
        ```

        with ``J = ∂ŷ/∂θ`` and ``L_direct`` the part of the loss that depends on the
        weights other than through ``y_pred`` (the regularization losses), whose exact
        Hessian is kept. ``J v`` is obtained without forward mode, as ``∂_u ⟨Jᵀu, v⟩``
        (a double VJP). Positive semi-definite when the loss is convex in ``y_pred`` and the
        regularizers are convex. Call it under :meth:`step_graph`.

        Args:
            tangents: One tensor per variable, shaped like it.

        Returns:
            One tensor per variable, in float32 at least.
        """
        handles = self.handles()
        outputs = [_split_point(o) for o in self._output_leaves()]
        dummies = [tf.zeros_like(o) for o in outputs]
        transposed = tf.gradients(outputs, handles, grad_ys=dummies)
        pairs = [(t, v) for t, v in zip(transposed, tangents) if t is not None]
        if pairs:
            lhs = [tf.convert_to_tensor(t) for t, _ in pairs]
            cotangents = [tf.cast(v, t.dtype) for t, (_, v) in zip(lhs, pairs)]
            jv = tf.gradients(lhs, dummies, grad_ys=cotangents)
            jv = [tf.zeros_like(d) if j is None else j for j, d in zip(jv, dummies)]
            output_gradients = tf.gradients(self.loss, outputs)
            if all(g is None for g in output_gradients):
                raise ValueError(
                    "The Gauss-Newton product splits the loss at the model's outputs "
                    "(y_pred), but this model's loss does not depend on them (a custom "
                    "compute_loss, e.g. a physics residual). Use the Hessian instead "
                    '(e.g. curvature="hessian"), or compute the loss from y_pred.'
                )
            hjv = tf.gradients(output_gradients, outputs, grad_ys=jv)
            hjv = [tf.zeros_like(o) if h is None else h for h, o in zip(hjv, outputs)]
            ggn = tf.gradients(outputs, handles, grad_ys=hjv)
        else:
            ggn = [None] * len(handles)
        direct = tf.gradients(self.loss, handles, stop_gradients=outputs)
        if any(d is not None for d in direct):
            direct = flat.zeros_for_none(direct, handles)
            tangents = [tf.cast(v, d.dtype) for v, d in zip(tangents, direct)]
            extra = tf.gradients(direct, handles, grad_ys=tangents)
            ggn = [a if b is None else (b if a is None else a + b) for a, b in zip(ggn, extra)]
        products = flat.zeros_for_none(ggn, handles)
        dtype = curvature_dtype(products[0].dtype)
        return [tf.cast(p, dtype) for p in products]

    def jacobian(self, ys: tf.Tensor) -> list[tf.Tensor]:
        """The Jacobian of a small vector ``ys`` of shape ``(C,)``: per variable ``(C, *shape)``.

        The C reverse passes are vectorised with ``tf.vectorized_map`` (pfor), or
        unrolled under XLA (see :func:`~keras_curv.optimizers._graph.stacked_map`).
        """
        with self.step_graph():
            num = int(ys.shape[0])
            handles = self.handles()

            def one_row(unit):
                return flat.zeros_for_none(tf.gradients(ys, handles, grad_ys=unit), handles)

            return stacked_map(one_row, tf.eye(num, dtype=ys.dtype))

    # --------------------------------------------------------------- other weights

    def loss_at(self, values: Sequence[tf.Tensor]) -> tf.Tensor:
        """The training loss on this batch at other trainable ``values``, statelessly.

        The forward pass (in training mode, unless :attr:`training` says otherwise) and
        the compiled loss, regularization included, are evaluated with ``values`` in
        place of the trainable variables; no variable (BatchNorm statistics, RNG state,
        metrics) is written, and random layers draw the same numbers at every trial
        point. For line searches and trial steps.
        Not loss-scaled; per replica under a strategy.

        Args:
            values: One tensor per trainable variable.

        Returns:
            A scalar tensor.
        """
        values = self._cast_values(values)
        outputs, losses = self._forward_at(values)
        return self._loss_given(values, outputs, losses)

    def _cast_values(self, values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        if self.x is None:
            raise ValueError(
                "loss_at() and subset() need the step's inputs, and this train step called "
                "`compute_loss` without `x` and without calling the model on them."
            )
        return [tf.cast(v, w.dtype) for v, w in zip(values, self.variables)]

    def _forward_at(self, values: list[tf.Tensor]) -> tuple[Any, list | None]:
        """The stateless forward pass at ``values``: outputs, and its losses if needed."""
        if self.loss_function is not None:
            return stateless_outputs(
                self.model, values, self.x, training=self.training, return_losses=True
            )
        return stateless_outputs(self.model, values, self.x, training=self.training), None

    def _loss_given(self, values: list[tf.Tensor], outputs: Any, losses: list | None) -> tf.Tensor:
        """The training loss at ``values`` for model outputs ``outputs``."""
        if self.loss_function is not None:
            loss = self.loss_function(self.y, outputs, self.sample_weight)
            if losses:
                regularization = tf.add_n([tf.cast(r, loss.dtype) for r in losses])
                loss = loss + replica_share(regularization, self.num_replicas)
            return loss
        model = self.model
        non_trainable = [v.value for v in model.non_trainable_variables]
        metrics = [v.value for v in model.metrics_variables]
        with recording_paused():
            loss, _ = model.stateless_compute_loss(
                values,
                non_trainable,
                metrics,
                x=self.x,
                y=self.y,
                y_pred=outputs,
                sample_weight=self.sample_weight,
                training=self.training,
            )
        return loss

    def subset(self, size: int) -> TrainBatch:
        """The first ``size`` samples of this batch, as a batch of their own.

        Its forward pass is run again on those samples, statelessly and in training mode
        (as for :meth:`loss_at`), at the values this replica's pass read
        (:meth:`handles`), so that its products differentiate that new pass: a smaller
        batch for curvature statistics (``SketchySGD``'s ``hessian_batch_size``). Random
        layers draw their own numbers there, and BatchNormalization normalises with the
        sub-batch's statistics. Built once per size; call it under :meth:`step_graph`.

        Args:
            size: Number of samples (per replica), ≥ 1; a batch with fewer keeps all.

        Returns:
            A :class:`TrainBatch` whose ``loss`` is the compiled loss on those samples
            (regularization included), with the same variables and loss scale.
        """
        key = ("subset", int(size))
        if key not in self._cache:
            if self.replicas is None:
                self._cache[key] = self._subset_alone(int(size))
            else:
                parts = [replica._subset_alone(int(size)) for replica in self.replicas]
                for replica, part in zip(self.replicas, parts):
                    part.replicas = parts
                    replica._cache[key] = part
        return self._cache[key]

    def _subset_alone(self, size: int) -> TrainBatch:
        def head(structure):
            if structure is None:
                return None
            return tf.nest.map_structure(lambda t: tf.convert_to_tensor(t)[:size], structure)

        x, y, weights = head(self.x), head(self.y), head(self.sample_weight)
        part = TrainBatch(
            model=self.model,
            x=x,
            y=y,
            y_pred=None,
            sample_weight=weights,
            loss=None,
            variables=self.variables,
            loss_scale=self.loss_scale,
            replica_id=self.replica_id,
            num_replicas=self.num_replicas,
            device=self.device,
            loss_function=self.loss_function,
            training=self.training,
        )
        with self.step_graph():
            values = self._cast_values(self.handles())
            outputs, losses = part._forward_at(values)
            part.y_pred, part.loss = outputs, part._loss_given(values, outputs, losses)
        return part

    def loss_and_gradient(self, values: Sequence[tf.Tensor]) -> tuple[tf.Tensor, list]:
        """:meth:`loss_at` ``values`` and its gradient with respect to them (dense).

        Returns:
            ``(loss, gradients)``, gradients one per variable.
        """
        values = [tf.convert_to_tensor(v) for v in values]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = self.loss_at(values)
        return loss, flat.zeros_for_none(tape.gradient(loss, values), values)

    def hessian_vector_product_at(
        self, values: Sequence[tf.Tensor], tangents: Sequence[tf.Tensor]
    ) -> list[tf.Tensor]:
        """``H v`` of :meth:`loss_at` at ``values``, by a fresh stateless forward pass.

        Unlike :meth:`hessian_vector_product`, it does not differentiate the step's own
        tensors, so it works where they cannot be differentiated again: inside
        ``tf.while_loop`` and ``tf.cond`` bodies (conjugate gradients, line searches),
        and at weights other than the step's. Costs a forward pass and two backward
        passes. Products in float32 at least.

        Args:
            values: One tensor per trainable variable.
            tangents: ``v``, one tensor per variable.

        Returns:
            One tensor per variable.
        """
        values = self._cast_values(values)
        with tf.GradientTape() as tape:
            tape.watch(values)
            _, grads = self.loss_and_gradient(values)
        tangents = [tf.cast(t, g.dtype) for t, g in zip(tangents, grads)]
        products = flat.zeros_for_none(tape.gradient(grads, values, tangents), values)
        return [tf.cast(p, curvature_dtype(p.dtype)) for p in products]

    def gauss_newton_vector_product_at(
        self, values: Sequence[tf.Tensor], tangents: Sequence[tf.Tensor]
    ) -> list[tf.Tensor]:
        """``G v`` of :meth:`loss_at` at ``values``, by a fresh stateless forward pass.

        The same matrix as :meth:`gauss_newton_vector_product` (``Jᵀ ∇²_ŷ L J`` plus the
        exact Hessian of the part of the loss that bypasses ``y_pred``), with ``J v`` by
        a double VJP (forward mode fails through recurrent layers' while loops), usable
        where :meth:`hessian_vector_product_at` is.

        Args:
            values: One tensor per trainable variable.
            tangents: ``v``, one tensor per variable.

        Returns:
            One tensor per variable, in float32 at least.
        """
        values = self._cast_values(values)
        tangents = [tf.cast(t, v.dtype) for t, v in zip(tangents, values)]
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(values)
            with tf.GradientTape(persistent=True) as inner:
                inner.watch(values)
                outputs, losses = self._forward_at(values)
                leaves = [_split_point(o) for o in _leaves(outputs)]
                fixed = [tf.stop_gradient(o) for o in leaves]
                outer.watch(fixed)
                inner.watch(fixed)
                structure = tf.nest.pack_sequence_as(
                    outputs, [_rejoin(o, f) for o, f in zip(_leaves(outputs), fixed)]
                )
                loss = self._loss_given(values, structure, losses)
            output_gradients = inner.gradient(loss, fixed, unconnected_gradients=zero)
            direct = inner.gradient(loss, values)
            # J v = ∂_u ⟨Jᵀu, v⟩: the backward pass is linear in u.
            dummies = [tf.zeros_like(o) for o in leaves]
            with tf.GradientTape() as dual:
                dual.watch(dummies)
                transposed = inner.gradient(leaves, values, dummies)
                pairing = tf.add_n(
                    [tf.zeros([], loss.dtype)]
                    + [
                        tf.cast(tf.reduce_sum(t * v), loss.dtype)
                        for t, v in zip(transposed, tangents)
                        if t is not None
                    ]
                )
            jv = dual.gradient(pairing, dummies, unconnected_gradients=zero)
        hjv = outer.gradient(output_gradients, fixed, jv, unconnected_gradients=zero)
        products = outer.gradient(leaves, values, hjv)
        pairs = [(d, v) for d, v in zip(direct, tangents) if d is not None]
        if pairs:
            extra = outer.gradient([d for d, _ in pairs], values, [v for _, v in pairs])
            products = [
                a if b is None else (b if a is None else a + b) for a, b in zip(products, extra)
            ]
        del outer, inner
        products = flat.zeros_for_none(products, values)
        return [tf.cast(p, curvature_dtype(p.dtype)) for p in products]

    # ------------------------------------------------------------------ layer taps

    def layer_taps(self, loss: tf.Tensor | None = None) -> list[LayerTap]:
        """The tapped layer calls with ``d loss / d outputs`` (one backward pass for all).

        Args:
            loss: A scalar of the step's graph that depends on ``y_pred`` (K-FAC passes
                the loss on labels sampled from the model), or ``None`` for ``loss``.

        Returns:
            One :class:`LayerTap` per tapped call whose output the loss depends on.
        """
        if not self.layer_calls:
            return []
        target = self.loss if loss is None else loss
        with self.step_graph():
            grads = tf.gradients(target, [c.outputs for c in self.layer_calls])
        return [
            LayerTap(c.layer, c.inputs, c.outputs, g)
            for c, g in zip(self.layer_calls, grads)
            if g is not None
        ]
