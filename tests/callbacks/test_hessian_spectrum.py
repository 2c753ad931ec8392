"""HessianSpectrum: logged values against dense oracles, summaries, schedule, errors."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks import HessianSpectrum
from tests.callbacks.conftest import dense_spectrum, read_events, tiny_data, tiny_model

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fit(model, callbacks, epochs=2, x=None, y=None, **compile_kwargs):
    if x is None:
        x, y = tiny_data()
    compile_kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
    model.compile(loss=XENT, **compile_kwargs)
    return model.fit(
        x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks
    )


def test_logged_eigenvalues_and_trace_match_the_dense_hessian():
    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum((x[:32], y[:32]), every_n_epochs=1, tol=1e-10, trace_samples=120)
    history = fit(model, [cb], epochs=2)
    values, _, h = dense_spectrum(model, x[:32], y[:32])
    # Logged at the end of the last epoch: the weights the dense oracle sees.
    assert history.history["top_eigenvalue"][-1] == pytest.approx(values[0], rel=1e-8)
    np.testing.assert_allclose(cb.eigenvalues, values[:3], rtol=1e-8, atol=1e-10)
    # 120 >= 3 dim probes: the Hutch++ sketch spans R^dim and the trace is exact.
    assert history.history["hessian_trace"][-1] == pytest.approx(np.trace(h), rel=1e-8)
    assert len(history.history["top_eigenvalue"]) == 2
    assert cb.k == 3  # default top_k: number of classes


def test_history_and_progress_bar_see_the_values(capsys):
    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer="sgd")
    cb = HessianSpectrum((x, y), every_n_epochs=1)
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=2, callbacks=[cb])
    expected = {"loss", "top_eigenvalue", "hessian_trace", "sharpness", "sharpness_x_lr"}
    assert set(history.history) == expected
    out = capsys.readouterr().out
    assert "top_eigenvalue:" in out and "hessian_trace:" in out and "sharpness_x_lr:" in out
    assert "HessianSpectrum: measures every 1 epoch(s)" in out


def test_summaries_coexist_with_keras_tensorboard(tmp_path, needs_tensorboard):
    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum(
        (x, y), every_n_epochs=1, log_dir=str(tmp_path), density=True, density_steps=10
    )
    history = fit(model, [keras.callbacks.TensorBoard(str(tmp_path)), cb], epochs=2)
    events = read_events(tmp_path / "curvature")
    for i in range(3):
        steps = [step for step, kind, _ in events[f"hessian/eigenvalue_{i + 1}"]]
        assert steps == [0, 1] and events[f"hessian/eigenvalue_{i + 1}"][0][1] == "scalars"
    logged = [float(v) for _, _, v in events["hessian/eigenvalue_1"]]
    np.testing.assert_allclose(logged, history.history["top_eigenvalue"], rtol=1e-6)
    traces = [float(v) for _, _, v in events["hessian/trace"]]
    np.testing.assert_allclose(traces, history.history["hessian_trace"], rtol=1e-6)
    assert {kind for _, kind, _ in events["hessian/spectrum"]} == {"histograms"}
    for tag in ("hessian/eigenvalues", "hessian/density"):
        (step, kind, payload), _ = events[tag]
        assert kind == "images"
        # [width, height, png bytes...]: a decodable PNG.
        assert tf.image.decode_png(payload[2]).shape[-1] == 4
    # Keras's own callback wrote its run next to ours.
    assert os.listdir(tmp_path / "train")


class SummarisingSGD(keras.optimizers.SGD):
    """An optimizer implementing the curvature_summary() protocol."""

    def curvature_summary(self):
        return {"damping": tf.constant(0.25), "eigs": np.array([3.0, 2.0])}


def test_optimizer_summary_mixed_precision_and_jit(tmp_path, needs_tensorboard):
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = tiny_data()
    x = x.astype("float32")
    model = tiny_model(dtype=None)
    model.compile(loss=XENT, optimizer=SummarisingSGD(0.1), jit_compile=True)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    cb = HessianSpectrum((x, y), every_n_epochs=1, log_dir=str(tmp_path))
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert np.isfinite(history.history["top_eigenvalue"][0])
    events = read_events(tmp_path / "curvature")
    assert float(events["optimizer/damping"][0][2]) == 0.25
    assert [float(events[f"optimizer/eigs_{i}"][0][2]) for i in (1, 2)] == [3.0, 2.0]
    assert events["optimizer/eigs"][0][1] == "histograms"


def test_bad_optimizer_summary_raises(tmp_path):
    class Bad(keras.optimizers.SGD):
        def curvature_summary(self):
            return {"matrix": np.eye(2)}

    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer=Bad())
    pytest.importorskip("tensorboard")
    cb = HessianSpectrum((x, y), every_n_epochs=1, log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="only scalars and vectors"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])


def test_every_n_batches_runs_on_the_global_batch_count():
    x, y = tiny_data(n=48)  # 3 batches of 16 per epoch
    model = tiny_model()
    cb = HessianSpectrum((x, y), every_n_epochs=None, every_n_batches=2, trace_samples=3)
    seen = []
    spy = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append("top_eigenvalue" in logs)
    )
    history = fit(model, [cb, spy], epochs=3)
    # Global batches 1..9: measured after 2, 4, 6, 8.
    assert seen == [False, True, False, True, False, True, False, True, False]
    assert "top_eigenvalue" not in history.history


def test_every_n_epochs_schedule():
    x, y = tiny_data()
    cb = HessianSpectrum((x, y), every_n_epochs=2, trace_samples=3)
    history = fit(tiny_model(), [cb], epochs=4)
    assert len(history.history["top_eigenvalue"]) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": None}, "probe data"),
        ({"data": (np.zeros((0, 4)), np.zeros(0))}, "empty"),
        ({"data": (np.zeros((5, 4)), np.zeros(4))}, "rows"),
        ({"data": tf.data.Dataset.from_tensors((np.zeros((2, 4)), [0, 1])).repeat()}, "infinite"),
        ({"top_k": 0}, "top_k"),
        ({"max_overhead": None}, "Nothing is scheduled"),
        ({"max_overhead": 0.0}, "max_overhead"),
        ({"clock": 3.0}, "clock"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"method": "qr"}, "`method` must be one of"),
        ({"trace_samples": 2}, "trace_samples"),
        ({"tol": -1.0}, "tol"),
        ({"batch_size": 0}, "batch_size"),
        # The shared rule: ints refuse bools and floats, numbers refuse bools and non-finite.
        ({"top_k": 2.0}, "`top_k` must be an int >= 1 or None; received top_k=2.0"),
        ({"seed": True}, "`seed` must be an int"),
        ({"every_n_batches": True}, "every_n_batches"),
        ({"density_probes": 1.0}, "density_probes"),
        ({"tol": True}, "`tol` must be a number > 0"),
        ({"max_overhead": float("nan")}, "`max_overhead` must be a number > 0 or None"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    kwargs.setdefault("data", tiny_data())
    with pytest.raises(ValueError, match=match):
        HessianSpectrum(**kwargs)


def test_top_k_above_dim_fails_before_training():
    x, y = tiny_data()
    model = tiny_model()
    before = [v.numpy() for v in model.weights]
    with pytest.raises(ValueError, match="exceeds the number of trainable parameters"):
        fit(model, [HessianSpectrum((x, y), top_k=10_000)])
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())


def test_compiled_loss_function_is_treated_per_sample():
    # A plain function given to compile returns per-sample losses; the callback must
    # average them as Keras does (same top eigenvalue as with the Loss object).
    x, y = tiny_data()

    def xent(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    results = []
    for loss in (xent, XENT):
        model = tiny_model()
        model.compile(loss=loss, optimizer=keras.optimizers.SGD(0.0))
        cb = HessianSpectrum((x, y), every_n_epochs=1, tol=1e-10)
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
        results.append(cb.eigenvalues)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-10)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_tensorboard_server_serves_the_tags(tmp_path, needs_tensorboard):
    x, y = tiny_data()
    cb = HessianSpectrum((x, y), every_n_epochs=1, log_dir=str(tmp_path))
    fit(tiny_model(), [cb], epochs=2)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline and "curvature" not in tags:
            time.sleep(1.0)
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
                with urllib.request.urlopen(url, timeout=5) as response:
                    tags = json.load(response)
            except OSError:
                continue
        assert "curvature" in tags, f"TensorBoard never listed the run; got {tags}"
        expected = {"hessian/eigenvalue_1", "hessian/eigenvalue_3", "hessian/trace"}
        assert expected <= set(tags["curvature"])
        url = f"http://127.0.0.1:{port}/data/plugin/images/tags"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert "hessian/eigenvalues" in json.load(response)["curvature"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_custom_scalars_charts_draw_the_written_tags(tmp_path, needs_tensorboard):
    import re

    from tests.callbacks.test_summaries import _latest_layout

    x, y = tiny_data()
    model = tiny_model()
    cb = HessianSpectrum((x, y), every_n_epochs=1, log_dir=str(tmp_path), blocks="layer")
    fit(model, [cb], epochs=1, optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    _, layout = _latest_layout(tmp_path / "curvature")
    charts = layout["keras-curv: Hessian"]
    tags = set(read_events(tmp_path / "curvature"))
    drawn = {
        title: sorted(t for t in tags if any(re.search(r, t) for r in regexes))
        for title, regexes in charts.items()
    }
    assert drawn["top-3 Hessian eigenvalues"] == [f"hessian/eigenvalue_{i}" for i in (1, 2, 3)]
    sgd = "edge of stability: sharpness λ₁ and its threshold (2/η for SGD)"
    assert drawn[sgd] == ["hessian/sharpness", "hessian/sharpness_threshold"]
    assert len(drawn["per-layer top eigenvalue λ₁(H_BB)"]) == 2
