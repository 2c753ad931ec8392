"""The optimizer a model trains with, seen through its wrappers (loss scaling, Lookahead)."""

from __future__ import annotations

from typing import Any


def wrapper_chain(optimizer: Any) -> list:
    """``optimizer`` and the optimizers it wraps, outermost first.

    A wrapper is any optimizer with an ``inner_optimizer``: Keras's
    ``LossScaleOptimizer`` (mixed precision) and ``keras_curv.Lookahead``, nested in any
    order (``LossScaleOptimizer(Lookahead(AdaHessian()))``). ``None`` gives ``[None]``.
    """
    chain = [optimizer]
    while getattr(chain[-1], "inner_optimizer", None) is not None:
        chain.append(chain[-1].inner_optimizer)
    return chain


def unwrap(optimizer: Any) -> Any:
    """``optimizer`` without its wrappers: the innermost ``inner_optimizer``.

    Mixed precision wraps the compiled optimizer, and ``Lookahead`` wraps the one it is
    given; the keras-curv optimizers and their protocol (``skipped_steps``,
    ``curvature_summary()``, ``class_directions()``) live on the innermost one.
    Anything else, ``None`` included, is returned as it is.
    """
    return wrapper_chain(optimizer)[-1]


def model_optimizer(model: Any) -> Any:
    """The optimizer ``model`` is compiled with, unwrapped (``None`` if not compiled)."""
    return unwrap(getattr(model, "optimizer", None))
