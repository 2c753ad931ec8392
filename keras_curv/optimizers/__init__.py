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
from keras_curv.optimizers.full_batch import FullBatchOptimizer
from keras_curv.optimizers.kfac import KFAC
from keras_curv.optimizers.lbfgs import LBFGS
from keras_curv.optimizers.lookahead import Lookahead
from keras_curv.optimizers.newton_cg import LevenbergMarquardt, NewtonCG, NysNewtonCG
from keras_curv.optimizers.objective import FullBatchObjective
from keras_curv.optimizers.osgm import OSGM
from keras_curv.optimizers.shampoo import Shampoo
from keras_curv.optimizers.sketchy_sgd import SketchySGD
from keras_curv.optimizers.solve import MinimizeHistory, minimize
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
    "FullBatchObjective",
    "FullBatchOptimizer",
    "LBFGS",
    "LayerCall",
    "LayerTap",
    "LevenbergMarquardt",
    "MinimizeHistory",
    "NewtonCG",
    "NysNewtonCG",
    "Shampoo",
    "Sophia",
    "StepStatistics",
    "TrainBatch",
    "attach",
    "curvature_step",
    "minimize",
    "replica_sum",
]
