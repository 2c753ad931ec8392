import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from keras_curv import cli


def test_spectrum_reports_sorted_eigenvalues_and_costs(capsys):
    args = cli._parser().parse_args(
        ["spectrum", "--epochs", "1", "--probe-size", "128", "--top-k", "3", "--trace-samples", "9"]
    )
    result = cli.run_spectrum(args)
    values = np.array(result["eigenvalues"])
    assert values.shape == (3,) and np.all(np.diff(values) <= 0) and values[0] > 0
    # The trace bounds the sum of the top eigenvalues of a Hessian whose bulk is small.
    assert result["trace"] > 0 and result["num_hvps"] >= 9
    out = capsys.readouterr().out
    assert "Top 3 eigenvalues" in out and "Trace (Hutch++" in out


def test_unavailable_tfds_dataset_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import keras_curv.data.datasets as datasets

    real = datasets.load_dataset
    monkeypatch.setattr(
        "keras_curv.data.load_dataset",
        lambda name, **kw: real(name, **{**kw, "download": False}),
    )
    code = cli.main(["spectrum", "--dataset", "mnist", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "digits" in err


# demo and compare ----------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def _tags(directory: Path) -> set[str]:
    from tensorflow.compat.v1.train import summary_iterator

    tags = set()
    for events in directory.glob("events.out.tfevents.*"):
        for event in summary_iterator(str(events)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def _only_run(base: Path) -> Path:
    runs = [p for p in base.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_demo_writes_report_tensorboard_logs_and_summary(tmp_path, capsys):
    # --every 2 over 2 epochs: one measurement, at the last epoch (0-based index 1).
    argv = ["demo", "--epochs", "2", "--every", "2", "--max-train", "256", "--max-test", "100"]
    argv += ["--probe-size", "64", "--logdir", str(tmp_path)]
    result = cli.run_demo(cli._parser().parse_args(argv))
    run = _only_run(tmp_path)
    assert result["log_dir"] == str(run) and result["report"] == str(run / "report.png")
    width, height = _png_size(run / "report.png")
    assert width >= 1000 and height >= 600 and (run / "report.png").stat().st_size > 20_000

    assert result["eigen_epochs"] == [1]
    values = np.array(result["eigenvalues"][0])
    assert values.shape == (10,) and np.all(np.diff(values) <= 1e-6 * abs(values[0]))
    assert len(result["history"]["loss"]) == 2
    assert result["alignment"] and all(len(v) == 1 for v in result["alignment"].values())

    curvature = _tags(run / "curvature")
    assert {"hessian/eigenvalue_1", "hessian/eigenvalue_10", "hessian/trace"} <= curvature
    assert {"alignment/assignment_cosine", "alignment/subspace_overlap"} <= curvature
    assert {"hessian/eigenvalues", "hessian/density"} <= curvature  # images
    # The research views: edge of stability, the optimizer's curvature model, per-layer
    # spectra, the combined rank, and the custom-scalars layout that charts them.
    assert {"hessian/sharpness", "hessian/preconditioned_sharpness"} <= curvature
    assert {"hessian/preconditioned_threshold", "curvature_model/overlap"} <= curvature
    # Keras numbers layer names by what ran before in the process (dense, dense_3, ...).
    first_layer = re.compile(r"blocks/dense(_\d+)?/(top_eigenvalue|trace)$")
    assert len({tag.rsplit("/", 1)[1] for tag in curvature if first_layer.match(tag)}) == 2
    assert {"alignment/combined_rank", "custom_scalars__config__"} <= curvature
    measured = result["measurements"]
    assert np.isfinite(measured["preconditioned_sharpness"][0])
    # With its tolerance the rank carries information: below 2C in real training (the
    # exact rank was 2C = 20 at every epoch).
    assert 10 <= measured["combined_rank"][0] < 20
    assert {"epoch_loss", "epoch_accuracy", "epoch_top_eigenvalue"} <= _tags(run / "train")
    assert {"epoch_loss", "epoch_accuracy"} <= _tags(run / "validation")

    out = capsys.readouterr().out
    assert f"TensorBoard logs: {run}" in out
    assert f"tensorboard --logdir {run}" in out
    assert "Final accuracy: train" in out


@pytest.mark.slow
def test_compare_writes_json_png_and_one_tensorboard_run_per_optimizer(tmp_path, capsys):
    code = cli.main(
        [
            "compare",
            "--epochs",
            "2",
            "--max-train",
            "128",
            "--max-test",
            "64",
            "--logdir",
            str(tmp_path),
        ]
    )
    assert code == 0
    run = _only_run(tmp_path)
    summary = json.loads((run / "compare.json").read_text())
    assert list(summary["optimizers"]) == list(cli.COMPARE_DEFAULT)
    for name, result in summary["optimizers"].items():
        numbers = [result["wall_seconds"], result["seconds_per_step"], result["learning_rate"]]
        numbers += list(result["final"].values())
        assert all(isinstance(v, float) and math.isfinite(v) for v in numbers), (name, result)
        assert 0 <= result["final"]["val_accuracy"] <= 1
        assert len(result["history"]["loss"]) == 2
        assert 0 < result["seconds_per_step"] < result["wall_seconds"]
        assert {"epoch_loss", "epoch_accuracy"} <= _tags(run / name / "train")
        assert {"epoch_loss"} <= _tags(run / name / "validation")
    width, height = _png_size(run / "compare.png")
    assert width >= 800 and height >= 600
    out = capsys.readouterr().out
    for name in cli.COMPARE_DEFAULT:
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert f"tensorboard --logdir {run}" in out


def test_compare_subset_and_validation_every(tmp_path, capsys):
    result = cli.run_compare(
        cli._parser().parse_args(
            [
                "compare",
                "--optimizers",
                "adam,sgd",
                "--epochs",
                "2",
                "--every",
                "2",
                "--max-train",
                "100",
                "--max-test",
                "50",
                "--logdir",
                str(tmp_path),
            ]
        )
    )
    assert list(result["optimizers"]) == ["adam", "sgd"]
    history = result["optimizers"]["adam"]["history"]
    assert len(history["loss"]) == 2 and len(history["val_loss"]) == 1
    assert Path(result["json"]).is_file() and Path(result["report"]).is_file()


def test_compare_offers_both_sophia_presets(tmp_path):
    argv = ["compare", "--optimizers", "sophia-h,sophia-g", "--epochs", "1"]
    argv += ["--max-train", "256", "--max-test", "64", "--logdir", str(tmp_path)]
    result = cli.run_compare(cli._parser().parse_args(argv))
    assert list(result["optimizers"]) == ["sophia-h", "sophia-g"]
    for name, run in result["optimizers"].items():
        assert run["learning_rate"] == 3e-3
        assert math.isfinite(run["final"]["loss"]), (name, run)
        assert run["final"]["loss"] < math.log(10), (name, run)  # below chance after 8 steps


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--epochs", "0"],
        ["demo", "--every", "-1"],
        ["demo", "--batch-size", "x"],
        ["demo", "--learning-rate", "0"],
        ["demo", "--learning-rate", "nan"],
        ["demo", "--dataset", "imagenet"],
        ["demo", "--optimizer", "bfgs"],
        ["compare", "--optimizers", "sgd,bfgs"],
        ["compare", "--optimizers", ","],
    ],
)
def test_bad_options_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_unavailable_dataset_exits_2_with_one_line(command, tmp_path, capsys, monkeypatch):
    import keras_curv.data.datasets as datasets

    real = datasets.load_dataset
    monkeypatch.setattr(
        "keras_curv.data.load_dataset",
        lambda name, **kw: real(name, **{**kw, "download": False}),
    )
    code = cli.main(
        [
            command,
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "tfds"),
            "--logdir",
            str(tmp_path / "runs"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "digits" in err and "mnist1d" in err
    assert not (tmp_path / "runs").exists()  # nothing half-written


@pytest.mark.slow
def test_compare_offers_the_full_batch_solvers(tmp_path):
    argv = ["compare", "--optimizers", "lbfgs,nys-newton-cg,levenberg-marquardt", "--epochs",
            "2", "--max-train", "128", "--batch-size", "128", "--max-test", "64", "--logdir",
            str(tmp_path)]  # fmt: skip
    result = cli.run_compare(cli._parser().parse_args(argv))
    assert list(result["optimizers"]) == ["lbfgs", "nys-newton-cg", "levenberg-marquardt"]
    for name, record in result["optimizers"].items():
        losses = record["history"]["loss"]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), name
        assert record["learning_rate"] == 1.0


def test_compare_offers_shampoo(tmp_path):
    args = ["compare", "--optimizers", "shampoo,adam", "--epochs", "1", "--max-train", "256",
            "--max-test", "64", "--logdir", str(tmp_path)]  # fmt: skip
    result = cli.run_compare(cli._parser().parse_args(args))
    shampoo = result["optimizers"]["shampoo"]
    assert shampoo["learning_rate"] == 3e-3
    assert math.isfinite(shampoo["final"]["loss"])
    assert shampoo["history"]["loss"][0] < 2.4  # ln 10 ≈ 2.30 at chance
