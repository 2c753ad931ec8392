"""Diagnostic Keras callbacks: Hessian spectrum and class-subspace alignment during ``fit``."""

from keras_curv.callbacks.hessian_spectrum import HessianSpectrum
from keras_curv.callbacks.skipped_steps import SkippedSteps
from keras_curv.callbacks.subspace_alignment import SubspaceAlignment

__all__ = ["HessianSpectrum", "SkippedSteps", "SubspaceAlignment"]
