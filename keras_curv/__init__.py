"""keras-curv: second-order optimizers and curvature diagnostics for Keras 3."""

__version__ = "0.1.0"

from keras_curv._internal import versions as _versions  # noqa: E402

_versions.check_versions()  # before the imports below, whose errors an old Keras would obscure

from keras_curv import curvature, optimizers  # noqa: E402
from keras_curv.optimizers import (  # noqa: E402
    KFAC,
    LBFGS,
    OSGM,
    AdaHessian,
    ClassSubspaceNewton,
    CurvatureContextError,
    CurvatureOptimizer,
    LevenbergMarquardt,
    Lookahead,
    MinimizeHistory,
    NewtonCG,
    NysNewtonCG,
    Shampoo,
    SketchySGD,
    Sophia,
    TrainBatch,
    attach,
    curvature_step,
    minimize,
)

__all__ = [
    "AdaHessian",
    "ClassSubspaceNewton",
    "CurvatureContextError",
    "CurvatureOptimizer",
    "KFAC",
    "Lookahead",
    "OSGM",
    "SketchySGD",
    "LBFGS",
    "LevenbergMarquardt",
    "MinimizeHistory",
    "NewtonCG",
    "NysNewtonCG",
    "Shampoo",
    "Sophia",
    "TrainBatch",
    "attach",
    "curvature",
    "curvature_step",
    "minimize",
    "optimizers",
    "__version__",
]
