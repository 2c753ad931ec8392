"""Two ``MultiWorkerMirroredStrategy`` workers on 127.0.0.1 train exactly as one worker does.

``_multi_worker_case.py`` runs in three fresh processes side by side: two workers (one
CPU replica each, ring collectives over gRPC on ports chosen free at runtime, found
through ``TF_CONFIG``) and the one-worker reference, on the same global batches. A
run that hangs (a collective waiting for a worker that failed) is killed at the
timeout and fails the test.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

from tests.optimizers._fresh_process import json_reports

_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_multi_worker_case.py")
_TIMEOUT = 900  # seconds, all three processes together (about 90 s on an idle machine)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> tuple[dict, dict, dict]:
    """``(worker 0, worker 1, one worker)`` reports of every case."""
    backup = str(tmp_path_factory.mktemp("backups"))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    tasks = [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)]
    workers = [dict(cpu_only, TF_CONFIG=json.dumps(task)) for task in tasks]
    runs = [["worker", backup], ["worker", backup], ["single", backup]]
    first, second, single = json_reports(_CASE_SCRIPT, runs, _TIMEOUT, envs=[*workers, cpu_only])
    return first, second, single


# case -> (one-worker case it must equal, largest weight difference)
_EQUAL = {
    "sgd_fit_f64": ("sgd_fit_f64", 1e-12),
    "adahessian_fit_f64": ("adahessian_fit_f64", 1e-12),
    "csn_fit_f64": ("csn_fit_f64", 1e-12),
    # float32: the two half-batches are summed in another order than the whole batch.
    "adahessian_fit_f32": ("adahessian_fit_f32", 1e-5),
    "csn_fit_f32": ("csn_fit_f32", 1e-5),
    "adahessian_loop_f64": ("adahessian_loop_f64", 1e-12),
    "csn_loop_f64": ("csn_loop_f64", 1e-12),
    # Stopped after the first epoch, resumed by a new model: as if never stopped.
    "adahessian_resume_f64": ("adahessian_fit_f64", 1e-12),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_EQUAL))
def test_two_workers_equal_one_worker(reports, case):
    first, second, single = reports
    reference, tolerance = _EQUAL[case]
    assert first["num_replicas"] == 2 and single["num_replicas"] == 1
    for report in (first[case], second[case], single[reference]):
        assert "error" not in report, report["error"]
    # Mirrored: both workers hold the same weights, bit for bit.
    assert first[case]["weights"] == second[case]["weights"]
    two = np.array(first[case]["weights"])
    one = np.array(single[reference]["weights"])
    assert np.max(np.abs(one - np.array(single["initial"]))) > 0.05  # it trained
    np.testing.assert_allclose(two, one, rtol=0, atol=tolerance)
    assert first[case]["iterations"] == single[reference]["iterations"] == 6
    assert first[case]["skipped"] == single[reference]["skipped"]
    losses = first[case]["losses"]
    np.testing.assert_allclose(losses, single[reference]["losses"][-len(losses) :], atol=tolerance)
    if "evaluated" in first[case]:
        np.testing.assert_allclose(
            first[case]["evaluated"], single[reference]["evaluated"], atol=tolerance
        )


@pytest.mark.slow
def test_a_nan_on_one_worker_skips_the_step_on_both(reports):
    """The skip decision is agreed over the workers, else the weights would diverge."""
    first, second, single = reports
    case = "adahessian_nonfinite_f64"
    for report in (first[case], second[case], single[case]):
        assert "error" not in report, report["error"]
        # One NaN batch per epoch, 2 epochs of 3 steps.
        assert report["skipped"] == 2 and report["iterations"] == 4
        assert np.all(np.isfinite(report["weights"]))
    assert first[case]["weights"] == second[case]["weights"]
    np.testing.assert_allclose(first[case]["weights"], single[case]["weights"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_loss_scaling_on_several_workers_fails_clearly(reports):
    for worker in reports[:2]:
        error = worker["adahessian_fit_mixed_float16"].get("error", "")
        assert "LossScaleOptimizer (mixed_float16)" in error and "mixed_bfloat16" in error, error


@pytest.mark.slow
def test_plain_keras_fit_still_fails_on_several_workers(reports):
    """The canary for keras-team/keras#20585 (Keras 3.15: open).

    keras-curv's instance-level workaround
    (``keras_curv._internal.keras_privates.work_around_multi_worker_fit``) makes
    ``fit`` work for any optimizer, ``SGD`` included (``sgd_fit_f64`` above). When this
    test fails, Keras has fixed the bug (first ``_maybe_symbolic_build``'s reduction of
    the input batch, then the reduction of the step's logs): the matching half of the
    workaround can go.
    """
    for worker in reports[:2]:
        plain = worker["sgd_canary"].get("error", "")
        assert "PerReplica" in plain and "to a Tensor" in plain, worker["sgd_canary"]
        half = worker["sgd_build_only"].get("error", "")
        assert "Invalid reduction dimension 0" in half, worker["sgd_build_only"]
