"""Sophia end to end: two replicas equal one device, and the defaults train (slow)."""

from __future__ import annotations

import functools
import math
import os

import keras
import pytest

from keras_curv import models
from keras_curv.data import load_dataset
from keras_curv.optimizers import Sophia
from tests.architectures import LOSS, ZOO, first_epoch
from tests.optimizers._fresh_process import json_reports

_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_sophia_distributed_case.py")
_EXACT = [
    "sophia_h_f64",
    "sophia_g_weighted_f64",
    "sophia_h_loss_scaled_f64",
    "sophia_g_loss_scaled_f64",
]
# About 10 units in the last place of the compute dtype (see test_hardening.py).
_MIXED = {"sophia_g_mixed_float16": 1e-2, "sophia_h_mixed_bfloat16": 0.1}


@functools.cache
def _reports() -> dict:
    groups = ([*_EXACT[:2], "sophia_g_short_last_batch_f64"], [*_EXACT[2:], *_MIXED])
    report = {}
    for part in json_reports(_CASE_SCRIPT, groups, timeout=900):
        report.update(part)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("case", [*_EXACT, *_MIXED])
def test_two_replicas_equal_one_device_on_the_global_batch(case):
    result = _reports()[case]
    assert result["num_replicas"] == 2 and result["iterations"] == [6, 6]
    assert result["moved"] > 0.3
    tolerance = _MIXED.get(case, 1e-12)
    assert result["abs"] < tolerance * max(1.0, result["moved"]), result
    assert result["replicas_agree"] and result["finite"]


@pytest.mark.slow
def test_a_replica_with_an_empty_shard_trains():
    """49 samples in batches of 16: the second replica's share of the last batch is empty."""
    result = _reports()["sophia_g_short_last_batch_f64"]
    assert result["iterations"] == [8, 8]
    assert result["replicas_agree"] and result["finite"] and result["moved"] > 0.3


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator, names",
    # Sophia-G also on the Embedding and two-input models (its sampled labels read the
    # outputs, whatever the architecture; the convolutions and the LSTM add nothing).
    [("hutchinson", tuple(ZOO)), ("gauss_newton_bartlett", ("transformer", "two_input"))],
    ids=["defaults", "sophia_g"],
)
def test_defaults_train_every_zoo_model(estimator, names):
    for name in names:
        result = first_epoch(name, Sophia(estimator=estimator, seed=0))
        assert math.isfinite(result["mean"]), (name, result)
        assert result["final"] < result["initial"], (name, result)
        assert result["max_weight_change"] < 1.0, (name, result)  # BatchNorm statistics too


@pytest.mark.slow
def test_defaults_train_the_digits_mlp():
    data = load_dataset("digits", seed=0)
    keras.utils.set_random_seed(0)
    model = models.mlp(data.input_shape, data.num_classes)
    optimizer = Sophia(seed=0)
    model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    history = model.fit(data.x_train, data.y_train, batch_size=32, epochs=8, verbose=0)
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    assert history.history["loss"][-1] < 0.2 * history.history["loss"][0]
    assert accuracy > 0.93
    assert 0.0 < float(optimizer.clip_fraction) < 1.0
