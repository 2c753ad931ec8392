r"""Quasi-Newton in the class-gradient subspace (class-subspace paper, eq. 5–17).

The batch Hessian of softmax cross-entropy is dominated by a rank-C term spanned
by the per-class mean logit gradients :math:`c_k`. Treating the normalised
directions :math:`v_k = c_k/|c_k|` as orthogonal, the paper takes a Newton step
in their span and an SGD step in the complement (eq. 15):

.. math::
    \theta \leftarrow \theta - \eta g
        - \sum_k \Big(\frac{1}{\lambda_k} - \eta\Big) (v_k^\top g)\, v_k ,

with bias-corrected moving averages of the batch class gradients and a root
mean square of the batch curvatures (eq. 16–17):

.. math::
    c_k = \frac{1-\gamma}{1-\gamma^t} \sum_i \gamma^{t-i} c^{B(i)}_k, \qquad
    \lambda_k = \sqrt{\frac{1-\gamma}{1-\gamma^t}
        \sum_i \gamma^{t-i} \big(\lambda^{B(i)}_k\big)^2}, \qquad
    \lambda^B_k = \frac{1}{|B|} \sum_{\mu\in B} y^\mu_k p^\mu_k (1-p^\mu_k)\,|c^B_k|^2 .

With the defaults (``curvature="paper"``, ``inverse="diagonal"``, ``momentum=0``,
no damping, no cap, ``update_each=1``) the update is exactly eq. 15–17.

Eq. 17 counts only class-k samples, while the Gauss–Newton curvature along
:math:`v_k` gets :math:`p_k(1-p_k)` from every sample; early in training it can
underestimate the curvature by up to a factor C and the Newton step overshoots
(the faithful method diverges on a 3-class softmax regression with
:math:`\eta = 0.1`). ``curvature="gauss_newton"`` and
``curvature="projected_newton"`` are calibrated alternatives (see the class
docstring).
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_curv._internal import flat as _flat
from keras_curv._internal.data import class_targets
from keras_curv._internal.model import stateless_outputs
from keras_curv.curvature.class_gradients import class_scores, num_classes_of
from keras_curv.optimizers import _hardening, _labels, integration

_CURVATURES = ("paper", "gauss_newton", "projected_newton")
_INVERSES = ("diagonal", "exact")
# Relative eigenvalue cut-off of the C x C pseudo-inverses (Gram and curvature matrices).
_PINV_RTOL = 1e-10
# Keras losses that are not a softmax cross-entropy over C classes: the curvature
# model of eq. 17 (p_k(1 - p_k)) does not describe them. Custom losses are trusted.
_NON_CLASSIFICATION_LOSSES = {
    getattr(keras.losses, name)
    for name in (
        "mean_squared_error",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error",
        "huber",
        "log_cosh",
        "binary_crossentropy",
        "binary_focal_crossentropy",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
        "poisson",
        "cosine_similarity",
    )
}


def _check_classification_loss(model: keras.Model, owner: str) -> None:
    """Raises ``ValueError`` when ``model`` is compiled with a known non-classification loss."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return
    function = getattr(loss, "fn", loss)
    if function in _NON_CLASSIFICATION_LOSSES:
        name = getattr(function, "__name__", repr(function))
        raise ValueError(
            f"{owner} is a Newton method for softmax cross-entropy over C classes, but the "
            f"model is compiled with loss {name!r}. Compile with "
            "'sparse_categorical_crossentropy' (integer labels) or 'categorical_crossentropy' "
            "(one-hot labels), with from_logits=True for a logits output; for other losses "
            "use keras_curv.optimizers.AdaHessian."
        )


def _sym_pinv(matrix: tf.Tensor) -> tf.Tensor:
    """Pseudo-inverse of a small symmetric PSD matrix, by eigendecomposition (XLA-friendly).

    Non-finite entries are treated as zeros: ``eigh`` raises (and would stop training)
    on them, and a step whose statistics overflowed is skipped elsewhere anyway.
    """
    matrix = tf.where(tf.math.is_finite(matrix), matrix, tf.zeros_like(matrix))
    matrix = 0.5 * (matrix + tf.transpose(matrix))
    values, vectors = tf.linalg.eigh(matrix)
    cutoff = tf.reduce_max(tf.abs(values)) * tf.constant(_PINV_RTOL, matrix.dtype)
    keep = tf.abs(values) > cutoff
    inv = tf.where(keep, 1.0 / tf.where(keep, values, tf.ones_like(values)), tf.zeros_like(values))
    return tf.matmul(vectors * inv[None, :], vectors, transpose_b=True)


