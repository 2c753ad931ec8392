"""A new ``MirroredStrategy`` and a new model per ``fit``, several times in one process.

Notebooks and hyper-parameter sweeps do this. TensorFlow gives every new strategy the
collective keys of the previous one (tensorflow/tensorflow#62790), so the second fit
used to fail with ``Shape mismatch in the collective instance 100``;
:func:`~keras_curv._internal.keras_privates.use_fresh_collective_keys` works around it.
"""

from __future__ import annotations

import functools
import os

import pytest
import tensorflow as tf
from tensorflow.python.distribute import cross_device_ops

from keras_curv._internal.keras_privates import use_fresh_collective_keys
from tests.optimizers._fresh_process import json_reports

_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_strategies_case.py")


def _group_key(strategy: tf.distribute.MirroredStrategy) -> int:
    return strategy.extended._collective_ops._launchers[0]._group_key


def test_each_mirrored_strategy_gets_its_own_group_key_once():
    first, second = (tf.distribute.MirroredStrategy(["/cpu:0"]) for _ in range(2))
    # TensorFlow numbers both alike: the bug.
    assert _group_key(first) == _group_key(second) == 1
    old_ops = first.extended._collective_ops
    assert use_fresh_collective_keys(first)
    assert use_fresh_collective_keys(second)
    keys = (_group_key(first), _group_key(second))
    assert min(keys) >= 1 << 30 and keys[0] != keys[1]
    # The default cross-device ops are the new collectives; the old ones are untouched
    # (functions traced with them keep consistent keys).
    assert first.extended._cross_device_ops is first.extended._collective_ops
    assert isinstance(first.extended._collective_ops, cross_device_ops.CollectiveAllReduce)
    assert old_ops._launchers[0]._group_key == 1
    # Once per strategy.
    assert not use_fresh_collective_keys(first)
    assert _group_key(first) == keys[0]


def test_explicit_cross_device_ops_are_kept_and_other_strategies_left_alone():
    explicit = tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"], cross_device_ops=explicit)
    assert use_fresh_collective_keys(strategy)
    assert strategy.extended._cross_device_ops is explicit
    assert _group_key(strategy) >= 1 << 30
    assert not use_fresh_collective_keys(tf.distribute.get_strategy())
    assert not use_fresh_collective_keys(tf.distribute.OneDeviceStrategy("/cpu:0"))

    fresh = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert not tf.function(lambda: tf.constant(use_fresh_collective_keys(fresh)))()
    assert _group_key(fresh) == 1


_SEQUENCES = ("sgd_then_adahessian", "curvature_then_adam", "sgd_then_adam")


@functools.cache
def _reports() -> dict[str, list[dict]]:
    """Every sequence of ``_strategies_case.py``, each in a fresh process, side by side."""
    runs = json_reports(_CASE_SCRIPT, [[name] for name in _SEQUENCES], timeout=600)
    return dict(zip(_SEQUENCES, runs))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sequence, optimizers",
    [
        ("sgd_then_adahessian", ["sgd", "adahessian"]),
        ("curvature_then_adam", ["adahessian", "csn", "adam"]),
    ],
)
def test_every_fit_under_a_new_strategy_trains(sequence, optimizers):
    steps = _reports()[sequence]
    assert [s["optimizer"] for s in steps] == optimizers
    for step in steps:
        assert "error" not in step, step["error"]
        assert step["iterations"] == 2
        assert step["finite"] and step["replicas_agree"]
        assert step["moved"] > 1e-3


@pytest.mark.slow
def test_plain_keras_still_fails_under_a_second_strategy():
    """The TensorFlow bug itself: SGD then Adam, a new strategy and size each.

    keras-curv re-keys only the strategies its own optimizers train under. When this
    test fails, TensorFlow has fixed #62790 and ``use_fresh_collective_keys`` can go.
    """
    first, second = _reports()["sgd_then_adam"]
    assert "error" not in first
    assert "Shape mismatch in the collective instance" in second.get("error", ""), second
