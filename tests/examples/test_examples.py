"""The example scripts run end to end (``--smoke``) and write sane figures and numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    """Imports ``examples/<name>.py`` as a module (the scripts import ``_common`` by name)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path, *extra: str) -> dict:
    keras.backend.clear_session()
    code = _load(name).main(["--smoke", "--output", str(tmp_path), *extra])
    assert code == 0
    return json.loads((tmp_path / f"{name}.json").read_text())


def _png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _check_curves(record: dict, epochs: int) -> None:
    """A finished run has epochs + 1 finite points; a diverged one says so."""
    curves = [record[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")]
    if record["diverged"]:
        assert not all(_finite(c) and len(c) == epochs + 1 for c in curves)
        return
    for curve in curves:
        assert len(curve) == epochs + 1 and _finite(curve)
    assert all(0.0 <= a <= 1.0 for a in record["accuracy"] + record["val_accuracy"])
    assert record["step_seconds"] > 0 and record["num_params"] > 0


# ----------------------------------------------------------------------------- plumbing


def test_small_cnn_filters_matches_keras_parameter_count():
    common = _load("_common")
    from keras_curv.models import small_cnn

    for shape, classes, target in [((28, 28, 1), 10, 60_000), ((40, 1), 10, 5_000)]:
        filters = common.small_cnn_filters(shape, classes, target)
        counts = {
            f: small_cnn(shape, classes, filters=f).count_params()
            for f in (filters - 1, filters, filters + 1)
        }
        # The chosen width is the best of its neighbours, by Keras's own count.
        assert min(counts, key=lambda f: abs(counts[f] - target)) == filters


def test_first_crossover():
    common = _load("_common")
    assert common.first_crossover([2.0, 1.0, 0.9, 0.8], [2.0, 1.5, 0.8, 0.7]) == 2
    assert common.first_crossover([2.0, 1.0, 0.9], [2.0, 0.9, 0.8]) == 1
    assert common.first_crossover([2.0, 1.0], [2.0, 1.0]) is None
    # A diverged (shorter) reference curve: only the common epochs are compared.
    assert common.first_crossover([2.0, 3.0], [2.0, 1.0, 0.5]) == 1


def test_json_writes_non_finite_as_null(tmp_path):
    common = _load("_common")
    args = common.parse(common.parser("t", epochs=3, smoke_epochs=1), ["--output", str(tmp_path)])
    assert args.epochs == 3
    path = common.write_json(args, "x.json", {"a": [1.0, float("nan")], "b": np.float32(2.5)})
    data = json.loads(path.read_text())
    assert data["a"] == [1.0, None] and data["b"] == 2.5 and data["args"]["epochs"] == 3


@pytest.mark.slow
def test_missing_tfds_data_exits_2_with_one_line(tmp_path):
    """The real command line, without data and without download: one message, exit 2."""
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "fig3_top30_eigenvalues.py"),
            "--data-dir",
            str(tmp_path / "empty"),
            "--no-download",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("fig3_top30_eigenvalues")]
    assert len(lines) == 1 and "'cifar10'" in lines[0] and "--smoke" in lines[0]
    assert not (tmp_path / "fig3_top30_eigenvalues.json").exists()


# ----------------------------------------------------------------------------- examples


@pytest.mark.slow
def test_fig1_resnet9(tmp_path):
    data = _run("fig1_resnet9_cifar10", tmp_path)
    _png(tmp_path / "fig1_val_loss.png")
    assert set(data["table"]) == {"0.05"}
    for per_opt in data["runs"].values():
        assert set(per_opt) == {"SGD", "CSN"}
        for record in per_opt.values():
            _check_curves(record, epochs=2)
    # SGD and CSN start from the same weights.
    sgd, csn = data["runs"]["0.05"]["SGD"], data["runs"]["0.05"]["CSN"]
    assert sgd["val_loss"][0] == pytest.approx(csn["val_loss"][0], rel=1e-6)
    assert sgd["num_params"] == data["num_params"]
    row = data["table"]["0.05"]["SGD"]
    assert row["accuracy"] == sgd["val_accuracy"][-1] and row["loss"] == sgd["val_loss"][-1]


@pytest.mark.slow
def test_fig2_batch_sizes(tmp_path):
    data = _run("fig2_batch_sizes_mnist", tmp_path, "--epochs", "2", "--curvature", "gauss_newton")
    _png(tmp_path / "fig2_batch_sizes.png")
    assert set(data["results"]) == {"64", "full"}
    assert data["results"]["full"]["batch_size"] == data["num_train"]
    for label, result in data["results"].items():
        for record in result["runs"].values():
            _check_curves(record, epochs=2)
            assert len(record["train_loss"]) == 3 and _finite(record["train_loss"])
        sgd, csn = result["runs"]["SGD"]["train_loss"], result["runs"]["CSN"]["train_loss"]
        expected = next((e for e in (1, 2) if sgd[e] < csn[e]), None)
        assert result["crossover_epoch"] == expected == data["crossover_epoch"][label]


