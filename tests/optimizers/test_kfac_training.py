"""KFAC at its defaults trains every model of the zoo (slow: about a minute)."""

from __future__ import annotations

import math

import pytest

from keras_curv.optimizers import KFAC
from tests.architectures import ZOO, first_epoch


@pytest.mark.slow
def test_defaults_train_every_zoo_model():
    """One epoch at the defaults lowers the loss and stays finite on every zoo model.

    Measured (initial -> final): mlp 2.347 -> 0.358, cnn 2.299 -> 0.280, transformer
    1.458 -> 0.027, lstm 1.386 -> 1.265, two_input 2.383 -> 0.440. batchnorm_cnn trains
    (epoch mean 2.019 < 2.303; 0.40 in training mode after 3 epochs) but its eval-mode
    loss is 2.37: 16 steps leave BatchNorm's moving statistics (momentum 0.99) far from
    the moved weights' (Adam, which barely moves it in one epoch, gets 2.3015), so for it
    the epoch's training loss is compared.
    """
    for name in ZOO:
        result = first_epoch(name, KFAC())
        assert all(math.isfinite(v) for v in result.values()), (name, result)
        measured = result["mean"] if name == "batchnorm_cnn" else result["final"]
        assert measured < 0.95 * result["initial"], (name, result)
        assert result["max_weight_change"] < 2.0, (name, result)  # no blow-up


@pytest.mark.slow
def test_compare_offers_kfac(tmp_path):
    from keras_curv import cli

    argv = ["compare", "--optimizers", "kfac,sgd", "--epochs", "2", "--max-train", "256",
            "--max-test", "64", "--logdir", str(tmp_path)]  # fmt: skip
    result = cli.run_compare(cli._parser().parse_args(argv))
    assert list(result["optimizers"]) == ["kfac", "sgd"]
    losses = result["optimizers"]["kfac"]["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0]


@pytest.mark.slow
def test_tuned_kfac_beats_tuned_adam_and_sgd_on_the_digits_mlp():
    """The issue's problem at each optimizer's best rate of ``benchmarks.kfac``'s grids.

    Measured (digits, 64-64-10 tanh, batch 128, 24 steps): K-FAC 0.082, SGD-momentum
    0.137, Adam 0.159 (both at their grid's best; see docs/kfac.md).
    """
    from benchmarks.kfac import run_convergence

    best = run_convergence({"kfac": [0.316], "adam": [0.0316], "sgd_momentum": [0.316]})["best"]
    assert best["kfac"]["loss"] < 0.1
    assert best["kfac"]["loss"] < 0.75 * min(best["adam"]["loss"], best["sgd_momentum"]["loss"])
