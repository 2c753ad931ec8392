"""The figures of keras-curv: matplotlib on an Agg canvas, no pyplot state.

The same pictures reach TensorBoard (:func:`render_stem`, :func:`render_density`,
:func:`render_heatmap` return image arrays for ``tf.summary.image``) and the PNG reports
of :mod:`keras_curv.report` (:func:`draw_stem` and :func:`draw_density` draw them on
given axes of an :func:`agg_figure`).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import tensorflow as tf


def agg_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib ``Figure`` of ``width x height`` inches on its own Agg canvas."""
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, and it
    # works headless whatever backend the user selected.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _figure(width: float = 5.0, height: float = 3.2):
    figure = agg_figure(width, height)
    return figure, figure.add_subplot(1, 1, 1)


def _to_image(figure) -> np.ndarray:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return tf.image.decode_png(buffer.getvalue(), channels=4).numpy()


def render_stem(values: Any, title: str, ylabel: str = "eigenvalue") -> np.ndarray:
    """A stem plot of ``values`` against their 1-based rank, as a ``(h, w, 4)`` uint8 image."""
    figure, axes = _figure()
    draw_stem(axes, values, title, ylabel)
    return _to_image(figure)


def draw_stem(axes, values: Any, title: str, ylabel: str = "eigenvalue") -> None:
    """Draws the stem plot of :func:`render_stem` on matplotlib ``axes``."""
    values = np.asarray(values, dtype=np.float64)
    ranks = np.arange(1, len(values) + 1)
    axes.stem(ranks, values, basefmt="k-")
    axes.set_xlabel("rank")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)


def render_density(grid: Any, density: Any, title: str) -> np.ndarray:
    """The spectral density on a log scale (as it spans orders of magnitude), as an image."""
    figure, axes = _figure()
    draw_density(axes, grid, density, title)
    return _to_image(figure)


def draw_density(axes, grid: Any, density: Any, title: str) -> None:
    """Draws the log-scale density of :func:`render_density` on matplotlib ``axes``."""
    density = np.maximum(np.asarray(density, dtype=np.float64), 1e-12)
    axes.semilogy(np.asarray(grid), density)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.grid(alpha=0.3)


def render_heatmap(matrix: Any, title: str, xlabel: str, ylabel: str) -> np.ndarray:
    """A ``[0, 1]`` heatmap of ``matrix`` with a colour bar, as an image."""
    matrix = np.asarray(matrix, dtype=np.float64)
    figure, axes = _figure(4.6, 4.0)
    shown = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    figure.colorbar(shown, ax=axes)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    return _to_image(figure)
