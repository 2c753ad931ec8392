"""The curvature engine: operators, eigensolvers, estimators and class gradients."""

from keras_curv.curvature.alignment import (
    Assignment,
    best_assignment,
    combined_rank,
    cosine_matrix,
    gradient_fraction,
    principal_angles,
    subspace_overlap,
)
from keras_curv.curvature.class_gradients import ClassGradients, class_gradients
from keras_curv.curvature.eigensolvers import EigenResult, nystrom_factors, top_eigenpairs
from keras_curv.curvature.estimators import (
    DiagonalEstimate,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
)
from keras_curv.curvature.lanczos import LanczosDecomposition, lanczos
from keras_curv.curvature.operators import (
    DenseOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
)
from keras_curv.curvature.spectral_density import SpectralDensity, spectral_density

__all__ = [
    "Assignment",
    "ClassGradients",
    "DenseOperator",
    "DiagonalEstimate",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LanczosDecomposition",
    "LinearOperator",
    "SpectralDensity",
    "TraceEstimate",
    "best_assignment",
    "class_gradients",
    "combined_rank",
    "cosine_matrix",
    "gradient_fraction",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "nystrom_factors",
    "principal_angles",
    "spectral_density",
    "subspace_overlap",
    "top_eigenpairs",
]
