"""The optimizer a model trains with, seen through Keras's ``LossScaleOptimizer`` wrapper."""

from __future__ import annotations

from typing import Any


def unwrap(optimizer: Any) -> Any:
    """``optimizer`` without a ``LossScaleOptimizer`` wrapper (its ``inner_optimizer``).

    Mixed precision wraps the compiled optimizer; the keras-curv optimizers and their
    protocol (``skipped_steps``, ``curvature_summary()``, ``class_directions()``) live
    on the inner one. Anything else, ``None`` included, is returned as it is.
    """
    return getattr(optimizer, "inner_optimizer", optimizer)


def model_optimizer(model: Any) -> Any:
    """The optimizer ``model`` is compiled with, unwrapped (``None`` if not compiled)."""
    return unwrap(getattr(model, "optimizer", None))
