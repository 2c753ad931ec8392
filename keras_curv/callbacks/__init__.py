"""Diagnostic Keras callbacks: Hessian spectrum and class-subspace alignment during ``fit``."""

from keras_curv.callbacks.hessian_spectrum import HessianSpectrum
from keras_curv.callbacks.optimizer_logs import OptimizerLogs
from keras_curv.callbacks.skipped_steps import SkippedSteps
from keras_curv.callbacks.subspace_alignment import SubspaceAlignment

__all__ = ["HessianSpectrum", "OptimizerLogs", "SkippedSteps", "SubspaceAlignment"]
