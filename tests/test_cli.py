import numpy as np

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
