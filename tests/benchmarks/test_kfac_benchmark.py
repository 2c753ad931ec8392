"""Smoke test of benchmarks/kfac.py at tiny settings (not a timed run)."""

from __future__ import annotations

import math

import pytest


def test_grid_is_log_spaced():
    from benchmarks.kfac import grid

    assert grid(-2, 0) == [0.01, 0.0316, 0.1, 0.316, 1.0]


@pytest.mark.slow
def test_convergence_and_target_sections_report_the_best_rate(monkeypatch):
    from benchmarks import kfac

    grids = {"adam": [1e-3, 1e-2], "sgd_momentum": [0.1], "kfac": [0.1]}
    convergence = kfac.run_convergence(grids, steps=3)
    for name, row in convergence["best"].items():
        losses = convergence["final_loss"][name]
        assert row["loss"] == min(losses.values()) and math.isfinite(row["loss"])
    problems = kfac._problems()
    monkeypatch.setattr(kfac, "_problems", lambda: {"digits_cnn": problems["digits_cnn"]})
    target = kfac.run_target({"adam": [1e-2], "sgd_momentum": [0.1], "kfac": [0.1]}, epochs=2)
    entry = target["problems"]["digits_cnn"]
    baseline = min(entry["optimizers"][n]["final_loss"] for n in ("adam", "sgd_momentum"))
    # The target is 1.1 x the best baseline loss over the epochs, at most its last loss.
    assert entry["target_loss"] <= 1.1 * baseline + 1e-12
    best_baseline = min(
        entry["optimizers"][n]["epochs_to_target"] or 99 for n in ("adam", "sgd_momentum")
    )
    assert best_baseline <= 2
