"""``benchmarks.safe_defaults``: rows, the rise criterion and the table (a few seconds)."""

import math

from benchmarks import safe_defaults


def test_rows_for_a_minibatch_and_a_full_batch_optimizer():
    adam = safe_defaults.measure("adam", "mlp")
    assert adam["batch_size"] == 32 and adam["finite"] and not adam["rises"]
    assert adam["mean"] < adam["initial_training"]
    lbfgs = safe_defaults.measure("lbfgs", "mlp")
    assert lbfgs["batch_size"] == 512  # one step on the whole training set
    assert math.isfinite(lbfgs["final_training"]) and not lbfgs["rises"]
    assert lbfgs["final_training"] < lbfgs["initial_training"]
    table = safe_defaults.markdown([adam, lbfgs])
    assert table.splitlines()[0] == "| optimizer | mlp |"
    assert f"| lbfgs | {lbfgs['initial_training']:.2f} → {lbfgs['final_training']:.2f} |" in table


def test_a_rise_and_a_refusal_are_marked():
    rows = [
        {"optimizer": "x", "model": "m", "initial_training": 2.0, "mean": 2.5, "last": 2.6,
         "final": 2.7, "final_training": 2.7, "rises": True, "finite": True},
        {"optimizer": "y", "model": "m", "refused": "ValueError: no"},
    ]  # fmt: skip
    table = safe_defaults.markdown(rows)
    assert "| x | 2.00 → 2.50 ✗ |" in table and "| y | refused |" in table


def test_seeds_are_averaged_into_one_cell_and_counted():
    base = {"optimizer": "x", "model": "m", "finite": True}
    rows = [
        dict(base, seed=0, initial_training=2.0, mean=2.1, last=1.9, final=1.8,
             final_training=1.8, rises=True),
        dict(base, seed=1, initial_training=2.2, mean=1.9, last=1.8, final=1.7,
             final_training=1.7, rises=False),
    ]  # fmt: skip
    merged = safe_defaults.cell(rows)
    assert merged["mean"] == 2.0 and merged["initial_training"] == 2.1
    assert not merged["rises"] and (merged["risen_seeds"], merged["seeds"]) == (1, 2)
    assert "| x | 2.10 → 2.00 (1/2 rose) |" in safe_defaults.markdown(rows)
