"""keras-curv: second-order optimizers and curvature diagnostics for Keras 3."""

__version__ = "0.1.0"

from keras_curv import curvature  # noqa: E402

__all__ = ["curvature", "__version__"]
