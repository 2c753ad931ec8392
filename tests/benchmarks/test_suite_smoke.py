"""Smoke test of the benchmark suite's smallest configuration (not a timed benchmark)."""

import json
import math

import pytest


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, float):
        yield tree


@pytest.mark.slow
def test_smoke_suite_writes_finite_results(tmp_path):
    from benchmarks import suite

    output = tmp_path / "suite.json"
    suite.main(["--smoke", "--only", "cost,accuracy", "--output", str(output), "--no-docs"])
    result = json.loads(output.read_text())

    assert result["mode"] == "smoke"
    assert {"machine", "config", "seconds", "cost", "accuracy"} <= set(result)
    (row,) = result["cost"]["rows"]
    for key in ("hvp_over_grad", "adahessian_over_adam", "csn_over_sgd", "callback_measurement_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    accuracy = result["accuracy"]
    assert set(accuracy["eigen"]) == {"lanczos", "nystrom", "power"}
    assert set(accuracy["trace"]) == {"hutchinson", "hutch++"}
    # Lanczos with a Krylov space as large as the operator is exact.
    assert accuracy["eigen"]["lanczos"][-1]["eigenvalue_max_rel_err"] < 1e-8
    assert all(math.isfinite(x) for x in _numbers(accuracy))
    assert (tmp_path / "cost_ratios.png").stat().st_size > 0
    assert (tmp_path / "estimator_accuracy.png").stat().st_size > 0
    text = suite.markdown(result)
    assert "Cost ratios" in text and "Estimator accuracy" in text


def test_update_doc_keeps_hand_written_text(tmp_path):
    from benchmarks import suite

    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{suite.BEGIN}\nold\n{suite.END}\noutro\n")
    suite.update_doc("new", doc)
    assert doc.read_text() == f"intro\n{suite.BEGIN}\nnew\n{suite.END}\noutro\n"
