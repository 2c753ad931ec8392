"""``SubspaceAlignment``: do the class gradients span the top Hessian eigenspace? (Appendix C)"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.data import class_targets
from keras_curv._internal.validation import number
from keras_curv.callbacks._base import CurvatureCallback, eigensolver_args
from keras_curv.callbacks._protocol import optimizer_directions
from keras_curv.curvature.alignment import (
    DEFAULT_RANK_COS_TOL,
    best_assignment,
    combined_rank,
    cosine_matrix,
    gradient_fraction,
    principal_angles,
    subspace_overlap,
)
from keras_curv.curvature.class_gradients import class_gradients_for
from keras_curv.curvature.operators import HessianOperator
from keras_curv.plotting import render_heatmap


def alignment_measures(directions: np.ndarray, eigenvectors: np.ndarray, cos_tol: float) -> dict:
    """The Appendix C measures of ``directions`` (rows) against ``eigenvectors`` (rows)."""
    cosines = cosine_matrix(directions, eigenvectors)
    return {
        "cosines": cosines,
        "angles": principal_angles(directions, eigenvectors),
        "alignment": best_assignment(cosines).mean_cosine,
        "subspace_overlap": subspace_overlap(directions, eigenvectors),
        "combined_rank": float(combined_rank(directions, eigenvectors, cos_tol)),
    }


class SubspaceAlignment(CurvatureCallback):
    r"""Measures how the per-class gradient directions align with the top Hessian eigenvectors.

    At each scheduled point, on a fixed probe set, the callback computes the class
    directions :math:`v_k = c_k / \lVert c_k \rVert` from the per-class mean logit
    gradients :math:`c_k` (eq. 8, :func:`~keras_curv.curvature.class_gradients`), the
    top-``k`` Hessian eigenvectors :math:`e_j` (warm-started Lanczos, default ``k = C``),
    and the probe-set gradient :math:`g = \nabla_\theta \frac1N\sum_\mu w^\mu\ell^\mu`, then

    * the cosine matrix :math:`M_{ij} = |v_i^\top e_j|` and the mean cosine of the best
      one-to-one assignment (Hungarian algorithm): ``logs["alignment"]``;
    * the principal angles between :math:`\operatorname{span}(V)` and
      :math:`\operatorname{span}(E)` and the overlap
      :math:`\lVert Q_V^\top Q_E\rVert_F^2 / C` (mean squared cosine of the angles):
      ``logs["subspace_overlap"]``;
    * the numerical rank of :math:`[v_1..v_C, e_1..e_C]` (eq. 18): ``C`` when the spans
      coincide, ``2C`` when they meet only at zero; a principal angle whose cosine is at
      least ``rank_cos_tol`` counts as shared (see
      :func:`~keras_curv.curvature.combined_rank`): ``logs["combined_rank"]``;
    * the fraction of :math:`\lVert g \rVert^2` in the top eigenspace,
      :math:`\lVert E^\top g\rVert^2 / \lVert g\rVert^2`: ``logs["gradient_fraction"]``.

    If the model's optimizer (unwrapped from a ``LossScaleOptimizer``) defines
    ``class_directions() -> (C, dim)`` (the directions it preconditions, in the flat
    parameter layout), the same measures are computed for those rows against the
    eigenvectors and logged with an ``optimizer_`` prefix; its ``gradient_fraction`` is the
    share of :math:`\lVert g\rVert^2` in the span of the optimizer's directions.

    With ``log_dir``, summaries go to ``<log_dir>/curvature`` (step: the epoch, or the
    global batch count once ``every_n_batches`` is set):

    ===================================  =========  ===================================
    tag                                  kind       content
    ===================================  =========  ===================================
    ``alignment/assignment_cosine``      scalar     ``logs["alignment"]``
    ``alignment/subspace_overlap``       scalar     ``logs["subspace_overlap"]``
    ``alignment/combined_rank``          scalar     ``logs["combined_rank"]``
    ``alignment/gradient_fraction``      scalar     ``logs["gradient_fraction"]``
    ``alignment/principal_angles``       histogram  principal angles in degrees
    ``alignment/cosine_matrix``          image      heatmap of :math:`M`
    ``alignment/optimizer_<same>``       all above  for ``class_directions()``
    ===================================  =========  ===================================

    Like :class:`HessianSpectrum`, it never changes training (stateless forward passes,
    NumPy-seeded probes).

    Args:
        data: Probe set: ``(x, y)``, ``(x, y, sample_weight)`` or a finite
            ``tf.data.Dataset``. ``y`` must be class labels (sparse or one-hot).
        every_n_epochs: Measure at the end of every n-th epoch (``None``: never).
        every_n_batches: Also measure after every n-th training batch (``None``: never).
        log_dir: TensorBoard directory; ``None`` writes nothing.
        top_k: Number of eigenvectors (default: the number of classes C).
        method: Eigensolver for the eigenvectors.
        tol: Relative tolerance of the eigensolver.
        loss: Loss for the Hessian and gradient (default: the compiled loss).
        rank_cos_tol: Principal-angle cosine from which two directions count as one in the
            combined rank (default 0.9, angles below 25.8 degrees).
        batch_size: Rows per probe batch for array data.
        training: Evaluate BatchNorm/Dropout in training mode (statelessly).
        seed: Seed of the eigensolver's random start.

    Raises:
        ValueError: bad data or arguments (at construction); a model that is not a
            ``C``-way classifier, ``top_k`` above the parameter count, no usable loss
            (at ``on_train_begin``).

    Example:
        >>> cb = SubspaceAlignment((x_val[:256], y_val[:256]), log_dir="logs")
        >>> model.fit(x, y, epochs=5, callbacks=[cb]).history["alignment"]
    """

    def __init__(
        self,
        data: Any,
        every_n_epochs: int | None = None,
        every_n_batches: int | None = None,
        log_dir: str | os.PathLike | None = None,
        top_k: int | None = None,
        method: str = "lanczos",
        tol: float = 1e-3,
        loss: Any = None,
        rank_cos_tol: float = DEFAULT_RANK_COS_TOL,
        batch_size: int | None = None,
        training: bool = False,
        seed: int = 0,
        max_overhead: float | None = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ):
        super().__init__(
            data,
            every_n_epochs=every_n_epochs,
            every_n_batches=every_n_batches,
            log_dir=log_dir,
            loss=loss,
            batch_size=batch_size,
            training=training,
            seed=seed,
            max_overhead=max_overhead,
            clock=clock,
        )
        self.top_k, self.method, self.tol = eigensolver_args(top_k, method, tol)
        self.rank_cos_tol = number(
            rank_cos_tol, "rank_cos_tol", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.operator: HessianOperator | None = None
        self.eigenvectors: np.ndarray | None = None
        self.last: dict[str, dict[str, Any]] = {}

    def _check_probe(self, outputs: Any) -> None:
        """Probe targets must be class labels of the model's C classes (sparse or one-hot)."""
        shape = getattr(outputs, "shape", None)
        if shape is not None and shape.rank == 2 and (shape[-1] or 0) >= 2:
            for batch in self.probe.batches:
                try:
                    class_targets(batch.y, int(shape[-1]), tf.float32)
                except ValueError as error:
                    raise ValueError(
                        f"SubspaceAlignment needs class labels as probe targets: {error}"
                    ) from error
        super()._check_probe(outputs)

    def _prepare(self) -> None:
        num_classes = self._num_outputs()
        if num_classes < 2:
            raise ValueError(
                "SubspaceAlignment needs a C-way classifier with a (batch, C) output, C >= 2; "
                f"the model's output has size {num_classes}."
            )
        k = self.top_k if self.top_k is not None else num_classes
        loss = self._resolved_loss()
        self.operator = self._shared_operator(loss)
        if k > self.operator.dim:
            raise ValueError(
                f"`top_k`={k} exceeds the number of trainable parameters ({self.operator.dim}); "
                "ask for at most that many eigenvectors."
            )
        self.k = k
        self.eigenvectors = None
        self._warned_degenerate: set[str] = set()
        self.num_classes = num_classes
        self._class_gradients = class_gradients_for(self.model, self.training)
        if self.writer is not None:
            c = num_classes
            self.writer.add_charts(
                "keras-curv: alignment",
                {
                    f"combined rank of [V, E] ({c}: one span, {2 * c}: disjoint)": [
                        "^alignment/(optimizer_)?combined_rank$"
                    ],
                    "assignment cosine, subspace overlap, gradient fraction": [
                        "^alignment/(optimizer_)?"
                        "(assignment_cosine|subspace_overlap|gradient_fraction)$"
                    ],
                },
            )

    def _expected_products(self) -> tuple[int, int]:
        # Cold Lanczos about 3k products; the class-gradient Jacobian has C rows (C
        # backward passes, about C/2 products) and the gradient one more backward pass.
        return 3 * self.k, self.num_classes // 2 + 1

    def _calibrate(self) -> None:
        super()._calibrate()
        self._class_gradients(None, data=self.probe)
        self.operator.gradient()

    def _warn_degenerate(self, prefix: str) -> None:
        if prefix in self._warned_degenerate:
            return
        self._warned_degenerate.add(prefix)
        source = "optimizer's class directions" if prefix else "class gradients"
        warnings.warn(
            f"SubspaceAlignment: every one of the {source} is zero (a degenerate model, "
            "e.g. dead ReLUs); its alignment measures are logged as NaN.",
            stacklevel=2,
        )

    def _measure(self, step: int) -> dict[str, float]:
        result, _ = self.shared.top_eigenpairs(
            self.k,
            method=self.method,
            tol=self.tol,
            seed=int(self.probe_rng(step).integers(2**31)),
            init=self.eigenvectors,
            model=self.model,
            clock=self.clock,
        )
        self.eigenvectors = result.eigenvectors
        eig_rows = result.eigenvectors.T
        gradient = self.operator.gradient().numpy().astype(np.float64)
        directions = self._class_gradients(None, data=self.probe).numpy()
        groups = {"": directions}
        optimizer_rows = optimizer_directions(self.model, self.operator.dim)
        if optimizer_rows is not None:
            groups["optimizer_"] = optimizer_rows

        values: dict[str, float] = {}
        scalars, histograms, images = {}, {}, {}
        self.last = {}
        for prefix, rows in groups.items():
            if not np.any(np.linalg.norm(rows, axis=1) > 0):
                # A degenerate model (e.g. every ReLU dead) has no class directions: the
                # measures are undefined, and diagnostics must never stop training.
                self._warn_degenerate(prefix)
                for name in ("alignment", "subspace_overlap", "combined_rank", "gradient_fraction"):
                    values[prefix + name] = float("nan")
                continue
            measures = alignment_measures(rows, eig_rows, self.rank_cos_tol)
            # Class gradients: the share of ||g||^2 in the top eigenspace, ||E^T g||^2/||g||^2;
            # optimizer directions: the share in the subspace the optimizer preconditions.
            subspace = rows if prefix else eig_rows
            measures["gradient_fraction"] = gradient_fraction(gradient, subspace)
            self.last[prefix] = measures
            for name in ("alignment", "subspace_overlap", "combined_rank", "gradient_fraction"):
                values[prefix + name] = float(measures[name])
                tag = "assignment_cosine" if name == "alignment" else name
                scalars[f"alignment/{prefix}{tag}"] = measures[name]
            histograms[f"alignment/{prefix}principal_angles"] = np.degrees(measures["angles"])
            if self.writer is not None:
                source = "optimizer direction" if prefix else "class gradient"
                images[f"alignment/{prefix}cosine_matrix"] = render_heatmap(
                    measures["cosines"], f"|cos| at {step}", "eigenvector", source
                )
        if self.writer is not None:
            self.writer.write(step, scalars=scalars, histograms=histograms, images=images)
        return values
