"""SketchySGD's cases of the 2-replica golden check, run in a fresh process.

The model, data, training and report are ``_distributed_case.py``'s (importing it
configures the two logical CPUs before TensorFlow starts); this adds SketchySGD's cases.
Two epochs of 3 global batches with ``update_every=2``: sketches at steps 0, 1, 2 and 4
(57 parameters, rank 3 + 3 oversampled directions).

Usage: ``python tests/optimizers/_sketchy_distributed_case.py CASE [CASE ...]``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _distributed_case as case  # noqa: E402  (first: it configures the devices)

from keras_curv.optimizers import SketchySGD  # noqa: E402


def _sketchy(**kwargs) -> SketchySGD:
    return SketchySGD(rank=3, oversampling=3, update_every=2, power_iterations=4, seed=3, **kwargs)


SKETCHY_CASES = {
    # The automatic step: the gradient and the power products summed over replicas too.
    "sketchy_auto_f64": (lambda: _sketchy(), "float64", False),
    "sketchy_fixed_momentum_weighted_f64": (
        lambda: _sketchy(learning_rate=0.1, momentum=0.5),
        "float64",
        True,
    ),
    "sketchy_hessian_weighted_f64": (lambda: _sketchy(curvature="hessian"), "float64", True),
    # 49 samples: the last global batch has one sample, and the second replica none.
    "sketchy_short_last_batch_f64": (lambda: _sketchy(), "float64", False, 49),
    # Weighted, Keras itself does not match one device there (SGD differs by 1e-2).
    "sketchy_empty_shard_weighted_f64": (lambda: _sketchy(), "float64", True, 49),
}

if __name__ == "__main__":
    case.CASES.update(SKETCHY_CASES)
    case.main(sys.argv[1:] or list(SKETCHY_CASES))
