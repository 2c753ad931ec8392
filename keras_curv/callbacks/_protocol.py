"""The optimizer protocol: what the diagnostic callbacks read from an optimizer.

An optimizer (unwrapped from a ``LossScaleOptimizer``) may define any of these methods;
each must only *read* its state (no variable, random stream or counter may change), and
everything "flat" is in the flat parameter layout of :mod:`keras_curv._internal.flat`
(each of ``model.trainable_variables`` flattened row-major, concatenated in order):

* ``curvature_summary() -> dict[str, scalar | vector]``: logged by ``HessianSpectrum``
  under ``optimizer/`` (:func:`optimizer_summary`);
* ``class_directions() -> (C, dim)``: the directions it preconditions, measured by
  ``SubspaceAlignment`` (:func:`optimizer_directions`);
* ``preconditioner() -> LinearOperator | None``: its current preconditioner :math:`P`,
  symmetric positive definite, such that its update on a quadratic (with :math:`P`
  frozen) is :math:`\\theta \\leftarrow \\theta - \\eta P^{-1} u`, :math:`\\eta` its
  learning rate and :math:`u` the gradient or its momentum average; ``P.power(-0.5)``
  must work (build it from the structured operators of
  :mod:`keras_curv.curvature.structured`); ``None`` while it has none (before its first
  step). ``HessianSpectrum`` logs :math:`\\lambda_1(P^{-1}H)` from it
  (:func:`optimizer_preconditioning`);
* ``stability_threshold() -> float``: the value of :math:`\\lambda_1(P^{-1}H)` above which
  that update diverges on a quadratic
  (:func:`~keras_curv.curvature.stability_threshold`); optional;
* ``curvature_model() -> LinearOperator | None``: its current estimate of the curvature
  of the training loss (Hessian or Gauss–Newton), symmetric, without damping,
  :math:`\\epsilon` or learning rate; ``HessianSpectrum`` compares it with the Hessian
  (:func:`optimizer_curvature_model`).

Keras's SGD, Adam(W) and RMSprop get ``preconditioner`` and ``stability_threshold``
from :mod:`~keras_curv.callbacks._keras_adapters`. ``docs/callbacks.md`` ("The
optimizer protocol") is the long form.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from keras_curv._internal.optimizer import model_optimizer
from keras_curv.callbacks._keras_adapters import keras_preconditioning
from keras_curv.curvature.operators import LinearOperator
from keras_curv.curvature.structured import IdentityOperator

# A vector summary of at most this many entries is also logged entry by entry.
MAX_ENTRY_SCALARS = 16

# (optimizer class, method name) pairs already warned about.
_WARNED_SIGNATURES: set[tuple[type, str]] = set()


def protocol_method(optimizer: Any, name: str) -> Callable[[], Any] | None:
    """``optimizer.<name>`` if it is a protocol method (callable with no argument), or ``None``.

    An optimizer may have a method of the same name for another purpose (a solver's
    ``preconditioner(problem, w, state)``); it is ignored, with one ``RuntimeWarning`` per
    optimizer class, rather than called wrongly in the middle of ``fit``.
    """
    method = getattr(optimizer, name, None)
    if not callable(method):
        return None
    try:
        inspect.signature(method).bind()
    except TypeError:
        key = (type(optimizer), name)
        if key not in _WARNED_SIGNATURES:
            _WARNED_SIGNATURES.add(key)
            warnings.warn(
                f"{type(optimizer).__name__}.{name} takes arguments, so it is not the "
                f"keras-curv optimizer protocol's `{name}()` and the diagnostic callbacks "
                "ignore it; rename it (e.g. with a leading underscore) or make it take none "
                "(docs/callbacks.md, 'The optimizer protocol').",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    except ValueError:  # no signature to inspect (a builtin): trust it
        pass
    return method


def optimizer_summary(model: keras.Model) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Reads the optimizer's ``curvature_summary()`` into scalar and histogram summaries.

    Scalars become ``optimizer/<name>``. A vector becomes a histogram ``optimizer/<name>``
    and, when it has at most ``MAX_ENTRY_SCALARS`` (16) entries (per-class values), one
    scalar per entry, ``optimizer/<name>_1`` ... (one multi-line chart in the
    custom-scalars layout); a longer one (per-variable values) is summarised by the
    scalars ``optimizer/<name>_min``, ``_mean`` and ``_max``, to keep the tags few.

    Returns:
        ``(scalars, histograms)``, both empty when the optimizer has no such method.

    Raises:
        ValueError: the method returns something other than a mapping of scalars/vectors.
    """
    method = protocol_method(model_optimizer(model), "curvature_summary")
    if method is None:
        return {}, {}
    summary = method()
    if not isinstance(summary, Mapping):
        raise ValueError(
            "`optimizer.curvature_summary()` must return a dict name -> scalar or vector; "
            f"got {type(summary).__name__}."
        )
    scalars, histograms = {}, {}
    for name, value in summary.items():
        array = np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)
        tag = f"optimizer/{name}"
        if array.ndim == 0:
            scalars[tag] = float(array)
        elif array.ndim == 1:
            histograms[tag] = array
            if array.size <= MAX_ENTRY_SCALARS:
                scalars.update({f"{tag}_{i + 1}": float(v) for i, v in enumerate(array)})
            elif array.size:
                for reduce in ("min", "mean", "max"):
                    scalars[f"{tag}_{reduce}"] = float(getattr(np, reduce)(array))
        else:
            raise ValueError(
                f"`optimizer.curvature_summary()[{name!r}]` has shape {array.shape}; only "
                "scalars and vectors are supported."
            )
    return scalars, histograms


