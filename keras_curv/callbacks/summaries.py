"""TensorBoard summaries of the diagnostic callbacks: one ``tf.summary`` run, ``curvature``.

Besides scalars, histograms and images, the run holds a *custom-scalars layout*
(TensorBoard's ``custom_scalar`` plugin, the "Custom Scalars" dashboard): charts that draw
several tags together, e.g. the top-k eigenvalues as one multi-line chart, or the
sharpness beside its edge-of-stability threshold. Every callback writing to the same
``log_dir`` adds its charts to one layout (:meth:`CurvatureWriter.add_charts`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

SUBDIR = "curvature"

# The custom-scalars charts of each log directory, shared by all its writers (the plugin
# reads one layout per run: the latest written).
_LAYOUTS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}


class CurvatureWriter:
    """Writes summaries to ``<log_dir>/curvature``, its own TensorBoard run.

    The subdirectory keeps these summaries apart from ``keras.callbacks.TensorBoard``'s
    ``train``/``validation`` runs in the same ``log_dir``. Writing is forced on with
    ``tf.summary.record_if(True)``, because the Keras callback may have installed a
    recording condition for its own batch-level summaries.

    Args:
        log_dir: The TensorBoard directory; summaries go to its ``curvature`` subdirectory.

    Raises:
        ImportError: the tensorboard package is missing (``tf.summary`` would be a stub).

    Example:
        >>> writer = CurvatureWriter("logs")
        >>> writer.write(3, scalars={"hessian/trace": 12.5})
        >>> writer.close()
    """

    def __init__(self, log_dir: str | os.PathLike):
        # tf.summary is only a stub without the tensorboard package: fail now, not mid-fit.
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "Writing TensorBoard summaries (`log_dir=`) needs the tensorboard package: "
                "pip install 'keras-curv[tensorboard]' (or pip install tensorboard)."
            )
        self.path = os.path.join(os.fspath(log_dir), SUBDIR)
        self._writer = None
        self._layout_written: dict | None = None

    def add_charts(self, category: str, charts: Mapping[str, Any]) -> None:
        """Adds multi-line charts to the custom-scalars layout; written with the next step.

        Args:
            category: The dashboard section, e.g. ``"keras-curv: Hessian"``.
            charts: Chart title -> regular expressions of the tags it draws (TensorBoard
                matches them with ``re.search``).
        """
        layout = _LAYOUTS.setdefault(os.path.abspath(self.path), {})
        section = layout.setdefault(category, {})
        for title, tags in charts.items():
            section[title] = tuple(tags)

    def _layout_summary(self) -> bytes | None:
        """The layout as a serialised ``Summary`` if it changed since this writer wrote it."""
        layout = _LAYOUTS.get(os.path.abspath(self.path))
        if not layout or layout == self._layout_written:
            return None
        from tensorboard.plugins.custom_scalar import layout_pb2
        from tensorboard.plugins.custom_scalar import summary as custom_scalar

        proto = layout_pb2.Layout(
            category=[
                layout_pb2.Category(
                    title=category,
                    chart=[
                        layout_pb2.Chart(
                            title=title,
                            multiline=layout_pb2.MultilineChartContent(tag=list(tags)),
                        )
                        for title, tags in charts.items()
                    ],
                )
                for category, charts in layout.items()
            ]
        )
        self._layout_written = {k: dict(v) for k, v in layout.items()}
        return custom_scalar.pb(proto).SerializeToString()

    def write(
        self,
        step: int,
        scalars: Mapping[str, float] = (),
        histograms: Mapping[str, Any] = (),
        images: Mapping[str, np.ndarray] = (),
    ) -> None:
        """Writes one step's summaries and flushes them to disk.

        Args:
            step: The summary step.
            scalars: Tag -> number.
            histograms: Tag -> array of values (flattened).
            images: Tag -> ``(h, w, channels)`` uint8 image.
        """
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.path)
        with self._writer.as_default(step=int(step)), tf.summary.record_if(True):
            layout = self._layout_summary()
            if layout is not None:
                # At the current step, so the latest layout is the one TensorBoard reads.
                tf.summary.experimental.write_raw_pb(layout, step=int(step))
            for tag, value in dict(scalars).items():
                tf.summary.scalar(tag, float(value))
            for tag, values in dict(histograms).items():
                tf.summary.histogram(tag, np.asarray(values, dtype=np.float64).reshape(-1))
            for tag, image in dict(images).items():
                tf.summary.image(tag, image[None])
        self._writer.flush()

    def close(self) -> None:
        """Closes the event file (the next :meth:`write` opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
