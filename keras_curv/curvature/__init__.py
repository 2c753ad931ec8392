"""The curvature engine: operators, eigensolvers, estimators and class gradients."""

from keras_curv.curvature.class_gradients import class_gradients
from keras_curv.curvature.estimators import (
    DiagonalEstimate,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
)
from keras_curv.curvature.operators import (
    DenseOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
)

__all__ = [
    "class_gradients",
    "DenseOperator",
    "DiagonalEstimate",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "TraceEstimate",
    "hutchinson_diagonal",
    "hutchinson_trace",
]
