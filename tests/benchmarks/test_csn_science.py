"""Tests of the ClassSubspaceNewton science benchmark's pieces (ranking, reset, report)."""

import math

import numpy as np
import pytest


def _row(workload, variant, loss, diverged=0):
    return {
        "workload": workload,
        "variant": variant,
        "best_lr": 0.1,
        "final_loss_mean": loss,
        "accuracy_mean": 0.5,
        "diverged": diverged,
    }


def test_ranking_is_the_mean_rank_and_the_geometric_mean_over_sgd():
    from benchmarks.csn_science import _ranking

    rows = [
        _row("a", "sgd", 1.0),
        _row("a", "x", 0.5),
        _row("b", "sgd", 2.0),
        _row("b", "x", 4.0),
    ]
    ranking = _ranking(rows)
    assert ranking["x"]["mean_rank"] == pytest.approx(1.5)
    assert ranking["sgd"]["geomean_loss_over_sgd"] == pytest.approx(1.0)
    assert ranking["x"]["geomean_loss_over_sgd"] == pytest.approx(math.sqrt(0.5 * 2.0))


def test_diverged_means_non_finite_or_above_the_start():
    from benchmarks.csn_science import diverged

    assert diverged({"final_loss": float("inf"), "initial_loss": 2.3})
    assert diverged({"final_loss": 2.4, "initial_loss": 2.3})
    assert not diverged({"final_loss": 0.4, "initial_loss": 2.3})


def test_report_tables_name_every_variant_and_divergence():
    from benchmarks.csn_science import report

    rows = [_row("mlp", "sgd", 0.84), _row("mlp", "paper", 137.0, diverged=4)]
    text = report({"default": {"epochs": 2, "rows": rows}})
    assert "| workload | sgd | paper |" in text
    assert "| mlp | 0.1: 0.84, 0.50 | 0.1: 137, 0.50 (4 div.) |" in text


def test_reset_optimizer_restarts_the_state_and_the_eigen_block():
    import keras

    from benchmarks.csn_science import _reset_optimizer
    from keras_curv.optimizers import ClassSubspaceNewton

    optimizer = ClassSubspaceNewton(0.1, directions="eigen", num_classes=3, momentum=0.5)
    variables = [keras.Variable(np.ones((4, 3), "float32"))]
    optimizer.build(variables)
    for variable in optimizer.variables:
        variable.assign(np.full(variable.shape, 7.0, variable.dtype))
    _reset_optimizer(optimizer, 0.3, seed=1)
    assert float(optimizer.learning_rate) == pytest.approx(0.3)
    assert int(optimizer.iterations) == 0
    basis = np.asarray(optimizer._eigen_basis[0])
    assert basis.shape == (3, 4, 3) and np.std(basis) > 0.3  # a fresh random block
    np.testing.assert_array_equal(np.asarray(optimizer._eigen_curvature), 0.0)
