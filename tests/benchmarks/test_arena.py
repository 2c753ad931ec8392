"""The arena's protocol: grids, selection, summaries, workload oracles, and a smoke run."""

import math

import numpy as np
import pytest

from benchmarks import arena, arena_report
from benchmarks.arena_optimizers import contestants
from benchmarks.arena_workloads import WORKLOADS, logreg_solution


def test_grid_is_log_spaced_around_the_default_rate():
    sgd = contestants()["sgd"]
    assert sgd.grid() == [0.01, 0.0316, 0.1, 0.316, 1.0]
    assert contestants()["lbfgs"].grid() == [None]


def test_applicability():
    pool = contestants()
    cnn, logreg = WORKLOADS["digits_cnn"], WORKLOADS["logreg_ill_conditioned"]
    assert arena.applies(pool["csn_paper"], cnn)
    assert not arena.applies(pool["csn_paper"], logreg)  # one logit: no class subspace
    assert not arena.applies(pool["lbfgs"], cnn)  # full-batch solvers on full-batch workloads
    assert arena.applies(pool["lbfgs"], logreg) and arena.applies(pool["adam"], logreg)


def _run(rate, final_val, diverged=False, reached_at=None):
    return {"learning_rate": rate, "final_val": final_val, "diverged": diverged,
            "steps_to_target": reached_at, "seconds_to_target": None if reached_at is None
            else reached_at / 10, "final_test": final_val, "step_seconds": 0.01,
            "first_epoch_seconds": 1.0, "state_bytes": 12}  # fmt: skip


def test_selection_skips_diverged_and_respects_the_score_direction():
    accuracy, loss = WORKLOADS["digits_cnn"], WORKLOADS["digits_autoencoder"]
    grid = [_run(0.01, 0.5), _run(0.1, 0.9), _run(1.0, 0.99, diverged=True), _run(3, math.nan)]
    assert arena.select(accuracy, grid)["learning_rate"] == 0.1
    assert arena.select(loss, grid)["learning_rate"] == 0.01
    assert arena.select(accuracy, [_run(1.0, 0.9, diverged=True)]) is None


def test_summary_counts_reached_and_diverged_seeds():
    runs = [_run(0.1, 0.96, reached_at=40), _run(0.1, 0.97, reached_at=60), _run(0.1, 0.5)]
    runs[2]["diverged"] = True
    runs[2]["final_test"] = math.nan
    summary = arena.summarize(runs)
    assert (summary["seeds"], summary["reached"], summary["diverged"]) == (3, 2, 1)
    assert summary["steps_to_target"] == pytest.approx([50.0, 10.0])
    assert summary["final_test"] == pytest.approx([0.965, 0.005])


def test_ranking_puts_reached_and_faster_first():
    entry = {"score": "accuracy", "contestants": {
        "slow": {"summary": arena.summarize([_run(0.1, 0.96, reached_at=90)])},
        "none": {"summary": None},
        "fast": {"summary": arena.summarize([_run(0.1, 0.95, reached_at=30)])},
        "never": {"summary": arena.summarize([_run(0.1, 0.99)])},
    }}  # fmt: skip
    assert [name for name, _ in arena_report.ranking(entry)] == ["fast", "slow", "never", "none"]


def test_logreg_optimum_is_the_minimum_of_the_compiled_keras_objective():
    workload = WORKLOADS["logreg_ill_conditioned"]
    data = workload.data()
    model = workload.build(0)
    model.compile(loss=workload.loss())
    at_init = model.evaluate(data.x_train, data.y_train, verbose=0)
    theta, optimum = logreg_solution()
    model.set_weights([theta[:-1, None].astype("float32"), theta[-1:].astype("float32")])
    # The scipy transcription and Keras's loss + L2 regularizer are the same objective.
    at_optimum = model.evaluate(data.x_train, data.y_train, verbose=0)
    assert at_optimum == pytest.approx(optimum, rel=1e-5)
    assert optimum < at_init
    assert workload.reached(at_optimum - optimum + 0.5 * workload.target)


@pytest.mark.slow
def test_smoke_arena_runs_the_protocol(tmp_path):
    result = arena.main("smoke", tmp_path / "arena.json", docs=False)
    entry = result["workloads"]["digits_cnn"]
    assert set(entry["contestants"]) == {"sgd", "adahessian"}
    for name, c in entry["contestants"].items():
        (run,) = c["runs"]
        assert run["steps"] == [8]  # 256 samples, batch 32, one epoch
        assert all(math.isfinite(v) for v in run["train_loss"] + run["val_score"]), name
        assert c["summary"]["step_ms"][0] > 0
    sgd_state = entry["contestants"]["sgd"]["summary"]["state_bytes"]
    ada_state = entry["contestants"]["adahessian"]["summary"]["state_bytes"]
    assert ada_state > 2 * 4 * 1000 > sgd_state  # two float32 moments per parameter
    assert (tmp_path / "arena_digits_cnn.png").stat().st_size > 0
    text = arena_report.markdown(result)
    assert "### digits_cnn" in text and "| 1 |" in text


def test_pinn_loss_is_the_convection_residual_by_finite_differences():
    from benchmarks.arena_pinn import BETA, ConvectionPINN, collocation

    model = ConvectionPINN(seed=0)
    points = collocation(64, seed=3).astype("float64")
    model(points[:1].astype("float32"))

    def u(p):
        return model.predict(p.astype("float32"), verbose=0)[:, 0].astype("float64")

    h = 1e-2
    dx = (u(points + [h, 0]) - u(points - [h, 0])) / (2 * h)
    dt = (u(points + [0, h]) - u(points - [0, h])) / (2 * h)
    expected = (
        np.mean((dt + BETA * dx) ** 2)
        + np.mean((u(model.initial) - model.initial_u) ** 2)
        + np.mean((u(model.left) - u(model.right)) ** 2)
    )
    loss = float(model.compute_loss(points.astype("float32")))
    assert loss == pytest.approx(expected, rel=2e-3)
