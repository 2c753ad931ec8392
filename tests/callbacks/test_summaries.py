"""CurvatureWriter on its own: tags, steps, kinds and values in the ``curvature`` run."""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_curv.callbacks.summaries import CurvatureWriter
from keras_curv.plotting import render_stem
from tests.callbacks.conftest import read_events


def test_writes_scalars_histograms_and_images(tmp_path, needs_tensorboard):
    writer = CurvatureWriter(tmp_path)
    assert writer.path == os.path.join(str(tmp_path), "curvature")
    image = render_stem([3.0, 1.0], "t")
    # A recording condition set by keras.callbacks.TensorBoard must not silence it.
    with tf.summary.record_if(False):
        writer.write(
            7,
            scalars={"hessian/trace": np.float32(2.5)},
            histograms={"hessian/spectrum": [[3.0, 1.0]]},
            images={"hessian/eigenvalues": image},
        )
    writer.write(9, scalars={"hessian/trace": 4})
    writer.close()
    writer.close()  # closing twice is harmless
    events = read_events(writer.path)
    assert set(events) == {"hessian/trace", "hessian/spectrum", "hessian/eigenvalues"}
    assert [(step, kind, float(v)) for step, kind, v in events["hessian/trace"]] == [
        (7, "scalars", 2.5),
        (9, "scalars", 4.0),
    ]
    [(step, kind, buckets)] = events["hessian/spectrum"]
    assert (step, kind) == (7, "histograms")
    assert buckets[:, 2].sum() == 2  # both values, flattened
    [(step, kind, payload)] = events["hessian/eigenvalues"]
    assert (step, kind) == (7, "images")
    decoded = tf.image.decode_png(payload[2]).numpy()
    np.testing.assert_array_equal(decoded, image)


def test_reopens_after_close(tmp_path, needs_tensorboard):
    writer = CurvatureWriter(tmp_path)
    writer.write(0, scalars={"a": 1.0})
    writer.close()
    writer.write(1, scalars={"a": 2.0})
    writer.close()
    steps = sorted(step for step, _, _ in read_events(writer.path)["a"])
    assert steps == [0, 1]


def test_missing_tensorboard_fails_at_construction(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ImportError, match=r"pip install 'keras-curv\[tensorboard\]'"):
        CurvatureWriter(tmp_path)


def _latest_layout(directory):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    events = read_events(directory)
    step, kind, payload = events[metadata.CONFIG_SUMMARY_TAG][-1]
    assert kind == metadata.PLUGIN_NAME
    layout = layout_pb2.Layout()
    layout.ParseFromString(payload.item())
    return step, {
        c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category
    }


def test_custom_scalars_layout_merges_every_writer_of_a_log_dir(tmp_path, needs_tensorboard):
    first, second = CurvatureWriter(tmp_path), CurvatureWriter(tmp_path)
    first.add_charts("A", {"top": [r"^hessian/eigenvalue_\d+$"]})
    first.write(0, scalars={"hessian/eigenvalue_1": 1.0})
    second.add_charts("B", {"rank": ["^alignment/combined_rank$"]})
    second.write(0, scalars={"alignment/combined_rank": 4.0})
    first.write(1, scalars={"hessian/eigenvalue_1": 2.0})  # sees B: writes the merged layout
    first.write(2, scalars={"hessian/eigenvalue_1": 3.0})  # unchanged: not rewritten
    first.close(), second.close()
    # Two event files in the run; the last layout of each holds both callbacks' charts.
    _, layout = _latest_layout(first.path)
    assert layout == {
        "A": {"top": [r"^hessian/eigenvalue_\d+$"]},
        "B": {"rank": ["^alignment/combined_rank$"]},
    }
    from tensorboard.plugins.custom_scalar import metadata

    assert len(read_events(first.path)[metadata.CONFIG_SUMMARY_TAG]) == 3
