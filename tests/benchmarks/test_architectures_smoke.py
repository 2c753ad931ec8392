"""Smoke test of ``benchmarks.architectures`` at its tiny configuration (not timed)."""

import json
import math

import pytest


@pytest.mark.slow
def test_smoke_run_writes_finite_ratios_and_a_table(tmp_path):
    from benchmarks import architectures

    output = tmp_path / "architectures.json"
    architectures.main(["--smoke", "--only", "hvp,steps", "--output", str(output), "--no-docs"])
    result = json.loads(output.read_text())
    assert result["mode"] == "smoke"
    (hvp,) = result["hvp"]
    assert hvp["model"] == "bn_resnet" and hvp["num_params"] == 19_994
    assert math.isfinite(hvp["hvp_over_grad"]) and hvp["hvp_over_grad"] > 0
    (steps,) = result["steps"]
    assert steps["class_gradient_path"] == "jacobian"
    for key in (
        "adahessian_over_adam",
        "adahessian_5_over_adam",
        "sophia_h_over_adam",
        "csn_gn_over_sgd",
    ):
        assert math.isfinite(steps[key]) and steps[key] > 0, key
    table = architectures.markdown(result)
    assert "| bn_resnet | 19,994 |" in table and "no GPU" in table


def test_a_refusal_is_a_table_row_not_a_crash():
    from benchmarks import architectures

    result = {
        "mode": "default",
        "machine": {"gpus": [], "cpu_count": 2, "tensorflow": "x", "keras": "y"},
        "load_average_start": [1.0],
        "load_average_end": [1.0],
        "seconds": 60.0,
        "startup": [
            {"model": "lstm", "optimizer": "kfac", "refused": "ValueError: no | LSTM. Use X."}
        ],
    }
    assert "| lstm | kfac | refused: ValueError: no / LSTM | | | | |" in architectures.markdown(
        result
    )
