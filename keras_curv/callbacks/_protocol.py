"""What the diagnostic callbacks read from an optimizer, when it offers it.

An optimizer (unwrapped from a ``LossScaleOptimizer``) may define

* ``curvature_summary() -> dict[str, scalar | vector]``: logged by ``HessianSpectrum``
  under ``optimizer/`` (:func:`optimizer_summary`);
* ``class_directions() -> (C, dim)``: the directions it preconditions, in the flat
  parameter layout, measured by ``SubspaceAlignment`` (:func:`optimizer_directions`).

Both must only *read* the optimizer's state.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from keras_curv._internal.optimizer import model_optimizer


def optimizer_summary(model: keras.Model) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Reads the optimizer's ``curvature_summary()`` into scalar and histogram summaries.

    Scalars become ``optimizer/<name>``; a vector becomes a histogram
    ``optimizer/<name>`` plus one scalar per entry, ``optimizer/<name>_1`` ...
    ``optimizer/<name>_n``.

    Returns:
        ``(scalars, histograms)``, both empty when the optimizer has no such method.

    Raises:
        ValueError: the method returns something other than a mapping of scalars/vectors.
    """
    method = getattr(model_optimizer(model), "curvature_summary", None)
    if not callable(method):
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
            scalars.update({f"{tag}_{i + 1}": float(v) for i, v in enumerate(array)})
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
    method = getattr(model_optimizer(model), "class_directions", None)
    if not callable(method):
        return None
    directions = np.asarray(keras.ops.convert_to_numpy(method()), dtype=np.float64)
    if directions.ndim != 2 or directions.shape[1] != dim:
        raise ValueError(
            "`optimizer.class_directions()` must return a (C, dim) array with "
            f"dim={dim} (the flat parameter layout); got {directions.shape}."
        )
    return directions
