"""keras-curv: second-order optimizers and curvature diagnostics for Keras 3."""

__version__ = "0.1.0"

from keras_curv import curvature, optimizers  # noqa: E402
from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton, curvature_step  # noqa: E402

__all__ = [
    "AdaHessian",
    "ClassSubspaceNewton",
    "curvature",
    "curvature_step",
    "optimizers",
    "__version__",
]
