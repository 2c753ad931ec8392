"""Curvature-aware Keras optimizers, and the contract that gives them the batch."""

from keras_curv.optimizers.adahessian import AdaHessian
from keras_curv.optimizers.base import CurvatureOptimizer, StepStatistics
from keras_curv.optimizers.batch import LayerCall, LayerTap, TrainBatch
from keras_curv.optimizers.class_subspace_newton import ClassSubspaceNewton
from keras_curv.optimizers.contract import (
    CurvatureContextError,
    attach,
    curvature_step,
)
from keras_curv.optimizers.distribute import replica_sum
from keras_curv.optimizers.kfac import KFAC
from keras_curv.optimizers.lookahead import Lookahead
from keras_curv.optimizers.osgm import OSGM
from keras_curv.optimizers.shampoo import Shampoo
from keras_curv.optimizers.sketchy_sgd import SketchySGD
from keras_curv.optimizers.sophia import Sophia

__all__ = [
    "AdaHessian",
    "ClassSubspaceNewton",
    "CurvatureContextError",
    "CurvatureOptimizer",
    "KFAC",
    "LayerCall",
    "LayerTap",
    "Lookahead",
    "OSGM",
    "SketchySGD",
    "Shampoo",
    "Sophia",
    "StepStatistics",
    "TrainBatch",
    "attach",
    "curvature_step",
    "replica_sum",
]
