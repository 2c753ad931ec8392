"""Curvature-aware Keras optimizers and the machinery that feeds them the batch."""

from keras_curv.optimizers.integration import (
    CurvatureContextError,
    TrainBatch,
    curvature_step,
)

__all__ = ["CurvatureContextError", "TrainBatch", "curvature_step"]
