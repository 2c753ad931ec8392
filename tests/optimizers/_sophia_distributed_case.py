"""Sophia's cases of the 2-replica golden check, run in a fresh process.

The model, data, training and report are ``_distributed_case.py``'s (importing it
configures the two logical CPUs before TensorFlow starts); this adds Sophia's cases.
Two epochs of 3 global batches with ``update_every=2``: estimates at steps 2 and 4.

Usage: ``python tests/optimizers/_sophia_distributed_case.py CASE [CASE ...]``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _distributed_case as case  # noqa: E402  (first: it configures the devices)
import keras  # noqa: E402

from keras_curv.optimizers import Sophia  # noqa: E402

GNB = "gauss_newton_bartlett"


def _sophia(estimator: str = "hutchinson", seed: int = 3) -> Sophia:
    # beta_2 0.5 and rho 1: after the first estimate about half (Sophia-H) and most
    # (Sophia-G) of the coordinates take unclipped steps, so the estimates matter.
    return Sophia(0.1, beta_2=0.5, rho=1.0, update_every=2, estimator=estimator, seed=seed)


SOPHIA_CASES = {
    "sophia_h_f64": (lambda: _sophia(), "float64", False),
    "sophia_g_weighted_f64": (
        lambda: _sophia(GNB),
        "float64",
        True,
    ),
    # The multi-replica loss-scaling path: statistics summed in the step graph.
    "sophia_h_loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(_sophia(seed=5)),
        "float64",
        True,
    ),
    "sophia_g_loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(_sophia(GNB, seed=5)),
        "float64",
        True,
    ),
    "sophia_g_mixed_float16": (
        lambda: _sophia(GNB),
        "mixed_float16",
        False,
    ),
    "sophia_h_mixed_bfloat16": (
        lambda: _sophia(),
        "mixed_bfloat16",
        False,
    ),
    # 49 samples: the last global batch has one sample, and the second replica none.
    "sophia_g_short_last_batch_f64": (
        lambda: _sophia(GNB),
        "float64",
        True,
        49,
    ),
}

if __name__ == "__main__":
    case.CASES.update(SOPHIA_CASES)
    case.main(sys.argv[1:] or list(SOPHIA_CASES))