def _per_class_sq_norm(tensors: list[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    """``sum over variables of |t[k]|^2`` for a list of ``(C, *shape)`` tensors -> ``(C,)``."""
    return tf.add_n(
        [
            tf.reduce_sum(tf.reshape(tf.cast(t, dtype) ** 2, [tf.shape(t)[0], -1]), 1)
            for t in tensors
        ]
    )


def _per_class_dot(left: list[tf.Tensor], right: list[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    """``sum over variables of <left[k], right>`` for ``(C, *shape)`` and ``shape`` tensors."""
    return tf.add_n(
        [
            tf.linalg.matvec(
                tf.reshape(tf.cast(a, dtype), [tf.shape(a)[0], -1]),
                tf.reshape(tf.cast(b, dtype), [-1]),
            )
            for a, b in zip(left, right)
        ]
    )


def _expand(vector: tf.Tensor, rank: int) -> tf.Tensor:
    return tf.reshape(vector, [-1] + [1] * rank)


@keras.saving.register_keras_serializable(package="keras_curv")
class ClassSubspaceNewton(keras.optimizers.Optimizer):
    r"""Newton in the class-gradient subspace, SGD in its complement (eq. 15–17).

    Each step uses the batch's class scores :math:`z` (logits, or log-probabilities
    when the model ends in a softmax; :math:`\mathrm{softmax}(z) = p` either way)
    and labels (sparse or one-hot):

    1. Batch class gradients :math:`c^B_k = \frac{1}{n_k}\sum_{\mu: y^\mu=k} \nabla z^\mu_k`
       (one vectorised Jacobian of the C per-class sums) and the batch curvature
       :math:`\lambda^B_k` (eq. 17, or a Gauss–Newton alternative).
    2. Bias-corrected EMAs :math:`c_k`, :math:`\lambda_k` (eq. 16–17), updated with the
       current batch *before* the step. Each class keeps its own step count
       :math:`t_k`: a class absent from the batch keeps its EMAs and count unchanged.
       With :math:`t_k = 0`, :math:`c_k = 0` (so :math:`v_k = 0`) and :math:`\lambda_k = 1`.
    3. The step :math:`d = \eta g + \sum_k a_k v_k` with
       :math:`a_k = (1/\lambda_k - \eta)(v_k^\top g)` (eq. 15), where :math:`g` is the
       gradient Keras passes on (unscaled, clipped) and :math:`|\cdot|` and the dot
       products run over all trainable variables together. With momentum
       :math:`\mu > 0`: ``buf <- mu * buf + d; theta <- theta - buf`` (heavy ball on the
       whole step; the paper's experiments used 0.9); with :math:`\mu = 0`,
       ``theta <- theta - d``.

    Sample weights :math:`w` (from ``fit``) weight both the class means and the
    curvature the way Keras's ``"sum_over_batch_size"`` loss does:
    :math:`c^B_k = \sum_\mu w_\mu y^\mu_k \nabla z^\mu_k / \sum_\mu w_\mu y^\mu_k` and
    :math:`\lambda^B_k = \frac{1}{|B|}\sum_\mu w_\mu y^\mu_k p^\mu_k(1-p^\mu_k)|c^B_k|^2`;
    a class whose weights sum to zero counts as absent. Every step checks its labels
    (sparse: whole numbers in ``[0, C)``; one-hot: non-negative rows summing to 1) and
    raises ``InvalidArgumentError`` naming the problem before the loss runs; under
    ``jit_compile``, where XLA drops assertions, such a step is skipped and counted in
    :attr:`skipped_steps` instead.

    Options beyond the paper (all off by default):

    * ``inverse="exact"``: drop the orthogonality assumption. With
      :math:`V = [v_1..v_C]`, :math:`\Lambda = \mathrm{diag}(\lambda)`, :math:`S = V^\top V`,
      the Newton part is the pseudo-inverse :math:`(V\Lambda V^\top)^+ g =
      V (S\Lambda S)^+ V^\top g` and the SGD part uses the exact projection
      :math:`P = I - V S^+ V^\top`; everything reduces to C x C matrices.
    * ``curvature="gauss_newton"``: :math:`\lambda^B_k = v_k^\top G_B v_k`, the
      Gauss–Newton Rayleigh quotient on the batch,
      :math:`G_B = \frac{1}{|B|}\sum_\mu w_\mu J_\mu^\top
      (\mathrm{diag}\,p^\mu - p^\mu p^{\mu\top}) J_\mu`,
      with :math:`v_k` the updated direction. :math:`J v_k` is obtained without forward
      mode as :math:`\partial_u \langle J^\top u, v_k\rangle` (double VJP, vectorised over k).
    * ``curvature="projected_newton"``: Newton on the whole C x C block,
      :math:`K = V^\top G_B V` (from the last statistics refresh), step
      :math:`\theta \leftarrow \theta - \eta P g - V (K + \delta I)^+ V^\top g`
      with :math:`\delta` = ``damping``, by default :math:`1/\eta`. That default is
      the proximal (Levenberg–Marquardt) form of the subspace step: it minimises
      :math:`u^\top V^\top g + \tfrac12 u^\top K u + \tfrac{1}{2\eta}|u|^2`, so the
      step along the class directions is never longer than the SGD step there (it
      is Newton where :math:`K \gg 1/\eta` and SGD where :math:`K \ll 1/\eta`).
      Without it (``damping=0``) the small eigenvalues of :math:`K` early in training
      give huge steps: the digits CNN diverges to NaN at :math:`\eta = 0.1`.
    * ``damping`` is added to every :math:`\lambda_k` and ``max_inverse_curvature``
      caps :math:`1/\lambda_k` (i.e. floors :math:`\lambda_k`). ``damping=None``
      (the default) means 0 for ``"paper"`` and ``"gauss_newton"`` and
      :math:`1/\eta` (the current learning rate, schedules included) for
      ``"projected_newton"``.
    * ``update_each=k`` refreshes the class statistics (the Jacobian and curvature)
      only on steps whose iteration count is a multiple of k; other steps reuse the
      stored EMAs. Without XLA the statistics' ops do not run on skipped steps; under
      ``jit_compile`` they run every step and are discarded (a warning says so).

    Cost: one vectorised Jacobian of C per-class sums per refresh (C reverse passes);
    ``"gauss_newton"``/``"projected_newton"`` add one reverse pass and C
    double-backward passes. A class with a zero direction takes no Newton step;
    :math:`\lambda_k = 0` with a non-zero direction (saturated probabilities) would give
    an infinite eq. 15 step: that class takes the SGD step instead, and ``damping`` or
    ``max_inverse_curvature`` bound large finite :math:`1/\lambda_k`. With
    ``gradient_accumulation_steps`` the statistics come from the last micro-batch.

    Hardening (see ``docs/hardening.md``): under a ``tf.distribute`` strategy the
    counts and per-class sums are reduced over replicas, so the statistics are those of
    the global batch. A step whose loss or gradient is not finite is skipped (weights
    and state untouched, ``iterations`` included) and counted in :attr:`skipped_steps`;
    a class with non-finite statistics counts as absent, and one whose Newton
    coefficient is not finite (:math:`\lambda_k` underflowed to 0) takes the SGD step.

    Args:
        learning_rate: :math:`\eta`, a float or a Keras learning-rate schedule.
        gamma: EMA decay :math:`\gamma \in (0, 1)` of eq. 16–17.
        momentum: Heavy-ball momentum on the whole step, in ``[0, 1)``.
        curvature: ``"paper"`` (eq. 17), ``"gauss_newton"`` or ``"projected_newton"``.
        inverse: ``"diagonal"`` (eq. 13–15) or ``"exact"``.
        damping: Non-negative value added to each :math:`\lambda_k` (to :math:`K` for
            ``"projected_newton"``), or ``None`` for the mode's default: 0 for
            ``"paper"`` and ``"gauss_newton"``, :math:`1/\eta` for
            ``"projected_newton"``.
        max_inverse_curvature: Optional positive cap on :math:`1/\lambda_k`.
        update_each: Refresh class statistics every this many steps (>= 1).
        num_classes: Number of classes C. Discovered from the model output on the
            first traced step when ``None``; stored in the config afterwards so a
            reloaded optimizer rebuilds its state with the right shape.
        name: Optimizer name.
        **kwargs: Standard Keras optimizer arguments (``weight_decay``, ``clipnorm``,
            ``clipvalue``, ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ...).

    Raises:
        ValueError: invalid arguments; or, when the step is traced, a model whose
            output is not a single ``(batch, C)`` classifier output with ``C >= 2``
            (regression, multi-output, single-sigmoid), or one compiled with a Keras loss
            that is not a cross-entropy over C classes (``"mse"``,
            ``"binary_crossentropy"``, ...).

    Example:
        >>> model.compile(optimizer=keras_curv.optimizers.ClassSubspaceNewton(0.05),
        ...               loss="sparse_categorical_crossentropy")
        >>> model.fit(x, y, batch_size=128)
        >>> model.optimizer.curvature        # lambda_k, shape (C,)
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
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str = "class_subspace_newton",
        **kwargs,
    ):
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
        if not 0.0 < float(gamma) < 1.0:
            raise ValueError(f"`gamma` must lie in (0, 1); got {gamma}.")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must lie in [0, 1); got {momentum}.")
        if curvature not in _CURVATURES:
            raise ValueError(f"`curvature` must be one of {_CURVATURES}; got {curvature!r}.")
        if inverse not in _INVERSES:
            raise ValueError(f"`inverse` must be one of {_INVERSES}; got {inverse!r}.")
        if damping is not None and not float(damping) >= 0.0:
            raise ValueError(f"`damping` must be non-negative or None; got {damping}.")
        if max_inverse_curvature is not None and float(max_inverse_curvature) <= 0.0:
            raise ValueError(
                f"`max_inverse_curvature` must be positive or None; got {max_inverse_curvature}."
            )
        if int(update_each) != update_each or int(update_each) < 1:
            raise ValueError(f"`update_each` must be an integer >= 1; got {update_each}.")
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"`num_classes` must be >= 2 or None; got {num_classes}.")
        self.gamma = float(gamma)
        self.momentum = float(momentum)
        self.curvature_mode = curvature
        self.inverse = inverse
        self.damping = None if damping is None else float(damping)
        self.max_inverse_curvature = (
            None if max_inverse_curvature is None else float(max_inverse_curvature)
        )
        self.update_each = int(update_each)
        self.num_classes = None if num_classes is None else int(num_classes)
        self._class_state_built = False
        self._pending = None
        self._coefficients = None
        self._step_directions = None

    # ------------------------------------------------------------------ state

    def build(self, variables):
        """Creates momentum buffers and, once C is known, the class statistics."""
        if self.built:
            return
        super().build(variables)
        self._skipped_steps = self.add_variable(
            (), dtype="int64", name="skipped_steps", aggregation="only_first_replica"
        )
        self._momentums = []
        if self.momentum > 0:
            self._momentums = [
                self.add_variable_from_reference(v, name="momentum") for v in variables
            ]
        if self.num_classes is not None:
            self._build_class_state()

    def _build_class_state(self):
        """``(C, *shape)`` EMA sums per variable, ``(C,)`` curvature EMA and counts."""
        if self._class_state_built:
            return
        variables = self._trainable_variables
        num = self.num_classes
        self._stat_dtype = variables[0].dtype
        # Built from statistics reduced over replicas, so equal on every replica and
        # written from the replica context: "only_first_replica" aggregation.
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
        if self.curvature_mode == "projected_newton":
            self._subspace_curvature = self.add_variable(
                (num, num), dtype=self._stat_dtype, name="subspace_curvature", **shared
            )
        self._class_state_built = True

    def load_own_variables(self, store):
        """Restores the state, creating the class statistics first if the store has them.

        The class statistics exist only once C is known (first traced step, or
        ``num_classes``). A fresh optimizer that restores a checkpoint of a trained one
        (``keras.callbacks.BackupAndRestore``, ``model.load_weights``) is built without
        them, so C is read from the stored ``(C, *shape)`` class-gradient sums instead of
        letting Keras skip the whole state with a warning.
        """
        if self.built and not self._class_state_built:
            base = len(self.variables)
            extra = len(self._trainable_variables) + 2
            extra += 1 if self.curvature_mode == "projected_newton" else 0
            if len(store.keys()) == base + extra:
                first = store[str(base)]
                variable = self._trainable_variables[0]
                if tuple(first.shape[1:]) == tuple(variable.shape) and first.shape[0] >= 2:
                    self._ensure_class_state(int(first.shape[0]))
        super().load_own_variables(store)

    def _ensure_class_state(self, num_classes: int):
        if self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(
                f"{type(self).__name__} was set up for {self.num_classes} classes but the "
                f"model outputs {num_classes}. Use a fresh optimizer for a different model."
            )
        self.num_classes = num_classes
        if not self._class_state_built:
            # Slots need C, known only once a step is traced: create them eagerly,
            # outside the function being traced.
            with tf.init_scope():
                self._build_class_state()

    def _read_state(self):
        return (
            [tf.convert_to_tensor(m) for m in self._class_sums],
            tf.convert_to_tensor(self._curvature_sq),
            tf.convert_to_tensor(self._class_steps),
        )

    def _updated_state(self, stats, sums, curvature_sq, steps):
        """EMA sums after absorbing the batch statistics (classes present only)."""
        gamma = tf.constant(self.gamma, self._stat_dtype)
        present = stats["present"]
        new_sums = [
            tf.where(
                _expand(present, len(m.shape) - 1),
                tf.cast(gamma, m.dtype) * m + tf.cast(1 - gamma, m.dtype) * tf.cast(cb, m.dtype),
                m,
            )
            for m, cb in zip(sums, stats["class_gradients"])
        ]
        new_sq = tf.where(
            present, gamma * curvature_sq + (1 - gamma) * stats["curvature"] ** 2, curvature_sq
        )
        new_steps = steps + tf.cast(present, steps.dtype)
        return new_sums, new_sq, new_steps

    def _derived(self, sums, curvature_sq, steps):
        """Bias-corrected c_k (per variable), lambda_k, unit directions v_k (per variable)."""
        dtype = self._stat_dtype
        seen = steps > 0
        gamma = tf.constant(self.gamma, dtype)
        correction = tf.where(seen, 1 - gamma**steps, tf.ones_like(steps))
        means = [m / tf.cast(_expand(correction, len(m.shape) - 1), m.dtype) for m in sums]
        curvature = tf.where(seen, tf.sqrt(curvature_sq / correction), tf.ones_like(steps))
        norms = tf.sqrt(_per_class_sq_norm(means, dtype))
        safe = tf.where(norms > 0, norms, tf.ones_like(norms))
        inv_norm = tf.where(norms > 0, 1.0 / safe, tf.zeros_like(norms))
        directions = [c * tf.cast(_expand(inv_norm, len(c.shape) - 1), c.dtype) for c in means]
        return means, curvature, directions, norms > 0

    # ------------------------------------------------------------- statistics

    def _batch_statistics(self, batch: integration.TrainBatch, num_classes: int) -> dict:
        """Per-batch class gradients, counts and curvature of the global batch.

        See :meth:`_replica_statistics`; the per-replica sums are reduced by
        :func:`~keras_curv.optimizers._hardening.replica_sum`.
        """
        return _hardening.replica_sum(batch, lambda b: self._replica_statistics(b, num_classes))

    def _replica_statistics(self, batch: integration.TrainBatch, num_classes: int):
        """Generator of one replica's statistics, built in the step's graph.

        Each ``yield`` hands a per-replica sum over and receives its sum over the
        replicas.

        With ``update_each > 1`` (outside XLA) the backward passes are seeded through a
        ``Switch`` on the refresh predicate, so on skipped steps their ops receive a
        dead tensor and do not execute; a ``Merge`` then yields zeros. ``tf.cond`` cannot
        be used here: gradients taken inside a cond branch stop at the tensors the
        branch captures from the forward pass.
        """
        dtype = self._stat_dtype
        self._warn_if_gate_cannot_skip()
        gate = integration.StepGate(self._refresh() if self.update_each > 1 else None)
        scores = tf.cast(class_scores(batch.model, batch.y_pred), dtype)
        probs = tf.nn.softmax(scores, axis=-1)
        onehot = class_targets(batch.y, num_classes, dtype)
        if batch.sample_weight is None:
            weights = tf.ones_like(scores[:, 0])
        else:
            weights = tf.reshape(tf.cast(batch.sample_weight, dtype), [-1])
        weighted = onehot * weights[:, None]
        # Under a distribution strategy each replica holds a shard of the batch: the
        # class means and the curvature are those of the global batch, so counts,
        # size and every per-sample sum below are reduced over the replicas.
        counts, size = yield [tf.reduce_sum(weighted, axis=0), tf.cast(tf.shape(scores)[0], dtype)]
        safe_counts = tf.where(counts > 0, counts, tf.ones_like(counts))
        per_class = tf.reduce_sum(weighted * scores, axis=0) / safe_counts
        handles = batch._handles()
        if self._can_partition(batch):
            class_grads = self._partitioned_class_gradients(
                batch, gate, onehot, weights, safe_counts, dtype
            )
        else:
            seeds = gate.enter(tf.eye(num_classes, dtype=per_class.dtype))

            def one_row(unit):
                return _flat.zeros_for_none(tf.gradients(per_class, handles, grad_ys=unit), handles)

            class_grads = [gate.exit(j) for j in integration.stacked_map(one_row, seeds)]
        class_grads = yield class_grads
        # A class whose statistics are not finite (an overflow, a NaN sample) is
        # treated as absent from this batch: its EMAs and count stay as they are.
        class_finite = tf.math.is_finite(_per_class_sq_norm(class_grads, dtype))
        present = gate.mask(tf.logical_and(counts > 0, class_finite))
        stats = {"present": present, "class_gradients": class_grads}
        if self.curvature_mode == "paper":
            spread = (yield tf.reduce_sum(weighted * probs * (1 - probs), axis=0)) / size
            stats["curvature"] = spread * _per_class_sq_norm(class_grads, dtype)
            stats["present"] = tf.logical_and(present, tf.math.is_finite(stats["curvature"]))
            return stats
        # Gauss-Newton curvature along the *updated* directions.
        sums, curvature_sq, steps = self._read_state()
        new_sums, _, new_steps = self._updated_state(
            {**stats, "curvature": tf.zeros_like(counts)}, sums, curvature_sq, steps
        )
        _, _, directions, _ = self._derived(new_sums, curvature_sq, new_steps)
        directions = [gate.enter(d) for d in directions]
        block = self._gauss_newton_block(
            handles, scores, gate.enter(tf.zeros_like(scores)), probs, weights, size, directions
        )
        block = yield gate.exit(block)
        stats["curvature"] = tf.linalg.diag_part(block)
        stats["block"] = block
        stats["present"] = tf.logical_and(present, tf.reduce_all(tf.math.is_finite(block)))
        return stats

    @staticmethod
    def _can_partition(batch: integration.TrainBatch) -> bool:
        """Whether per-class sub-batches give exactly the step's class gradients.

        True when every sample's logits depend on that sample alone and
        deterministically (no BatchNormalization, no random layers), the inputs are
        known, and XLA is off (sub-batches have data-dependent shapes).
        """
        if batch.x is None or integration.under_xla():
            return False
        for layer in batch.model._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization) or layer._seed_generators:
                return False
        return True

    def _partitioned_class_gradients(self, batch, gate, onehot, weights, safe_counts, dtype):
        r"""Class gradients from one forward and backward pass per class sub-batch.

        :math:`c^B_k = \nabla_\theta \sum_{\mu \in B_k} w^\mu z^\mu_k / n_k` involves only
        class-k samples, so the C sub-batches together cost about one extra forward and
        backward pass of the batch, against C backward passes of the whole batch for the
        vectorised Jacobian. Exact for models whose samples do not interact (checked by
        :meth:`_can_partition`).
        """
        handles = batch._handles()
        labels = tf.argmax(gate.enter(onehot), axis=-1, output_type=tf.int32)
        # A zero row after the samples: index 0 below is sample 0, or that row when this
        # shard is empty (a replica's share of a short last batch).
        padded = tf.nest.map_structure(
            lambda t: tf.concat([t, tf.zeros(tf.concat([[1], tf.shape(t)[1:]], 0), t.dtype)], 0),
            batch.x,
        )
        rows = []
        for k in range(self.num_classes):
            # Pad every sub-batch with sample 0 at weight 0: a class absent from the batch
            # would otherwise give an empty forward pass, which some kernels reject
            # (oneDNN convolutions). Samples do not interact here, so the pad adds exactly 0.
            members = tf.concat(
                [tf.where(tf.equal(labels, k))[:, 0], tf.zeros([1], tf.int64)], axis=0
            )
            member_weights = tf.concat(
                [tf.gather(weights, members[:-1]), tf.zeros([1], weights.dtype)], axis=0
            )
            inputs = tf.nest.map_structure(lambda t, m=members: tf.gather(t, m), padded)
            outputs = stateless_outputs(batch.model, handles, inputs, training=True)
            score = tf.cast(class_scores(batch.model, outputs), dtype)[:, k]
            total = tf.reduce_sum(member_weights * score) / safe_counts[k]
            rows.append(_flat.zeros_for_none(tf.gradients(total, handles), handles))
        return [gate.exit(tf.stack(parts)) for parts in zip(*rows)]

    def _gauss_newton_block(self, handles, scores, dummy, probs, weights, size, directions):
        """``K = V^T G_B V`` (C x C) by a double VJP: ``J v = d/du <J^T u, v>``."""
        dtype = self._stat_dtype
        # J^T u is linear in u; its u-derivative contracted with v_k is J v_k.
        # Dense: an Embedding table's J^T u is IndexedSlices, which tf.gradients cannot take.
        transposed = [
            None if t is None else tf.convert_to_tensor(t)
            for t in tf.gradients(scores, handles, grad_ys=dummy)
        ]
        pairs = [(t, d) for t, d in zip(transposed, directions) if t is not None]
        if not pairs:
            return tf.zeros((self.num_classes, self.num_classes), dtype)
        lhs = [t for t, _ in pairs]

        def jvp(direction_slices):
            (out,) = tf.gradients(
                lhs, dummy, grad_ys=[tf.cast(s, t.dtype) for s, t in zip(direction_slices, lhs)]
            )
            return tf.zeros_like(dummy) if out is None else out

        jv = tf.cast(integration.stacked_map(jvp, [d for _, d in pairs]), dtype)  # (C, B, C)
        # (diag p - p p^T) J v_l, per sample.
        hjv = probs[None] * jv - probs[None] * tf.reduce_sum(probs[None] * jv, -1, keepdims=True)
        return tf.einsum("kbc,lbc,b->kl", jv, hjv, weights) / size

    def _refresh(self) -> tf.Tensor:
        return tf.equal(self.iterations % self.update_each, 0)

    def _warn_if_gate_cannot_skip(self) -> None:
        if self.update_each == 1 or not integration.under_xla():
            return
        if not getattr(self, "_warned_xla", False):
            self._warned_xla = True
            warnings.warn(
                f"{type(self).__name__}(update_each={self.update_each}) under jit_compile: "
                "XLA has no dead-branch pruning for the Jacobian, so the class statistics "
                "are computed every step and absorbed only every update_each steps. "
                "Compile without jit_compile to skip their cost.",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- update

    def apply(self, grads, trainable_variables=None):
        batch = integration.current_batch(self)
        if not self.built:
            variables = trainable_variables or batch.variables
            with keras.name_scope(self.name, caller=self):
                self.build(list(variables))
        if isinstance(batch.y_pred, (list, tuple, dict)):
            # num_classes_of reads `.shape` before its own nest check.
            raise ValueError(
                f"{type(self).__name__} needs a C-way classifier with one output of shape "
                f"(batch, C); model {batch.model.name!r} has {len(batch.y_pred)} outputs. "
                "Multi-output models have no single class subspace."
            )
        num_classes = num_classes_of(batch.model, batch.y_pred)
        _check_classification_loss(batch.model, type(self).__name__)
        self._ensure_class_state(num_classes)
        labels_valid = _labels.guard_training_labels(
            batch, num_classes, type(self).__name__, always=True
        )

        def statistics():
            with batch.step_graph():
                return self._batch_statistics(batch, num_classes)

        stats = _hardening.once_per_step(self, batch, statistics)
        # A non-finite loss or gradient (e.g. a NaN input) skips the whole step;
        # non-finite class statistics only drop those classes (see _batch_statistics).
        # Invalid labels raise in graph mode; under XLA (no assertions) they skip it.
        proceed = _hardening.all_finite_on_every_replica(
            [*grads, batch.loss, _labels.as_finite_flag(labels_valid)], batch
        )
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        _hardening.apply_or_skip(
            proceed,
            self._apply_with_stats,
            (list(grads), trainable_variables, stats),
            self._skipped_steps,
        )

    def _apply_with_stats(self, grads, trainable_variables, stats) -> None:
        self._pending = stats
        try:
            super().apply(grads, trainable_variables)
        finally:
            self._pending = None
            self._coefficients = None
            self._step_directions = None

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        stats = self._pending
        if stats is None:
            raise integration.CurvatureContextError(
                integration.USAGE.format(name=type(self).__name__)
            )
        dtype = self._stat_dtype
        sums, curvature_sq, steps = self._read_state()
        new_sums, new_sq, new_steps = self._updated_state(stats, sums, curvature_sq, steps)
        for slot, value in zip(self._class_sums, new_sums):
            self.assign(slot, value)
        self.assign(self._curvature_sq, new_sq)
        self.assign(self._class_steps, new_steps)
        block = None
        if self.curvature_mode == "projected_newton":
            block = tf.where(
                tf.reduce_any(stats["present"]),
                stats["block"],
                tf.convert_to_tensor(self._subspace_curvature),
            )
            self.assign(self._subspace_curvature, block)

        _, curvature, directions, alive = self._derived(new_sums, new_sq, new_steps)
        indices = [self._get_variable_index(v) for v in trainable_variables]
        # The projections v_k^T g need the gradient of the global batch: sum it over
        # replicas here (as Keras's TF optimizer does before update_step) and hand the
        # reduced gradients to the per-variable update without reducing them again.
        grads_and_vars = self._all_reduce_sum_gradients(
            list(zip(grads, [getattr(v, "value", v) for v in trainable_variables]))
        )
        lr = tf.cast(learning_rate, dtype)
        projections = _per_class_dot(
            [directions[i] for i in indices],
            [tf.convert_to_tensor(g) for g, _ in grads_and_vars],
            dtype,
        )
        coefficients = self._coefficients_for(curvature, directions, projections, lr, block)
        # A class without a direction (never seen, or a zero class gradient) takes no
        # Newton step, nor does one whose Newton coefficient is not finite (lambda_k
        # underflowed to 0, so 1/lambda_k = inf): it gets the SGD step instead.
        usable = tf.logical_and(alive, tf.math.is_finite(coefficients))
        self._coefficients = tf.where(usable, coefficients, tf.zeros_like(coefficients))
        self._step_directions = directions
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_tf_update_step,
            self._distribution_strategy,
            grads_and_vars,
            learning_rate,
        )

    def _damping(self, dtype: tf.DType, lr: tf.Tensor | None = None) -> tf.Tensor:
        """The damping :math:`\\delta` in force: ``damping``, or the mode's default.

        ``damping=None`` means 0 for ``"paper"`` and ``"gauss_newton"`` (eq. 15–17 as
        written) and :math:`1/\\eta` (the current learning rate) for
        ``"projected_newton"``.
        """
        if self.damping is not None:
            return tf.constant(self.damping, dtype)
        if self.curvature_mode != "projected_newton":
            return tf.constant(0.0, dtype)
        if lr is None:
            lr = self._get_current_learning_rate()
        return 1.0 / tf.cast(lr, dtype)

    def _effective_curvature(self, curvature, lr=None):
        curvature = curvature + self._damping(curvature.dtype, lr)
        if self.max_inverse_curvature is not None:
            floor = tf.constant(1.0 / self.max_inverse_curvature, curvature.dtype)
            curvature = tf.maximum(curvature, floor)
        return curvature

    def _coefficients_for(self, curvature, directions, projections, lr, block):
        """``a`` with step ``d = lr g + sum_k a_k v_k``."""
        dtype = self._stat_dtype
        if self.curvature_mode != "projected_newton" and self.inverse == "diagonal":
            return (1.0 / self._effective_curvature(curvature, lr) - lr) * projections
        flat = tf.concat(
            [tf.reshape(tf.cast(d, dtype), [self.num_classes, -1]) for d in directions], 1
        )
        gram = tf.matmul(flat, flat, transpose_b=True)
        gram_pinv = _sym_pinv(gram)
        if self.curvature_mode == "projected_newton":
            eye = tf.eye(self.num_classes, dtype=dtype)
            newton = _sym_pinv(block + self._damping(dtype, lr) * eye)
        else:
            lam = self._effective_curvature(curvature, lr)
            newton = _sym_pinv(tf.matmul(gram * lam[None, :], gram))
        return tf.linalg.matvec(newton - lr * gram_pinv, projections)

    def update_step(self, gradient, variable, learning_rate):
        """``d = lr g + sum_k a_k v_k[variable]``; ``theta -= d`` (or heavy ball on d)."""
        index = self._get_variable_index(variable)
        gradient = tf.convert_to_tensor(gradient)
        lr = tf.cast(learning_rate, variable.dtype)
        coefficients = tf.cast(self._coefficients, variable.dtype)
        direction = tf.cast(self._step_directions[index], variable.dtype)
        step = lr * tf.cast(gradient, variable.dtype) + tf.tensordot(coefficients, direction, 1)
        if self.momentum > 0:
            buffer = self._momentums[index]
            self.assign(buffer, tf.constant(self.momentum, variable.dtype) * buffer + step)
            self.assign_sub(variable, buffer)
        else:
            self.assign_sub(variable, step)

    # ------------------------------------------------------------ diagnostics

    def _check_state(self):
        if not self._class_state_built:
            raise ValueError(
                "The class statistics do not exist yet: train at least one step "
                "(or pass `num_classes`) first."
            )

    @property
    def curvature(self) -> tf.Tensor:
        """The curvatures :math:`\\lambda_k`, shape ``(C,)`` (1 for classes not yet seen)."""
        self._check_state()
        return self._derived(*self._read_state())[1]

    @property
    def class_means(self) -> list[tf.Tensor]:
        """The bias-corrected class gradients :math:`c_k`, per variable ``(C, *shape)``."""
        self._check_state()
        return self._derived(*self._read_state())[0]

    def class_directions(self) -> tf.Tensor:
        """The unit directions :math:`v_k` in the flat layout, shape ``(C, dim)``.

        A method (not a property) because it is the diagnostic callbacks' protocol:
        :class:`~keras_curv.callbacks.SubspaceAlignment` compares these rows with the
        top Hessian eigenvectors.
        """
        self._check_state()
        directions = self._derived(*self._read_state())[2]
        return tf.concat([tf.reshape(d, [self.num_classes, -1]) for d in directions], 1)

    def curvature_summary(self) -> dict[str, tf.Tensor]:
        r"""The curvature state for the diagnostic callbacks (read only).

        Returns:
            ``curvature``: :math:`\lambda_k` per class; ``inverse_curvature``: the
            Newton step sizes :math:`1/\lambda_k` (after damping and cap);
            ``class_updates``: :math:`t_k` per class. Each is a ``(C,)`` vector (a
            histogram and one scalar per class in TensorBoard). ``skipped_steps``:
            :attr:`skipped_steps` (a scalar).
        """
        curvature = self.curvature
        return {
            "curvature": curvature,
            "inverse_curvature": 1.0 / self._effective_curvature(curvature),
            "class_updates": tf.cast(self.class_counts, curvature.dtype),
            "skipped_steps": tf.cast(self._skipped_steps, curvature.dtype),
        }

    @property
    def skipped_steps(self):
        """Number of steps skipped for a non-finite loss or gradient.

        Skipped steps leave the weights and all other state untouched (``iterations``
        does not advance). :class:`keras_curv.callbacks.SkippedSteps` copies this
        count into the training logs.
        """
        if not self.built:
            raise ValueError("The optimizer has no state yet: train at least one step first.")
        return self._skipped_steps

    @property
    def class_counts(self) -> tf.Tensor:
        """How many statistics updates each class received (:math:`t_k`), shape ``(C,)``."""
        self._check_state()
        return tf.convert_to_tensor(self._class_steps)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "gamma": self.gamma,
                "momentum": self.momentum,
                "curvature": self.curvature_mode,
                "inverse": self.inverse,
                "damping": self.damping,
                "max_inverse_curvature": self.max_inverse_curvature,
                "update_each": self.update_each,
                "num_classes": self.num_classes,
            }
        )
        return config
