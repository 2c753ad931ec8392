"""Curvature-aware Keras optimizers and the machinery that feeds them the batch."""

from keras_curv.optimizers.adahessian import AdaHessian
from keras_curv.optimizers.class_subspace_newton import ClassSubspaceNewton
from keras_curv.optimizers.integration import (
    CurvatureContextError,
    TrainBatch,
    curvature_step,
)

__all__ = [
    "AdaHessian",
    "ClassSubspaceNewton",
    "CurvatureContextError",
    "TrainBatch",
    "curvature_step",
]
