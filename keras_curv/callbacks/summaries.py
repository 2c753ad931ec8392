"""TensorBoard summaries of the diagnostic callbacks: one ``tf.summary`` run, ``curvature``."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

SUBDIR = "curvature"


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