@pytest.mark.slow
def test_fig3_top30_eigenvalues(tmp_path):
    data = _run("fig3_top30_eigenvalues", tmp_path)
    _png(tmp_path / "fig3_top30_eigenvalues.png")
    values = np.array(data["eigenvalues"], dtype=float)
    assert values.shape == (30,) and np.all(np.isfinite(values))
    assert np.all(np.diff(values) <= 1e-9 * abs(values[0]))
    assert values[0] > 0
    assert data["num_classes"] == 10 and 5_000 < data["num_params"] < 20_000
    assert data["gap_at_num_classes"] == pytest.approx(values[9] / values[10])


@pytest.mark.slow
def test_appendix_c_alignment(tmp_path):
    data = _run("appendix_c_alignment", tmp_path)
    _png(tmp_path / "appendix_c_alignment.png")
    c = data["num_classes"]
    ranks, cosines = data["ranks"], data["assignment_mean_cosine"]
    assert len(ranks) == len(cosines) == len(data["steps"]) > 0
    assert all(c <= r <= 2 * c for r in ranks)
    assert all(0.0 <= v <= 1.0 for v in cosines)
    matrix = np.array(data["final_cosine_matrix"])
    assert matrix.shape == (c, c) and np.all((matrix >= 0) & (matrix <= 1))
    # Each batch's mean matched cosine is the mean of its matched cosines.
    for mean, matched in zip(cosines, data["assignment_cosines"]):
        assert mean == pytest.approx(np.mean(matched))
    # Class gradients are far more aligned with the top eigenvectors than random directions.
    assert data["final_assignment_mean_cosine"] > 5 * data["random_cosine"]


@pytest.mark.slow
def test_adahessian_vs_adam(tmp_path):
    data = _run("adahessian_vs_adam", tmp_path)
    _png(tmp_path / "adahessian_vs_adam.png")
    assert set(data["runs"]) == {"AdaHessian", "Adam", "SGD"}
    for record in data["runs"].values():
        _check_curves(record, epochs=2)
    ratio = data["runs"]["AdaHessian"]["step_seconds"] / data["runs"]["Adam"]["step_seconds"]
    assert data["step_time_ratio_adahessian_over_adam"] == pytest.approx(ratio)


@pytest.mark.slow
def test_pinn_convection(tmp_path):
    data = _run("pinn_convection", tmp_path)
    _png(tmp_path / "pinn_convection_loss.png")
    _png(tmp_path / "pinn_convection_spectrum.png")
    stages = data["stages"]
    assert list(stages) == [
        "initial", "adam", "lbfgs", "nys_newton_cg", "nys_newton_cg_ggn", "lbfgs_continued"
    ]  # fmt: skip
    for stage in stages.values():
        assert _finite([stage["loss"], stage["gradient_norm"], stage["l2re"]])
    # Every stage starts where the previous ended, and none raises the loss.
    assert stages["adam"]["loss"] < stages["initial"]["loss"]
    assert stages["lbfgs"]["loss"] <= stages["adam"]["loss"]
    assert stages["nys_newton_cg"]["loss"] <= stages["lbfgs"]["loss"]
    assert stages["nys_newton_cg_ggn"]["loss"] <= stages["lbfgs"]["loss"]
    assert len(data["nncg_ggn_curve"]) == stages["nys_newton_cg_ggn"]["iterations"]
    assert data["nncg_lowered_loss"] == (stages["nys_newton_cg"]["loss"] < stages["lbfgs"]["loss"])
    curve = data["loss_curve"]
    total = data["args"]["adam_iterations"] + stages["lbfgs"]["iterations"]
    assert len(curve) == total + stages["nys_newton_cg"]["iterations"]
    assert curve[total - 1] == pytest.approx(stages["lbfgs"]["loss"], rel=1e-5)
    # The control L-BFGS run starts from L-BFGS's end and does not raise the loss.
    assert stages["lbfgs_continued"]["loss"] <= stages["lbfgs"]["loss"]
    # Preconditioning brings the largest eigenvalue down (P⁻¹ᐟ² contracts).
    spectrum = data["spectrum"]
    assert spectrum["after"]["largest"] < spectrum["before"]["largest"]
    assert len(spectrum["nystrom_eigenvalues"]) == data["args"]["rank"]
