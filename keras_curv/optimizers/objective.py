"""``FullBatchObjective``: a model's loss over a fixed data set, as a function of its flat weights.

The data are held as device batches (:func:`~keras_curv._internal.data.probe_data`);
losses, gradients, Hessian- and Gauss–Newton-vector products are per-batch sums,
each traced once with ``tf.function``, accumulated exactly over the batches
(:func:`~keras_curv._internal.data.mean_over_batches`, the rule of the curvature
operators). Per batch the work is :class:`~keras_curv.optimizers.TrainBatch`'s own:
``loss_at``, ``loss_and_gradient``, ``hessian_vector_product_at`` and
``gauss_newton_vector_product_at``, here in inference mode by default. Every
evaluation is stateless: the model's variables are read, never written, until
:meth:`FullBatchObjective.assign`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal import flat
from keras_curv._internal.data import mean_over_batches, probe_data
from keras_curv._internal.keras_privates import flatten_layers, has_random_state
from keras_curv._internal.model import recording_paused
from keras_curv._internal.numerics import curvature_dtype
from keras_curv.curvature.operators import LinearOperator
from keras_curv.optimizers.batch import TrainBatch


@dataclass
class _ModelLoss(TrainBatch):
    """A batch whose loss is ``loss(model, x, y)`` (a PINN's residuals), not the compiled one.

    Only :meth:`loss_at` differs: the user's function runs with ``values`` in place of
    the trainable variables (``keras.StatelessScope``), so that it may call the model as
    often as it likes and differentiate with respect to the inputs. The products
    derived from it (:meth:`loss_and_gradient`, :meth:`hessian_vector_product_at`) are
    :class:`TrainBatch`'s.
    """

    model_loss: Callable | None = None

    def loss_at(self, values):
        values = self._cast_values(values)
        with keras.StatelessScope(state_mapping=list(zip(self.variables, values))):
            with recording_paused():
                return self.model_loss(self.model, self.x, self.y)

    def gauss_newton_vector_product_at(self, values, tangents):
        raise ValueError(
            "The Gauss–Newton matrix splits the loss at the model's outputs, which a "
            "`loss(model, x, y)` callable does not expose: return the residuals instead "
            "(residuals=..., the loss is then their sum of squares), use "
            "curvature='hessian', or compile the model with its loss and pass loss=None."
        )


@dataclass
class _Residuals(TrainBatch):
    """A batch whose loss is ``‖r‖²`` for residuals ``r = residuals(model, x, y)``.

    Least squares: the Gauss–Newton matrix is ``2 JᵀJ`` with ``J = ∂r/∂θ`` (positive
    semi-definite), for Levenberg–Marquardt and ``curvature="ggn"``.
    """

    model_residuals: Callable | None = None

    def residuals_at(self, values):
        values = self._cast_values(values)
        with keras.StatelessScope(state_mapping=list(zip(self.variables, values))):
            with recording_paused():
                residuals = self.model_residuals(self.model, self.x, self.y)
        return tf.reshape(tf.convert_to_tensor(residuals), [-1])

    def loss_at(self, values):
        residuals = self.residuals_at(values)
        return tf.reduce_sum(residuals * residuals)

    def gauss_newton_vector_product_at(self, values, tangents):
        values = self._cast_values(values)
        tangents = [tf.cast(t, v.dtype) for t, v in zip(tangents, values)]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(values)
            residuals = self.residuals_at(values)
        # J v = ∂_u ⟨Jᵀu, v⟩ (a double VJP), then 2 Jᵀ (J v).
        dual_point = tf.zeros_like(residuals)
        with tf.GradientTape() as dual:
            dual.watch(dual_point)
            transposed = tape.gradient(residuals, values, output_gradients=dual_point)
            pairing = tf.add_n(
                [tf.zeros([], residuals.dtype)]
                + [tf.reduce_sum(t * v) for t, v in zip(transposed, tangents) if t is not None]
            )
        jv = dual.gradient(pairing, dual_point, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        products = tape.gradient(residuals, values, output_gradients=2.0 * jv)
        del tape
        return flat.zeros_for_none(products, values)


class FullBatchObjective:
    """``f(θ) = (1/N) Σ_b n_b L_b(θ)``: a model's mean loss over a fixed data set.

    Args:
        model: The model (built, or buildable on the first batch).
        x: Inputs (arrays or a nest of them), or a finite ``tf.data.Dataset`` of
            ``(x, y)`` / ``(x, y, sample_weight)``.
        y: Targets, or ``None`` (only with a ``loss`` callable).
        loss: ``None`` for the model's compiled loss (regularization included), or a
            callable ``loss(model, x, y)`` returning the batch-mean loss as a scalar.
        residuals: Instead of ``loss``, a callable ``residuals(model, x, y)`` returning a
            tensor ``r`` (any shape); the batch's loss is ``‖r‖²`` (scale the terms, e.g.
            by ``1/√n``, for means), and the Gauss–Newton matrix ``2 JᵀJ`` is available.
        sample_weight: Per-sample weights (compiled loss only).
        batch_size: Rows per batch (default: all rows in one batch).
        training: Evaluate the model in training mode (BatchNorm batch statistics);
            refused for models that draw random numbers (Dropout, noise layers).

    Raises:
        ValueError: empty data, a model without trainable variables or with several
            variable dtypes, no compiled loss and no ``loss``, a loss that is not a
            callable, or a stochastic model in training mode.
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any = None,
        *,
        loss: Callable | None = None,
        residuals: Callable | None = None,
        sample_weight: Any = None,
        batch_size: int | None = None,
        training: bool = False,
    ):
        if residuals is not None:
            if loss is not None:
                raise ValueError("Pass `loss` or `residuals`, not both.")
            if not callable(residuals):
                raise ValueError(
                    f"`residuals` must be a callable residuals(model, x, y); got {residuals!r}."
                )
        if loss is not None and (isinstance(loss, (str, keras.losses.Loss)) or not callable(loss)):
            raise ValueError(
                "`loss` must be None (the model's compiled loss, regularization included) "
                f"or a callable loss(model, x, y) returning a scalar; got {loss!r}. To use a "
                "Keras loss, compile the model with it."
            )
        self.residuals = residuals
        custom = loss is not None or residuals is not None
        if not custom and getattr(model, "loss", None) is None:
            raise ValueError(
                "The model has no compiled loss: compile it with one "
                "(model.compile(loss=...)) or pass loss=<callable(model, x, y)>."
            )
        if custom and sample_weight is not None:
            raise ValueError("`sample_weight` needs the compiled loss; weight inside `loss`.")
        self.model = model
        self.loss = loss
        self.training = bool(training)
        if isinstance(x, tf.data.Dataset):
            self.data = probe_data(x)
        else:
            rows = _rows(x)
            self.data = probe_data(
                x, y, sample_weight, batch_size or rows, targets_required=not custom
            )
        if not model.built:
            model(self.data.batches[0].x)
        if self.training:
            random = [layer.name for layer in flatten_layers(model) if has_random_state(layer)]
            if random:
                raise ValueError(
                    f"Full-batch minimisation needs a deterministic loss, but layers "
                    f"{random} draw new random numbers at every evaluation in training "
                    "mode. Use training=False (the default: Dropout and noise off)."
                )
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ValueError("The model has no trainable variables: there is nothing to fit.")
        dtypes = {v.dtype for v in self.variables}
        if len(dtypes) != 1:
            raise ValueError(f"All trainable variables must share one dtype; got {sorted(dtypes)}.")
        self.dtype = curvature_dtype(dtypes.pop())
        self.shapes = flat.variable_shapes(self.variables)
        self.dim = flat.flat_dim(self.variables)
        self.num_samples = self.data.num_samples
        self._value = _traced(self._batch_value)
        self._value_and_gradient = _traced(self._batch_value_and_gradient)
        self._hessian = _traced(self._batch_hessian)
        self._gauss_newton = _traced(self._batch_gauss_newton)

    # ---------------------------------------------------------------- per batch

    def _view(self, x: Any, y: Any, weights: Any) -> TrainBatch:
        common = dict(
            model=self.model,
            x=x,
            y=y,
            y_pred=None,
            sample_weight=weights,
            loss=None,
            variables=self.variables,
            training=self.training,
        )
        if self.residuals is not None:
            return _Residuals(**common, model_residuals=self.residuals)
        if self.loss is None:
            return TrainBatch(**common)
        return _ModelLoss(**common, model_loss=self.loss)

    def _values(self, w: tf.Tensor) -> list[tf.Tensor]:
        return flat.unflatten(w, self.shapes)

    def _batch_value(self, w, x, y, weights, size):
        loss = self._view(x, y, weights).loss_at(self._values(w))
        return size * _scalar(loss, self.dtype)

    def _batch_value_and_gradient(self, w, x, y, weights, size):
        values = [tf.convert_to_tensor(v) for v in self._values(w)]
        batch = self._view(x, y, weights)
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = batch.loss_at(values)
        grads = tape.gradient(loss, values)
        if all(g is None for g in grads):
            raise ValueError(
                "The loss does not depend on the model's trainable weights (every gradient "
                "is None): check that `loss` calls the model it is given."
            )
        gradient = flat.flatten(flat.zeros_for_none(grads, values), self.dtype)
        return size * _scalar(loss, self.dtype), size * gradient

    def _batch_hessian(self, w, v, x, y, weights, size):
        batch = self._view(x, y, weights)
        products = batch.hessian_vector_product_at(self._values(w), self._values(v))
        return size * flat.flatten(products, self.dtype)

    def _batch_gauss_newton(self, w, v, x, y, weights, size):
        batch = self._view(x, y, weights)
        products = batch.gauss_newton_vector_product_at(self._values(w), self._values(v))
        return size * flat.flatten(products, self.dtype)

    # ---------------------------------------------------------------- the objective

    def weights(self) -> tf.Tensor:
        """The model's current trainable weights, as one flat vector."""
        return flat.flatten([v.value for v in self.variables], self.dtype)

    def assign(self, w: tf.Tensor) -> None:
        """Writes the flat weights ``w`` into the model's trainable variables."""
        for variable, value in zip(self.variables, self._values(w)):
            variable.assign(tf.cast(value, variable.dtype))

    def value(self, w: tf.Tensor) -> tf.Tensor:
        """``f(w)``."""
        return mean_over_batches(self.data, self._value, w, dtype=self.dtype)

    def value_and_gradient(self, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(f(w), ∇f(w))``."""
        return mean_over_batches(self.data, self._value_and_gradient, w, dtype=self.dtype)

    def hessian_vector_product(self, w: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """``∇²f(w) v``."""
        return mean_over_batches(self.data, self._hessian, w, v, dtype=self.dtype)

    def gauss_newton_vector_product(self, w: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """``G(w) v`` (the compiled loss, or ``residuals``)."""
        return mean_over_batches(self.data, self._gauss_newton, w, v, dtype=self.dtype)

    def operator(self, curvature: str = "hessian", w: Any = None) -> LinearOperator:
        """The Hessian (or GGN) at ``w`` (default: the current weights) as a linear operator.

        For :func:`~keras_curv.curvature.spectral_density` and the eigensolvers, e.g. of
        a PINN loss, which :class:`~keras_curv.curvature.HessianOperator` (a loss of
        ``y`` and ``y_pred``) cannot express.
        """
        point = self.weights() if w is None else tf.cast(w, self.dtype)
        product = (
            self.hessian_vector_product
            if curvature == "hessian"
            else self.gauss_newton_vector_product
        )
        return _ObjectiveOperator(self.dim, self.dtype, lambda v: product(point, v))


class _ObjectiveOperator(LinearOperator):
    def __init__(self, dim: int, dtype: tf.DType, product: Callable[[tf.Tensor], tf.Tensor]):
        super().__init__(dim, dtype)
        self._product = product

    def _matvec(self, v):
        return self._product(v)


def _traced(method: Callable) -> Callable:
    """``method`` traced once per batch shape (a last, shorter batch is a second trace)."""
    return tf.function(method, reduce_retracing=True)


def _scalar(loss: Any, dtype: tf.DType) -> tf.Tensor:
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        raise ValueError(
            f"The loss must be a scalar (the mean over the batch); got shape {tuple(loss.shape)}."
        )
    return tf.cast(loss, dtype)


def _rows(x: Any) -> int:
    leaves = tf.nest.flatten(x)
    if not leaves or any(np.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError("`x` is empty or has no batch axis: pass at least one sample.")
    rows = int(np.shape(leaves[0])[0])
    if rows == 0:
        raise ValueError("`x` is empty: pass at least one sample.")
    return rows
