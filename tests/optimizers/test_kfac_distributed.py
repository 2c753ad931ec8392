"""KFAC on MirroredStrategy with 2 logical CPU replicas equals 1 device on the global batch.

The cases run in fresh processes (``_kfac_distributed_case.py``): logical devices must be
configured before TensorFlow's first op.
"""

from __future__ import annotations

import functools
import os

import pytest

from tests.optimizers._fresh_process import json_reports

_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_kfac_distributed_case.py")
# Largest weight difference over how far the weights moved: float64 is exact up to the
# order of the replica sums; mixed precision as in test_hardening.py (about 10 units in
# the last place of the compute dtype; a wrong reduction is off by more than 1).
_TOLERANCE = {
    "model_f64": 1e-12,
    "empirical_weighted_f64": 1e-12,
    "exact_every_option_f64": 1e-12,
    "conv_norm_f64": 1e-12,
    "conv_patch_sample_f64": 1e-12,
    "loss_scaled_f64": 1e-12,
    "model_f32": 1e-5,
    "mixed_float16": 1e-2,
    "mixed_bfloat16": 0.1,
}


@functools.cache
def _reports() -> dict:
    """Every case, in two processes run side by side (tracing dominates)."""
    names = list(_TOLERANCE)
    report = {}
    for part in json_reports(_CASE_SCRIPT, [names[:5], names[5:]], timeout=1200):
        report.update(part)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_TOLERANCE))
def test_two_replicas_equal_one_device_on_the_global_batch(case):
    result = _reports()[case]
    assert result["num_replicas"] == 2
    assert result["iterations"] == [6, 6]
    # Updated every step, or on every other step (curvature_update_every=2).
    assert result["curvature_updates"] in (3, 6)
    assert result["moved"] > 0.2
    assert result["abs"] < _TOLERANCE[case] * max(1.0, result["moved"]), result
    # Factors, eigendecompositions, damping, counters and the RNG agree on both replicas.
    assert result["replicas_agree"]
    assert result["finite"]
