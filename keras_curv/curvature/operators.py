"""Curvature operators: symmetric matrices over the flat parameter space, seen through matvecs.

Every operator acts on *flat vectors*: the trainable variables of the model, each
flattened row-major and concatenated in order (see :mod:`keras_curv._internal.flat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal import flat as _flat
from keras_curv._internal.data import ProbeBatch, mean_over_batches, probe_data
from keras_curv._internal.losses import as_keras_loss
from keras_curv._internal.model import stateless_outputs


class LinearOperator:
    """A square ``dim x dim`` matrix known through matrix-vector products.

    Subclasses implement :meth:`_matvec` (and may override :meth:`_matmat` with a
    batched version). The public methods validate shapes, cast to the operator's
    dtype and count products, so that every solver reports its cost in matvecs.

    Operators combine like matrices: ``A @ B``, ``A + B``, ``A - B``, ``2.0 * A`` give
    operators (:mod:`keras_curv.curvature.algebra`), ``A @ v`` a product,
    :meth:`to_scipy` a ``scipy.sparse.linalg.LinearOperator``, :meth:`restrict` a
    principal block and, for structured operators, :meth:`power` ``A^p``.

    Attributes:
        dim: Size of the (square) operator.
        dtype: The floating dtype products are computed in.
        symmetric: Whether the matrix is symmetric (every operator but a product of
            factors that do not read the same backwards, like ``A @ B``). The
            eigensolvers need a symmetric operator.
    """

    symmetric = True

    def __init__(self, dim: int, dtype: tf.DType):
        if dim <= 0:
            raise ValueError(f"An operator needs a positive dimension; got {dim}.")
        self.dim = int(dim)
        self.dtype = tf.as_dtype(dtype)
        self._num_matvecs = 0

    @property
    def num_matvecs(self) -> int:
        """Matrix-vector products computed so far (a block of k counts k)."""
        return self._num_matvecs

    def reset_counter(self) -> None:
        """Sets :attr:`num_matvecs` back to zero."""
        self._num_matvecs = 0

    def matvec(self, v: Any) -> tf.Tensor:
        """Returns ``A v`` for a flat vector ``v`` of shape ``(dim,)``."""
        v = tf.convert_to_tensor(v)
        if v.shape.rank != 1 or v.shape[0] != self.dim:
            raise ValueError(
                f"matvec expects a vector of shape ({self.dim},); got {tuple(v.shape)}."
            )
        self._num_matvecs += 1
        return self._matvec(tf.cast(v, self.dtype))

    def matmat(self, block: Any) -> tf.Tensor:
        """Returns ``A V`` for a block ``V`` of shape ``(dim, k)``."""
        block = tf.convert_to_tensor(block)
        if block.shape.rank != 2 or block.shape[0] != self.dim:
            raise ValueError(
                f"matmat expects a block of shape ({self.dim}, k); got {tuple(block.shape)}."
            )
        self._num_matvecs += int(block.shape[1])
        return self._matmat(tf.cast(block, self.dtype))

    def to_dense(self) -> np.ndarray:
        """The full matrix, column by column (``dim`` matvecs; for small operators)."""
        return self.matmat(tf.eye(self.dim, dtype=self.dtype)).numpy()

    # The algebra (curvlinops style): ``A @ B``, ``A + B``, ``A - B``, ``c * A``, ``A @ v``.
    # The composite operators live in :mod:`keras_curv.curvature.algebra`.

    def __matmul__(self, other: Any) -> Any:
        """``A @ B`` (an operator) for an operator ``B``; ``A v`` / ``A V`` for a vector / block."""
        from keras_curv.curvature import algebra

        if isinstance(other, LinearOperator):
            return algebra.ProductOperator(self, other)
        other = tf.convert_to_tensor(other)
        return self.matvec(other) if other.shape.rank == 1 else self.matmat(other)

    def __add__(self, other: Any) -> LinearOperator:
        from keras_curv.curvature import algebra

        return algebra.SumOperator(self, algebra.as_operator(other, "+"))

    def __sub__(self, other: Any) -> LinearOperator:
        from keras_curv.curvature import algebra

        negated = algebra.ScaledOperator(algebra.as_operator(other, "-"), -1.0)
        return algebra.SumOperator(self, negated)

    def __mul__(self, scale: Any) -> LinearOperator:
        from keras_curv.curvature import algebra

        return algebra.ScaledOperator(self, scale)

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return self * -1.0

    def power(self, p: float) -> LinearOperator:
        """``A^p`` for a symmetric positive (semi-)definite ``A``, where it has a closed form.

        Structured operators (:class:`~keras_curv.curvature.DiagonalOperator`,
        :class:`~keras_curv.curvature.KroneckerOperator`,
        :class:`~keras_curv.curvature.LowRankPlusDiagonal`,
        :class:`~keras_curv.curvature.BlockDiagonalOperator`) implement it; a general
        operator (a Hessian) does not.

        Raises:
            NotImplementedError: this operator has no closed-form power.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form power; only diagonal, Kronecker, "
            "low-rank-plus-identity and block-diagonal operators do."
        )

    def restrict(self, ranges: Any) -> LinearOperator:
        """The principal sub-operator ``E^T A E`` on the flat index ranges ``[(start, stop)...]``.

        ``E`` selects the indices of the ranges (in the order given); products zero-pad
        the vector to ``dim`` and slice the result, so no sub-matrix is formed. For the
        Hessian of a subset of variables, ``HessianOperator(..., variables=...)`` is
        cheaper (it differentiates only those).
        """
        from keras_curv.curvature import algebra

        return algebra.RestrictedOperator(self, ranges)

    def to_scipy(self):
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (float64, NumPy in/out)."""
        import scipy.sparse.linalg

        def matvec(v):
            return tf.cast(self.matvec(np.asarray(v).reshape(-1)), tf.float64).numpy()

        def matmat(block):
            return tf.cast(self.matmat(np.asarray(block)), tf.float64).numpy()

        # The adjoint of a symmetric operator is itself; a product like ``A @ B`` has none here.
        adjoint = {"rmatvec": matvec, "rmatmat": matmat} if self.symmetric else {}
        return scipy.sparse.linalg.LinearOperator(
            (self.dim, self.dim), matvec=matvec, matmat=matmat, dtype=np.float64, **adjoint
        )

    def _matvec(self, v: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def _matmat(self, block: tf.Tensor) -> tf.Tensor:
        columns = [self._matvec(block[:, i]) for i in range(int(block.shape[1]))]
        return tf.stack(columns, axis=1)


class DenseOperator(LinearOperator):
    """A symmetric matrix held in memory: the oracle for tests and small problems.

    Args:
        matrix: A square symmetric array.

    Example:
        >>> op = DenseOperator(np.diag([3.0, 2.0, 1.0]))
        >>> op.matvec(np.ones(3)).numpy()
        array([3., 2., 1.])
    """

    def __init__(self, matrix: Any):
        matrix = tf.convert_to_tensor(matrix)
        if matrix.shape.rank != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"DenseOperator needs a square matrix; got shape {tuple(matrix.shape)}."
            )
        if not matrix.dtype.is_floating:
            matrix = tf.cast(matrix, tf.float64)
        super().__init__(int(matrix.shape[0]), matrix.dtype)
        self.matrix = matrix

    def _matvec(self, v):
        return tf.linalg.matvec(self.matrix, v)

    def _matmat(self, block):
        return tf.matmul(self.matrix, block)


def resolve_loss(loss: Any, dtype: Any = None):
    """Turns ``loss`` into ``f(y_true, y_pred, sample_weight) -> summed batch loss``.

    Accepted forms: a Keras loss name (``"sparse_categorical_crossentropy"``), a
    ``keras.losses.Loss`` instance (its reduction is replaced by ``"sum"``), or a
    callable ``fn(y_true, y_pred)`` returning the *mean* loss over the batch as a scalar.

    Raises:
        ValueError: ``loss`` is none of these.
    """
    keras_loss = as_keras_loss(loss)
    if keras_loss is not None:
        # Sum, then divide by N ourselves; compute in the operator's dtype so that a
        # float64 model gets a float64 Hessian (Loss objects default to floatx).
        config = dict(keras_loss.get_config(), reduction="sum")
        if dtype is not None:
            config["dtype"] = tf.as_dtype(dtype).name
        try:
            summed = keras_loss.__class__.from_config(config)
        except Exception:  # noqa: BLE001 - custom losses may not round-trip their config
            summed = None
        if summed is not None:
            return lambda y, out, w, n: summed(y, out, sample_weight=w)
        return lambda y, out, w, n: (
            tf.cast(_checked_scalar(keras_loss(y, out, sample_weight=w)), n.dtype) * n
        )
    if callable(loss):

        def call(y, out, w, n):
            if w is not None:
                raise ValueError(
                    "Sample weights need a keras.losses.Loss (or a loss name); a plain "
                    "callable cannot take them."
                )
            return tf.cast(_checked_scalar(loss(y, out)), n.dtype) * n

        return call
    raise ValueError(
        f"`loss` must be a Keras loss name, a keras.losses.Loss, or a callable; got {loss!r}."
    )


def _checked_scalar(value):
    value = tf.convert_to_tensor(value)
    if value.shape.rank != 0:
        raise ValueError(
            f"The loss must return a scalar (the mean over the batch); it returned shape "
            f"{tuple(value.shape)}. Reduce it, e.g. with keras.ops.mean, or pass a "
            "keras.losses.Loss."
        )
    return value


class _ModelOperator(LinearOperator):
    """Shared machinery of operators defined by a model, a loss and probe data."""

    def __init__(
        self,
        model: keras.Model,
        loss: Any,
        x: Any,
        y: Any = None,
        *,
        sample_weight: Any = None,
        training: bool = False,
        batch_size: int | None = None,
        variables: Sequence | None = None,
    ):
        self.data = probe_data(x, y, sample_weight, batch_size)
        first = self.data.batches[0]
        if not model.built:
            model(first.x)
        self.model = model
        self.training = bool(training)
        self._all_variables = list(model.trainable_variables)
        if not self._all_variables:
            raise ValueError(
                "The model has no trainable variables: there is no curvature to measure."
            )
        self._positions = _flat.variable_positions(self._all_variables, variables)
        self.variables = [self._all_variables[i] for i in self._positions]
        dtypes = {v.dtype for v in self.variables}
        if len(dtypes) != 1:
            raise ValueError(f"All trainable variables must share one dtype; got {sorted(dtypes)}.")
        super().__init__(_flat.flat_dim(self.variables), tf.as_dtype(dtypes.pop()))
        self.shapes = _flat.variable_shapes(self.variables)
        self._loss_sum = resolve_loss(loss, self.dtype)
        self._num_samples = float(self.data.num_samples)
        # Fail early, on the first batch, rather than inside the first matvec.
        out = self._forward(self._values(), first)
        if isinstance(out, (list, tuple, dict)):
            raise ValueError(
                "Curvature operators need a single-output model; this one has several."
            )
        size = tf.constant(first.size, self.dtype)
        _checked_scalar(self._loss_sum(first.y, out, first.sample_weight, size))
        self._batch_fn = tf.function(self._flat_batch_product, reduce_retracing=True)
        self._gradient_fn = tf.function(self._flat_batch_gradient, reduce_retracing=True)

    def _values(self) -> list[tf.Tensor]:
        return [v.value for v in self.variables]

    def _forward(self, trainable_values, batch: ProbeBatch):
        """Model outputs as a pure function of the (block's) trainable values (no state updates).

        Variables outside the block enter at their current values, as constants.
        """
        if len(self._positions) != len(self._all_variables):
            values = [v.value for v in self._all_variables]
            for position, value in zip(self._positions, trainable_values):
                values[position] = value
            trainable_values = values
        return stateless_outputs(self.model, trainable_values, batch.x, self.training)

    def _batch_loss(self, trainable_values, batch: ProbeBatch, outputs):
        return self._loss_sum(batch.y, outputs, batch.sample_weight, batch.size)

    def _batch_gradient(self, params, batch: ProbeBatch) -> list[tf.Tensor]:
        """Gradient of the summed batch loss, dense (Embedding gradients are IndexedSlices)."""
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = self._batch_loss(params, batch, self._forward(params, batch))
        return _flat.zeros_for_none(tape.gradient(loss, params), params)

    def _batch_product(self, tangents, x, y, w, n):
        raise NotImplementedError

    def _flat_batch_product(self, v, x, y, w, n):
        # Layout changes live inside the traced function: no eager work per product.
        return _flat.flatten(self._batch_product(_flat.unflatten(v, self.shapes), x, y, w, n))

    def _flat_batch_gradient(self, x, y, w, n):
        return _flat.flatten(self._batch_gradient(self._values(), ProbeBatch(x, y, w, n)))

    def _mean_over_batches(self, batch_fn, *leading) -> tf.Tensor:
        """``(1/N) sum_b batch_fn(*leading, x_b, y_b, w_b, n_b)``: exact over the probe set."""
        return mean_over_batches(self.data, batch_fn, *leading, dtype=self.dtype)

    def gradient(self) -> tf.Tensor:
        """The flat gradient of the mean probe loss, at the current weights.

        Uses the same loss, probe batches and stateless forward pass as the products,
        traced once.
        """
        return self._mean_over_batches(self._gradient_fn)

    def _matvec(self, v):
        return self._mean_over_batches(self._batch_fn, v)

    @property
    def tracing_count(self) -> int:
        """How often the per-batch product was traced (stays small: no retracing per matvec)."""
        return self._batch_fn.experimental_get_tracing_count()


class HessianOperator(_ModelOperator):
    r"""The exact Hessian of the mean loss over the probe data.

    .. math::
        H = \nabla^2_\theta \frac{1}{N} \sum_{\mu=1}^{N} w^\mu \ell(y^\mu, f_\theta(x^\mu))

    Products are computed reverse-over-reverse (the gradient of :math:`g^\top v`),
    one probe batch at a time, and summed exactly, so the operator is that of the whole probe
    set. The per-batch product is traced once with ``tf.function``.

    Args:
        model: A built (or buildable on ``x``) single-output Keras model.
        loss: A Keras loss name, a ``keras.losses.Loss``, or ``fn(y_true, y_pred)``
            returning the batch-mean loss.
        x: Probe inputs, or a finite ``tf.data.Dataset`` of ``(x, y[, w])``.
        y: Probe targets (``None`` for a dataset).
        sample_weight: Optional per-sample weights ``w``.
        training: Evaluate BatchNorm/Dropout in training mode. The forward pass is
            stateless either way: no moving statistics or random streams are touched.
        batch_size: Rows per probe batch for array data.
        variables: A subset of ``model.trainable_variables`` (a *block*, e.g. one layer's
            ``layer.trainable_variables``): the operator is then the block's
            :math:`H_{BB} = \nabla^2_{\theta_B}`, over the flat layout of those variables
            (in the model's order), with the other weights held at their current values.
            ``None``: all of them.

    Example:
        >>> op = HessianOperator(model, "sparse_categorical_crossentropy", x, y)
        >>> hv = op.matvec(tf.ones(op.dim))
        >>> first = HessianOperator(model, loss, x, y, variables=model.layers[0].weights)
    """

    def _batch_product(self, tangents, x, y, w, n):
        batch = ProbeBatch(x, y, w, n)
        params = self._values()
        with tf.GradientTape() as outer:
            outer.watch(params)
            grads = self._batch_gradient(params, batch)
        products = outer.gradient(grads, params, output_gradients=list(tangents))
        return _flat.zeros_for_none(products, params)


class GGNOperator(_ModelOperator):
    r"""The generalised Gauss–Newton matrix of the mean loss over the probe data.

    .. math::
        G = \frac{1}{N} \sum_{\mu} J_\mu^\top \, \nabla^2_{f} \ell^\mu \, J_\mu,
        \qquad J_\mu = \partial f_\theta(x^\mu) / \partial \theta

    Positive semi-definite whenever the loss is convex in the model outputs (cross
    entropy, squared error). ``J`` is never formed: ``J v`` is a forward-mode JVP,
    the output Hessian acts on it by a small reverse-over-reverse product, and
    ``J^T`` is a VJP. The split point is the model output: for a model ending in a
    softmax that is the probabilities.

    Takes the same arguments as :class:`HessianOperator`.
    """

    def _batch_product(self, tangents, x, y, w, n):
        batch = ProbeBatch(x, y, w, n)
        params = self._values()
        with tf.GradientTape() as vjp_tape:
            vjp_tape.watch(params)
            with tf.autodiff.ForwardAccumulator(params, tangents) as accumulator:
                outputs = self._forward(params, batch)
            jv = accumulator.jvp(outputs)
        fixed = tf.stop_gradient(outputs)
        with tf.GradientTape() as outer:
            outer.watch(fixed)
            with tf.GradientTape() as inner:
                inner.watch(fixed)
                loss = self._batch_loss(params, batch, fixed)
            grad_out = inner.gradient(loss, fixed)
        h_jv = outer.gradient(grad_out, fixed, output_gradients=jv)
        return _flat.zeros_for_none(
            vjp_tape.gradient(outputs, params, output_gradients=h_jv), params
        )
