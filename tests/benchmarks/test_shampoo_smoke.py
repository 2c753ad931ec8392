"""benchmarks/shampoo.py at tiny settings: every section runs and reports what it should."""

import json
import math

import numpy as np
import pytest


def test_quadratic_problem_is_the_documented_one():
    from benchmarks.shampoo import kronecker_quadratic

    a, b, target = kronecker_quadratic()
    for factor in (a, b):
        values = np.linalg.eigvalsh(factor)
        np.testing.assert_allclose([values.min(), values.max()], [1.0, 100.0], rtol=1e-10)
        assert np.max(np.abs(factor - np.diag(np.diag(factor)))) > 1.0  # not axis-aligned
    assert target.shape == (16, 12)


@pytest.mark.slow
def test_sections_run_at_tiny_settings():
    from benchmarks import shampoo

    quiet = {"log": lambda *_: None}
    quad = shampoo.quadratic(steps=3, learning_rates=(0.1, 1.0), beta_1s=(0.9,), **quiet)
    assert set(quad["rows"]) == set(shampoo.QUADRATIC_OPTIMIZERS)
    assert all(row["best_loss"] < quad["initial_loss"] for row in quad["rows"].values())
    cost = shampoo.step_cost((10,), repeats=1, max_train=64, **quiet)
    assert cost["ratio_to_adam"]["adam"] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in cost["ratio_to_adam"].values())
    runs = shampoo.time_to_target(
        ("digits_cnn",), ("shampoo",), seeds=1, epochs={"digits_cnn": 1},
        grids={"shampoo": (3e-3,)}, **quiet,
    )  # fmt: skip
    row = runs["digits_cnn"]["shampoo"]
    assert row["learning_rate"] == 3e-3 and row["seeds"] == 1 and len(row["runs"]) == 1


def test_only_reruns_the_named_sections_and_keeps_the_others(tmp_path, monkeypatch):
    from benchmarks import shampoo

    monkeypatch.setattr(shampoo, "RESULTS", tmp_path)
    monkeypatch.setattr(shampoo, "quadratic", lambda **_: {"best": 1.0})
    (tmp_path / "shampoo.json").write_text(json.dumps({"training": {"kept": True}}))
    report = shampoo.main(["--only", "quadratic"])
    written = json.loads((tmp_path / "shampoo.json").read_text())
    assert written == report
    assert written["training"] == {"kept": True} and written["quadratic"]["best"] == 1.0
    assert written["quadratic"]["wall_seconds"] >= 0 and written["mode"] == "default"
    with pytest.raises(SystemExit):
        shampoo.main(["--only", "quadratic,typo"])
