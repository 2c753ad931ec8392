"""The curvature engine: operators, eigensolvers, estimators and class gradients."""

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
    "DenseOperator",
    "DiagonalEstimate",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "TraceEstimate",
    "hutchinson_diagonal",
    "hutchinson_trace",
]
