"""Tests of the training benchmarks' pieces (models, schedules, report), not timed runs."""

import json
import math

import pytest


def test_reference_models_match_the_mnist1d_reference_sizes():
    from benchmarks import training

    # The MNIST-1D reference models: logistic 40*10+10, MLP 40-100-100-10, and the
    # 1-D CNN whose three stride-2 convolutions map length 40 to 19, 10 and 5.
    shape, classes = (40, 1), 10
    assert training.logreg(shape, classes).count_params() == 40 * 10 + 10
    assert training.mlp(shape, classes).count_params() == 40 * 100 + 100 + 100 * 100 + 100 + 1010
    cnn = training.conv1d(shape, classes)
    lengths = [layer.output.shape[1] for layer in cnn.layers if "conv1d" in layer.name]
    assert lengths == [19, 10, 5]
    conv = (1 * 5 + 1) * 25 + 2 * (25 * 3 + 1) * 25
    assert cnn.count_params() == conv + 125 * 10 + 10


def test_calibration_records_every_early_step_then_sparsely():
    from benchmarks.training import _Calibration

    callback = _Calibration(probe=None, every=9, dense=4)
    due = []
    for step in range(1, 30):
        callback.step = step
        if callback._due():
            due.append(step)
            callback.rows.append({"finite": True})
    assert due == [1, 2, 3, 4, 9, 18, 27]

    # After a non-finite record the dense phase ends.
    callback = _Calibration(probe=None, every=9, dense=10)
    callback.rows = [{"finite": True}, {"finite": False}]
    due = []
    for step in range(3, 20):
        callback.step = step
        if callback._due():
            due.append(step)
    assert due == [9, 18]


def test_crossover():
    from benchmarks.training import _crossover

    assert _crossover([1.0, 0.5, 0.2], [2.0, 0.4, 0.3]) == 3
    assert _crossover([1.0, 0.5], [2.0, 1.0]) == 1
    assert _crossover([1.0, 0.5], [0.5, 0.4]) is None
    assert _crossover([1.0, 0.5], [0.5, math.nan]) == 2


def test_batch_crossover():
    from benchmarks.training import _batch_crossover

    def runs(pairs):
        return {
            str(b): {"loss": {"sgd": [9.0, sgd], "csn_gn": [9.0, csn]}}
            for b, (sgd, csn) in pairs.items()
        }

    # CSN ahead at 256 and above, behind at 64.
    assert _batch_crossover(runs({64: (1, 2), 256: (2, 1), 1000: (3, 2)}), "csn_gn") == 256
    assert _batch_crossover(runs({64: (2, 1), 256: (1, 2)}), "csn_gn") is None
    assert _batch_crossover(runs({64: (2, 1), 256: (2, 1)}), "csn_gn") == 64
    assert _batch_crossover(runs({64: (2, 1), 256: (2, math.nan)}), "csn_gn") is None


def _fake_result():
    machine = {
        "gpus": [],
        "cpu_count": 2,
        "processor": "x",
        "tensorflow": "t",
        "keras": "k",
        "python": "p",
    }
    runs = [
        {"reached_epoch": 2, "reached_seconds": 1.0, "best_test_accuracy": 0.9},
        {"reached_epoch": 4, "reached_seconds": 3.0, "best_test_accuracy": 0.8},
    ]
    row = lambda step, finite, loss: {  # noqa: E731
        "step": step,
        "loss": loss,
        "finite": finite,
        "lambda": [2.0, 4.0],
        "gn_quotient": [1.0, 8.0],
        "assignment_cosine": 0.5,
    }
    return {
        "mode": "default",
        "machine": machine,
        "seconds": {"training": 1.0},
        "reference_check": {
            "steps": 6000,
            "batch": 100,
            "epochs": 150,
            "learning_rate": 0.01,
            "rows": {
                "mnist1d_mlp": {
                    "published": 0.68,
                    "final_test_accuracy": 0.677,
                    "best_test_accuracy": 0.682,
                    "params": 15210,
                    "seconds": 40.0,
                    "test_accuracy": [0.5, 0.682, 0.677],
                }
            },
        },
        "time_to_target": {
            "mnist1d_mlp": {
                "target": 0.6,
                "epochs": 25,
                "batch": 100,
                "adam": {
                    "description": "Adam",
                    "runs": runs,
                    "reached": 2,
                    "seeds": 2,
                    "diverged": 0,
                    "reached_epoch_mean": 3.0,
                    "reached_epoch_std": 1.0,
                    "reached_seconds_mean": 2.0,
                    "reached_seconds_std": 1.0,
                    "best_test_accuracy_mean": 0.85,
                    "best_test_accuracy_std": 0.05,
                },
            }
        },
        "calibration": {
            "problem": "digits_cnn",
            "probe": 256,
            "every": 9,
            "dense": 20,
            "runs": {"csn_paper": [row(1, True, 2.3), row(2, True, 40.0), row(3, False, math.nan)]},
        },
    }


def test_markdown_reports_reference_check_spread_and_divergence():
    from benchmarks import suite

    text = suite.markdown(_fake_result())
    assert "| mnist1d_mlp | 15,210 | 68% | 0.677 | 0.682 | 40 |" in text
    assert "| adam | 2/2 | 3.0 ± 1.0 | 2.0 ± 1.0 | 0.850 ± 0.050 | 0 |" in text
    assert "every step for the first 20 steps, then every 9 steps" in text
    # median of lambda/quotient over k is max(2, 0.5) of the sorted pair [0.5, 2] -> 2;
    # first non-finite record at step 3; loss from step 1 to the last finite record.
    assert "| csn_paper | 3 | 2 → 2 | 0.5 | 0.50 → 0.50 | 3 | 2.3 → 40 (step 2) |" in text


@pytest.mark.slow
def test_smoke_training_section(tmp_path):
    from benchmarks import suite

    output = tmp_path / "suite.json"
    suite.main(["--smoke", "--only", "training", "--output", str(output), "--no-docs"])
    result = json.loads(output.read_text())
    (row,) = result["reference_check"]["rows"].values()
    assert 0.0 <= row["final_test_accuracy"] <= 1.0 and row["published"] == 0.32
    assert len(row["test_accuracy"]) == result["reference_check"]["epochs"] == 1
    steps = [r["step"] for r in result["calibration"]["runs"]["csn_paper"]]
    assert steps == [1, 2, 40]
    for name in ("batch_size_study.png", "csn_calibration.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "MNIST-1D reference check" in suite.markdown(result)
