"""The curvature engine: operators, eigensolvers, estimators and class gradients."""

from keras_curv.curvature.operators import (
    DenseOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
)

__all__ = ["DenseOperator", "GGNOperator", "HessianOperator", "LinearOperator"]
