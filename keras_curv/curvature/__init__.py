"""The curvature engine: operators, eigensolvers, estimators and class gradients."""

from keras_curv.curvature.eigensolvers import EigenResult, top_eigenpairs
from keras_curv.curvature.lanczos import LanczosDecomposition, lanczos
from keras_curv.curvature.operators import (
    DenseOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
)
from keras_curv.curvature.spectral_density import SpectralDensity, spectral_density

__all__ = [
    "DenseOperator",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LanczosDecomposition",
    "LinearOperator",
    "SpectralDensity",
    "lanczos",
    "spectral_density",
    "top_eigenpairs",
]
