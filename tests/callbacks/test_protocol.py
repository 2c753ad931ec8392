"""What the callbacks read from an optimizer: curvature_summary() and class_directions()."""

import warnings
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks._protocol import optimizer_directions, optimizer_summary


class Reporting(keras.optimizers.SGD):
    """An SGD that reports a fixed curvature summary and class directions."""

    def __init__(self, summary=None, directions=None, **kwargs):
        super().__init__(**kwargs)
        self._summary, self._directions = summary, directions

    def curvature_summary(self):
        return self._summary

    def class_directions(self):
        return self._directions


def _model(optimizer):
    return SimpleNamespace(optimizer=optimizer)


def test_scalars_and_vectors_become_tags():
    summary = {"damping": tf.constant(0.5), "curvature": np.array([3.0, 2.0], np.float32)}
    scalars, histograms = optimizer_summary(_model(Reporting(summary)))
    assert scalars == {
        "optimizer/damping": 0.5,
        "optimizer/curvature_1": 3.0,
        "optimizer/curvature_2": 2.0,
    }
    assert list(histograms) == ["optimizer/curvature"]
    np.testing.assert_array_equal(histograms["optimizer/curvature"], [3.0, 2.0])
    assert histograms["optimizer/curvature"].dtype == np.float64


def test_read_through_a_loss_scale_optimizer():
    wrapped = keras.optimizers.LossScaleOptimizer(Reporting({"damping": 2.0}))
    assert optimizer_summary(_model(wrapped)) == ({"optimizer/damping": 2.0}, {})
    rows = np.ones((3, 5))
    wrapped = keras.optimizers.LossScaleOptimizer(Reporting(directions=rows))
    np.testing.assert_array_equal(optimizer_directions(_model(wrapped), 5), rows)


@pytest.mark.parametrize("optimizer", [keras.optimizers.SGD(), None])
def test_optimizers_without_the_protocol_give_nothing(optimizer):
    assert optimizer_summary(_model(optimizer)) == ({}, {})
    assert optimizer_directions(_model(optimizer), 4) is None


@pytest.mark.parametrize(
    "summary, match",
    [
        ([1.0, 2.0], "must return a dict"),
        ({"matrix": np.eye(2)}, r"\['matrix'\].*shape \(2, 2\)"),
    ],
)
def test_bad_summaries_raise(summary, match):
    with pytest.raises(ValueError, match=match):
        optimizer_summary(_model(Reporting(summary)))


@pytest.mark.parametrize("directions", [np.ones((3, 4)), np.ones(5), np.ones((1, 3, 5))])
def test_directions_must_be_c_by_dim(directions):
    with pytest.raises(ValueError, match=r"\(C, dim\) array with dim=5"):
        optimizer_directions(_model(Reporting(directions=directions)), 5)


def test_long_vectors_are_summarised_by_few_scalars():
    per_variable = np.arange(1.0, 41.0)  # e.g. one value per variable of a large model
    scalars, histograms = optimizer_summary(_model(Reporting({"rms": per_variable})))
    assert scalars == {
        "optimizer/rms_min": 1.0,
        "optimizer/rms_mean": 20.5,
        "optimizer/rms_max": 40.0,
    }
    np.testing.assert_array_equal(histograms["optimizer/rms"], per_variable)


class Preconditioned(keras.optimizers.SGD):
    def __init__(self, operator, threshold=None, **kwargs):
        super().__init__(**kwargs)
        self._operator, self._threshold = operator, threshold

    def preconditioner(self):
        return self._operator

    def stability_threshold(self):
        return self._threshold


def test_preconditioner_protocol_is_read_and_checked():
    from keras_curv.callbacks._protocol import optimizer_preconditioning
    from keras_curv.curvature import DiagonalOperator

    found = optimizer_preconditioning(_model(Preconditioned(DiagonalOperator([1.0, 2.0]), 3.0)), 2)
    assert found.threshold == 3.0 and not found.identity
    assert optimizer_preconditioning(_model(Preconditioned(None)), 2) is None
    with pytest.raises(ValueError, match="LinearOperator of dim=3"):
        optimizer_preconditioning(_model(Preconditioned(DiagonalOperator([1.0, 2.0]))), 3)
    with pytest.raises(ValueError, match="positive number"):
        optimizer_preconditioning(_model(Preconditioned(DiagonalOperator([1.0, 2.0]), -1.0)), 2)


class SolverWithPreconditioner(keras.optimizers.Adam):
    """A method of a protocol name for another purpose (a CG solver's preconditioner)."""

    def preconditioner(self, problem, w, state):
        raise AssertionError("must not be called by the callbacks")

    def curvature_model(self, *, required):
        raise AssertionError("must not be called by the callbacks")


def test_same_named_methods_with_arguments_are_ignored_with_one_warning():
    from keras_curv.callbacks import _protocol
    from keras_curv.callbacks._protocol import optimizer_curvature_model, protocol_method

    _protocol._WARNED_SIGNATURES.clear()
    model = _model(SolverWithPreconditioner())
    with pytest.warns(RuntimeWarning, match=r"SolverWithPreconditioner.preconditioner takes"):
        assert protocol_method(model.optimizer, "preconditioner") is None
    with pytest.warns(RuntimeWarning, match=r"curvature_model takes arguments"):
        assert optimizer_curvature_model(model, 4) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per class and name
        assert protocol_method(model.optimizer, "preconditioner") is None
