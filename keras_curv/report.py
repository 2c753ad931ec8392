"""PNG reports of the ``keras-curv`` commands (matplotlib, Agg canvas, no pyplot state).

* :func:`demo_report`: one training run: loss and accuracy curves (train and validation),
  the top Hessian eigenvalues and the class-gradient alignment over the epochs, the final
  top-k eigenvalues and the final spectral density; the edge of stability (sharpness and
  preconditioned sharpness against their thresholds), the per-layer top eigenvalues and
  the combined rank of the class gradients and the top eigenvectors.
* :func:`compare_report`: several optimizers on the same data, model and seed: their train
  and validation loss and accuracy curves overlaid (as in Fig. 1 and 2 of the
  class-subspace paper).

The single-plot helpers are the callbacks' own (:func:`~keras_curv.plotting.draw_stem`,
:func:`~keras_curv.plotting.draw_density`), so TensorBoard and the report draw the same
pictures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keras_curv.plotting import agg_figure, draw_density, draw_stem


def _epochs(values: Sequence[float]) -> np.ndarray:
    # Keras's History and the callbacks count epochs from 0; people count them from 1.
    return np.arange(1, len(values) + 1)


def _curves(axes, history: Mapping[str, Sequence[float]], key: str, label: str = "") -> None:
    """Plots ``history[key]`` (train, solid) and ``history["val_" + key]`` (dashed)."""
    prefix = f"{label} " if label else ""
    if key in history:
        line = axes.plot(_epochs(history[key]), history[key], "-o", ms=3, label=f"{prefix}train")
        color = line[0].get_color()
    else:
        color = None
    if f"val_{key}" in history:
        values = history[f"val_{key}"]
        axes.plot(_epochs(values), values, "--s", ms=3, color=color, label=f"{prefix}validation")


def _finish(axes, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if legend and axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def _log_scale_if_wide(axes, values: Any) -> None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 100:
        axes.set_yscale("log")


def demo_report(
    path: str | os.PathLike,
    history: Mapping[str, Sequence[float]],
    eigen_epochs: Sequence[int],
    eigenvalues: Sequence[Sequence[float]],
    alignment: Mapping[str, Sequence[float]],
    alignment_epochs: Sequence[int],
    density: tuple[Any, Any] | None,
    title: str,
    *,
    stability: Mapping[str, Any] | None = None,
    blocks: Mapping[str, Sequence[float]] | None = None,
    combined_rank: tuple[Sequence[float], int] | None = None,
) -> str:
    """Writes the nine-panel report of one training run as a PNG.

    Args:
        path: Output file (``.png``).
        history: ``keras.callbacks.History.history`` (``loss``, ``val_loss``, ``accuracy``,
            ``val_accuracy``; missing keys are skipped).
        eigen_epochs: 0-based epochs at which the eigenvalues were measured.
        eigenvalues: One row of top-k eigenvalues (descending) per entry of ``eigen_epochs``.
        alignment: Series to plot on the alignment panel, name -> values (one per entry of
            ``alignment_epochs``), e.g. ``{"alignment": [...], "subspace_overlap": [...]}``.
        alignment_epochs: 0-based epochs of the alignment measurements.
        density: ``(grid, density)`` of the final spectral density, or ``None``.
        title: Figure title.
        stability: Edge of stability, measured at ``eigen_epochs``: ``{"sharpness": [...],
            "threshold": float | None (2/η-like, for the sharpness),
            "preconditioned": [...] | None, "preconditioned_threshold": float | None}``.
        blocks: Block name -> its top eigenvalue at each of ``eigen_epochs``.
        combined_rank: ``(values at alignment_epochs, C)``; drawn between ``C`` and ``2C``.

    Returns:
        The path written.

    Example:
        >>> demo_report("report.png", history.history, [0, 1], [[5.0, 2.0], [4.0, 1.5]],
        ...             {"alignment": [0.4, 0.6]}, [0, 1], None, "digits")
    """
    figure = agg_figure(15.0, 11.5)
    panels = figure.subplots(3, 3)

    _curves(panels[0, 0], history, "loss")
    _finish(panels[0, 0], "loss", "epoch", "cross-entropy")
    _curves(panels[0, 1], history, "accuracy")
    _finish(panels[0, 1], "accuracy", "epoch", "accuracy")

    axes = panels[0, 2]
    rows = np.asarray(eigenvalues, dtype=np.float64)
    if rows.ndim == 2 and rows.size:
        epochs = np.asarray(eigen_epochs) + 1
        for i in range(rows.shape[1]):
            axes.plot(epochs, rows[:, i], "-o", ms=3, label=f"λ{i + 1}" if i < 3 else None)
        _log_scale_if_wide(axes, rows)
    _finish(axes, "top Hessian eigenvalues", "epoch", "eigenvalue")

    axes = panels[1, 0]
    epochs = np.asarray(alignment_epochs) + 1
    for name, values in alignment.items():
        axes.plot(epochs, values, "-o", ms=3, label=name)
    axes.set_ylim(0.0, 1.05)
    _finish(axes, "class gradients vs top eigenvectors", "epoch", "cosine / overlap")

    if rows.ndim == 2 and rows.size:
        draw_stem(panels[1, 1], rows[-1], f"top-{rows.shape[1]} eigenvalues (final)")
    else:
        _finish(panels[1, 1], "top eigenvalues (not measured)", "rank", "eigenvalue")
    if density is not None:
        draw_density(panels[1, 2], density[0], density[1], "spectral density (final, SLQ)")
    else:
        _finish(panels[1, 2], "spectral density (not measured)", "eigenvalue", "density")

    _stability_panel(panels[2, 0], eigen_epochs, stability)
    axes = panels[2, 1]
    for name, values in (blocks or {}).items():
        axes.plot(np.asarray(eigen_epochs) + 1, values, "-o", ms=3, label=name)
    if blocks:
        _log_scale_if_wide(axes, np.concatenate([np.asarray(v, float) for v in blocks.values()]))
    _finish(axes, "per-layer top eigenvalue λ₁(H_BB)", "epoch", "eigenvalue")
    axes = panels[2, 2]
    if combined_rank is not None:
        values, c = combined_rank
        axes.plot(np.asarray(alignment_epochs) + 1, values, "-o", ms=3, label="combined rank")
        for level, label in ((c, "C: one span"), (2 * c, "2C: disjoint")):
            axes.axhline(level, color="gray", ls=":", lw=1)
            axes.annotate(label, (0.01, level), xycoords=("axes fraction", "data"), fontsize=7)
        axes.set_ylim(c - 0.5, 2 * c + 0.5)
    _finish(axes, "rank of [class gradients, top eigenvectors]", "epoch", "rank", legend=False)

    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    return os.fspath(path)


def _stability_panel(axes, epochs: Sequence[int], stability: Mapping[str, Any] | None) -> None:
    """Sharpness (and the preconditioned sharpness) against their stability thresholds."""
    x = np.asarray(epochs) + 1
    stability = stability or {}
    drawn = []
    for key, threshold_key, label in (
        ("sharpness", "threshold", "λ₁(H)"),
        ("preconditioned", "preconditioned_threshold", "λ₁(P⁻¹H)"),
    ):
        values = stability.get(key)
        if values is None or not len(values):
            continue
        line = axes.plot(x, values, "-o", ms=3, label=label)
        drawn.extend(values)
        threshold = stability.get(threshold_key)
        if threshold is not None:
            color = line[0].get_color()
            axes.axhline(threshold, color=color, ls="--", lw=1, label=f"{label}: threshold")
            drawn.append(threshold)
    if drawn:
        _log_scale_if_wide(axes, drawn)
    _finish(axes, "edge of stability", "epoch", "curvature")


def compare_report(
    path: str | os.PathLike,
    histories: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
    validation_every: int = 1,
) -> str:
    """Writes the overlaid loss and accuracy curves of several optimizers as a PNG.

    Args:
        path: Output file (``.png``).
        histories: Optimizer name -> ``History.history`` of its run.
        title: Figure title.
        validation_every: The runs validated every this many epochs (``validation_freq``).

    Returns:
        The path written.
    """
    figure = agg_figure(12.0, 8.0)
    panels = figure.subplots(2, 2)
    for row, key in enumerate(("loss", "accuracy")):
        for col, prefix in enumerate(("", "val_")):
            axes = panels[row, col]
            for name, history in histories.items():
                values = np.asarray(history.get(prefix + key, []), dtype=np.float64)
                # Keras validates at epochs every, 2 * every, ... with validation_freq=every.
                epochs = _epochs(values) * (validation_every if prefix else 1)
                if values.size:
                    axes.plot(epochs, values, "-o", ms=3, label=name)
            if key == "loss":
                every = [
                    np.asarray(h.get(prefix + key, [np.nan]), float) for h in histories.values()
                ]
                _log_scale_if_wide(axes, np.concatenate(every or [np.zeros(0)]))
            split = "validation" if prefix else "train"
            _finish(axes, f"{split} {key}", "epoch", key)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    return os.fspath(path)
