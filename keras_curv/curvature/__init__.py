"""The curvature engine: operators, eigensolvers, estimators and class gradients."""

from keras_curv.curvature.algebra import (
    ProductOperator,
    RestrictedOperator,
    ScaledOperator,
    SumOperator,
)
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
from keras_curv.curvature.stability import stability_threshold
from keras_curv.curvature.structured import (
    BlockDiagonalOperator,
    DiagonalOperator,
    IdentityOperator,
    KroneckerOperator,
    LowRankPlusDiagonal,
    PermutedOperator,
)

__all__ = [
    "Assignment",
    "BlockDiagonalOperator",
    "ClassGradients",
    "DenseOperator",
    "DiagonalOperator",
    "DiagonalEstimate",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KroneckerOperator",
    "LanczosDecomposition",
    "LinearOperator",
    "LowRankPlusDiagonal",
    "PermutedOperator",
    "ProductOperator",
    "RestrictedOperator",
    "ScaledOperator",
    "SpectralDensity",
    "SumOperator",
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
    "stability_threshold",
    "subspace_overlap",
    "top_eigenpairs",
]
