"""keras-curv: second-order optimizers and curvature diagnostics for Keras 3."""

__version__ = "0.1.0"

from keras_curv import curvature, optimizers  # noqa: E402
from keras_curv.optimizers import (  # noqa: E402
    KFAC,
    AdaHessian,
    ClassSubspaceNewton,
    CurvatureContextError,
    CurvatureOptimizer,
    TrainBatch,
    attach,
    curvature_step,
)

__all__ = [
    "AdaHessian",
    "ClassSubspaceNewton",
    "CurvatureContextError",
    "CurvatureOptimizer",
    "KFAC",
    "TrainBatch",
    "attach",
    "curvature",
    "curvature_step",
    "optimizers",
    "__version__",
]