def optimizer_directions(model: keras.Model, dim: int) -> np.ndarray | None:
    """The optimizer's ``class_directions()`` as a float64 ``(C, dim)`` array, or ``None``.

    Raises:
        ValueError: the method returns something that is not ``(C, dim)``.
    """
    method = protocol_method(model_optimizer(model), "class_directions")
    if method is None:
        return None
    directions = np.asarray(keras.ops.convert_to_numpy(method()), dtype=np.float64)
    if directions.ndim != 2 or directions.shape[1] != dim:
        raise ValueError(
            "`optimizer.class_directions()` must return a (C, dim) array with "
            f"dim={dim} (the flat parameter layout); got {directions.shape}."
        )
    return directions


@dataclass(frozen=True)
class Preconditioning:
    """An optimizer's current preconditioner and its edge-of-stability threshold.

    Attributes:
        operator: :math:`P`.
        threshold: The threshold on :math:`\\lambda_1(P^{-1}H)`, or ``None``.
        identity: Whether :math:`P = I` (plain or momentum SGD): the preconditioned
            sharpness is then the sharpness.
    """

    operator: LinearOperator
    threshold: float | None
    identity: bool


def _checked_operator(value: object, method: str, dim: int) -> LinearOperator | None:
    if value is None:
        return None
    if not isinstance(value, LinearOperator) or value.dim != dim:
        found = getattr(value, "dim", type(value).__name__)
        raise ValueError(
            f"`optimizer.{method}()` must return a keras_curv.curvature.LinearOperator of "
            f"dim={dim} (the flat parameter layout) or None; got {found}."
        )
    return value


def optimizer_preconditioning(model: keras.Model, dim: int) -> Preconditioning | None:
    """The optimizer's ``preconditioner()`` (or a Keras adapter's), or ``None``.

    Raises:
        ValueError: ``preconditioner()`` returns something other than a ``dim``-dimensional
            operator or ``None``, or ``stability_threshold()`` something other than a
            positive number.
    """
    optimizer = model_optimizer(model)
    method = protocol_method(optimizer, "preconditioner")
    if method is not None:
        operator = _checked_operator(method(), "preconditioner", dim)
        if operator is None:
            return None
        threshold = protocol_method(optimizer, "stability_threshold")
        threshold = None if threshold is None else float(threshold())
        if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
            raise ValueError(
                f"`optimizer.stability_threshold()` must be a positive number; got {threshold}."
            )
    else:
        found = keras_preconditioning(optimizer, list(model.trainable_variables))
        if found is None:
            return None
        operator, threshold = found
    identity = isinstance(operator, IdentityOperator) and operator.scale == 1.0
    return Preconditioning(operator, threshold, identity)


def optimizer_curvature_model(model: keras.Model, dim: int) -> LinearOperator | None:
    """The optimizer's ``curvature_model()``, or ``None`` (no such method, or no model yet).

    Raises:
        ValueError: it returns something other than a ``dim``-dimensional operator or ``None``.
    """
    method = protocol_method(model_optimizer(model), "curvature_model")
    if method is None:
        return None
    return _checked_operator(method(), "curvature_model", dim)
