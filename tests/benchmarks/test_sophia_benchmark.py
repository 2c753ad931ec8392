"""The Sophia benchmark's pieces (selection of the tuned rate, interleaved timing), not runs."""

import time


def test_fastest_rate_prefers_fewest_epochs_then_accuracy():
    from benchmarks.sophia import _fastest

    rows = [
        {"learning_rate": 1e-3, "reached_epoch": 6, "best_test_accuracy": 0.98},
        {"learning_rate": 3e-3, "reached_epoch": 4, "best_test_accuracy": 0.96},
        {"learning_rate": 1e-2, "reached_epoch": 4, "best_test_accuracy": 0.97},
        {"learning_rate": 3e-2, "reached_epoch": None, "best_test_accuracy": 0.99},
    ]
    assert _fastest(rows) == 1e-2
    unreached = [{**r, "reached_epoch": None} for r in rows]
    assert _fastest(unreached) == 3e-2


def test_interleaved_ratios_are_per_round_medians():
    from benchmarks.sophia import interleaved_ratios

    calls = []

    def stepper(name, seconds):
        def step():
            calls.append(name)
            time.sleep(seconds)

        return step

    steppers = {"adam": stepper("adam", 0.002), "slow": stepper("slow", 0.006)}
    result = interleaved_ratios(steppers, steps=2, rounds=3)
    assert 2.0 < result["ratio_to_adam"]["slow"] < 4.5
    assert result["adam_ms_per_step"] >= 2.0
    # Each round starts with a different variant.
    assert calls[0] == "adam" and calls[4] == "slow" and calls[8] == "adam"
