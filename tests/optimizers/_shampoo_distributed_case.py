"""Shampoo's golden distribution check, run in its own process: 2 replicas == 1 device.

Adds Shampoo's cases to the shared case script (``_distributed_case.py``, which
configures the two logical CPUs on import) and runs them there: the same model, initial
weights and global batches without a strategy and under ``MirroredStrategy``. Shampoo's
statistics come from the all-reduced gradient, so both replicas must hold equal
statistics and roots, equal to one device's.

Usage: ``python tests/optimizers/_shampoo_distributed_case.py CASE [CASE ...]``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras  # noqa: E402

from keras_curv.optimizers import Shampoo  # noqa: E402
from tests.optimizers import _distributed_case as shared  # noqa: E402 (configures the CPUs)


def _shampoo(**kwargs):
    # Blocks of 4 split the (5, 6) and (6, 3) kernels; roots from step 1, every 2 steps.
    settings = {"precondition_every": 2, "start_preconditioning_step": 1, "block_size": 4}
    return Shampoo(0.05, **{**settings, **kwargs})


# The roots are accurate to about u / ε relative (u: the unit roundoff; eigenvalues
# below u λ_max are rounding noise), so 1 device and 2 replicas, whose gradients differ
# by rounding, agree to that: ε 1e-6 in float64 (measured 1e-15; the default 1e-12
# gives 2e-7), 1e-4 in float32 and mixed precision (1e-12 there leaves noise-level
# directions scaled by anything in [u^(-1/4), ε^(-1/4)]: a 1 % difference after 6 steps).
CASES = {
    "shampoo_f64": (lambda: _shampoo(epsilon=1e-6), "float64", False),
    "shampoo_f32": (lambda: _shampoo(epsilon=1e-4), "float32", False),
    "shampoo_sgd_weighted_decay": (
        lambda: _shampoo(grafting="sgd", weight_decay=0.01, epsilon=1e-6),
        "float64",
        True,
    ),
    "shampoo_loss_scaled_f64": (
        lambda: keras.optimizers.LossScaleOptimizer(_shampoo(epsilon=1e-6)),
        "float64",
        True,
    ),
    "shampoo_mixed_float16": (lambda: _shampoo(epsilon=1e-4), "mixed_float16", False),
    "shampoo_mixed_bfloat16": (lambda: _shampoo(epsilon=1e-4), "mixed_bfloat16", False),
}

if __name__ == "__main__":
    shared.CASES.update(CASES)
    shared.main(sys.argv[1:] or list(CASES))
