"""``HessianSpectrum``: the top of the Hessian spectrum and its trace, tracked during ``fit``."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.flat import variable_ranges
from keras_curv._internal.optimizer import model_optimizer
from keras_curv._internal.validation import choice, integer
from keras_curv.callbacks._base import CurvatureCallback, eigensolver_args
from keras_curv.callbacks._keras_adapters import learning_rate
from keras_curv.callbacks._protocol import (
    optimizer_curvature_model,
    optimizer_preconditioning,
    optimizer_summary,
)
from keras_curv.callbacks._spectrum_parts import (
    BlockSpectra,
    curvature_model_quality,
    preconditioned_sharpness,
    resolve_blocks,
)
from keras_curv.curvature.eigensolvers import top_eigenpairs
from keras_curv.curvature.estimators import hutchinson_trace
from keras_curv.curvature.operators import GGNOperator, HessianOperator, LinearOperator
from keras_curv.curvature.spectral_density import spectral_density
from keras_curv.plotting import render_density, render_stem


class HessianSpectrum(CurvatureCallback):
    r"""Logs the top-``k`` Hessian eigenvalues, the trace and what they say about training.

    At each scheduled point the callback measures, on a fixed probe set,

    * the ``top_k`` largest eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k` of
      :math:`H = \nabla^2_\theta \frac{1}{N}\sum_\mu w^\mu \ell^\mu`, with
      :func:`~keras_curv.curvature.top_eigenpairs` warm-started from the previous
      eigenvectors (the spectrum moves slowly, so later calls need few products);
    * :math:`\operatorname{tr}(H)` by Hutch++ with ``trace_samples`` products;
    * with ``edge_of_stability`` (default): the sharpness :math:`\lambda_1` against the
      optimizer's stability threshold (:math:`2/\eta`, :math:`(2 + 2\mu)/\eta` for
      heavy-ball momentum), and for a preconditioned optimizer (Keras's Adam, AdamW,
      RMSprop; AdaHessian, ClassSubspaceNewton; anything with ``preconditioner()``) the
      preconditioned sharpness :math:`\lambda_1(P^{-1}H)`, by Lanczos on
      :math:`P^{-1/2} H P^{-1/2}` (about 20 more products);
    * with ``curvature_model`` (default) and an optimizer that has ``curvature_model()``
      (AdaHessian's diagonal, ClassSubspaceNewton's class subspace): how that model
      :math:`M` compares with the true curvature :math:`T`, the Hessian :math:`H` or,
      with ``curvature_reference="gauss_newton"``, the Gauss–Newton matrix :math:`G`
      (Rayleigh quotients :math:`u_i^\top M u_i` along the top eigenvectors of
      :math:`T`, overlap of its top-``k`` subspace with theirs, and
      :math:`\lVert (M - T)Z\rVert_F / \lVert TZ\rVert_F` on ``model_probes``
      Rademacher probes);
    * with ``blocks``: the top eigenvalue and the trace of each block's Hessian
      :math:`H_{BB}`, a layer's or a group of variables': Lanczos on the Hessian
      restricted to the block (no sub-matrix is formed, nothing traced again) and the
      block's share of the Hutch++ trace estimate (no extra product);
    * optionally (``density=True``) the spectral density by stochastic Lanczos quadrature.

    Keys set in ``logs`` at the end of each scheduled epoch (and batch, with
    ``every_n_batches``), so they show in the progress bar and in ``History``:
    ``top_eigenvalue`` (:math:`\lambda_1`), ``hessian_trace``; ``sharpness``
    (:math:`\lambda_1`, the edge-of-stability name), ``sharpness_x_lr``
    (:math:`\eta\lambda_1`), ``preconditioned_sharpness``; ``curvature_model_rayleigh_ratio``
    (mean of :math:`u_i^\top M u_i/\lambda_i`), ``curvature_model_overlap``,
    ``curvature_model_relative_error``; ``<block>_top_eigenvalue`` and ``<block>_trace``;
    ``ggn_top_eigenvalue`` with the Gauss–Newton reference.
    On unscheduled epochs the keys are absent.

    One :class:`~keras_curv.curvature.HessianOperator` is built at ``on_train_begin`` and
    reused: it reads the current weights at every product and is traced once. Products use
    a stateless forward pass and random probes come from ``numpy.random.default_rng((seed,
    step))`` (the same at a step whether or not the fit was interrupted and resumed), and
    the optimizer's state is only read, so the callback never changes weights, optimizer
    state, BatchNorm statistics or any Keras/TensorFlow random stream: training is
    bit-for-bit the same with or without it.

    With ``log_dir``, TensorBoard summaries go to ``<log_dir>/curvature`` (a run of its
    own, so ``keras.callbacks.TensorBoard`` can share ``log_dir``), with a custom-scalars
    layout that draws the top-k eigenvalues as one chart, the sharpness beside its
    threshold, the per-layer values and the curvature model's Rayleigh quotients beside
    the eigenvalues (``docs/tensorboard.md``):

    =====================================  ===========  =====================================
    tag                                    kind         content
    =====================================  ===========  =====================================
    ``hessian/eigenvalue_i``               scalar       :math:`\lambda_i`, ``i = 1..top_k``
    ``hessian/trace``                      scalar       Hutch++ estimate of tr H
    ``hessian/trace_std_error``            scalar       its standard error
    ``hessian/num_matvecs``                scalar       products spent at this step
    ``hessian/sharpness[_threshold]``      scalar       :math:`\lambda_1`; :math:`2/\eta` for SGD
    ``hessian/preconditioned_sharpness``   scalar       :math:`\lambda_1(P^{-1}H)`
    ``hessian/preconditioned_threshold``   scalar       its threshold (38/η for Adam)
    ``curvature_model/rayleigh_i``         scalar       :math:`u_i^\top M u_i`
    ``curvature_model/ggn_eigenvalue_i``   scalar       :math:`\lambda_i(G)` (GGN reference)
    ``curvature_model/<measure>``          scalar       ``overlap``, ``relative_error``, ...
    ``blocks/<block>/top_eigenvalue``      scalar       :math:`\lambda_1(H_{BB})`
    ``blocks/<block>/trace``               scalar       :math:`\operatorname{tr}(H_{BB})`
    ``hessian/spectrum``                   histogram    the ``top_k`` eigenvalues
    ``hessian/eigenvalues``                image        stem plot of eigenvalue against rank
    ``hessian/density``                    image        SLQ density (``density=True`` only)
    ``optimizer/<name>[_i]``               scalar/hist  the optimizer's ``curvature_summary()``
    =====================================  ===========  =====================================

    The step is the epoch index, or the global batch count once ``every_n_batches`` is set.
    What is read from the optimizer is the optimizer protocol of
    :mod:`~keras_curv.callbacks._protocol` (``docs/callbacks.md``).

    Args:
        data: Probe set: ``(x, y)``, ``(x, y, sample_weight)`` or a finite
            ``tf.data.Dataset`` of such tuples. Validated at construction.
        top_k: Number of eigenvalues (default: the size of the model's output, i.e. the
            number of classes C of a classifier). At most the number of parameters.
        every_n_epochs: Measure at the end of every n-th epoch (``None``: never).
        every_n_batches: Also measure after every n-th training batch (``None``: never).
        method: Eigensolver: ``"lanczos"`` (default), ``"nystrom"`` or ``"power"``.
        log_dir: TensorBoard directory; ``None`` writes nothing.
        loss: Loss to differentiate (default: the model's compiled loss).
        tol: Relative tolerance of the eigensolver.
        trace_samples: Hutch++ products for the trace (at least 3).
        density: Also estimate and plot the spectral density (TensorBoard only).
        density_steps: Lanczos steps per SLQ probe.
        density_probes: Number of SLQ probes.
        batch_size: Rows per probe batch for array data.
        training: Evaluate BatchNorm/Dropout in training mode (statelessly).
        seed: Seed of all random probes.
        max_overhead: The overhead budget of the default schedule (fraction of training
            time); ``None`` needs a fixed schedule.
        clock: Returns seconds, for the budget.
        blocks: ``None``; ``"layer"`` (each of ``model.layers`` with trainable weights);
            a list of layer names; or a dict block name -> layer names and/or variables.
        edge_of_stability: Log the sharpness and, for preconditioned optimizers, the
            preconditioned sharpness.
        curvature_model: Compare the optimizer's ``curvature_model()`` with the Hessian.
        model_probes: Rademacher probes (Hessian products) for its relative error.
        curvature_reference: What the curvature model is compared with: ``"hessian"``
            (default; no extra eigensolve) or ``"gauss_newton"``, the generalised
            Gauss–Newton matrix of the probe set (what K-FAC, Sophia-G, SketchySGD's
            Gauss–Newton sketch and ClassSubspaceNewton's ``"gauss_newton"`` curvature
            model), at the cost of a top-``k`` Lanczos on it.

    Raises:
        ValueError: bad data or arguments (at construction); ``top_k`` larger than the
            number of parameters, an unknown layer in ``blocks``, or no usable loss (at
            ``on_train_begin``).

    Example:
        >>> cb = HessianSpectrum((x_val[:256], y_val[:256]), blocks="layer", log_dir="logs")
        >>> history = model.fit(x, y, epochs=5, callbacks=[cb])
        >>> history.history["top_eigenvalue"], history.history["sharpness_x_lr"]
    """

    def __init__(
        self,
        data: Any,
        top_k: int | None = None,
        every_n_epochs: int | None = None,
        every_n_batches: int | None = None,
        method: str = "lanczos",
        log_dir: str | os.PathLike | None = None,
        loss: Any = None,
        tol: float = 1e-3,
        trace_samples: int = 30,
        density: bool = False,
        density_steps: int = 40,
        density_probes: int = 2,
        batch_size: int | None = None,
        training: bool = False,
        seed: int = 0,
        max_overhead: float | None = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        *,
        blocks: Any = None,
        edge_of_stability: bool = True,
        curvature_model: bool = True,
        model_probes: int = 4,
        curvature_reference: str = "hessian",
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
        self.trace_samples = integer(trace_samples, "trace_samples", minimum=3)
        self.density = bool(density)
        self.density_steps = integer(density_steps, "density_steps", minimum=1)
        self.density_probes = integer(density_probes, "density_probes", minimum=1)
        self.blocks = blocks
        self.edge_of_stability = bool(edge_of_stability)
        self.curvature_model = bool(curvature_model)
        self.model_probes = integer(model_probes, "model_probes", minimum=1)
        self.curvature_reference = choice(
            curvature_reference, "curvature_reference", ("hessian", "gauss_newton")
        )
        self.reference: LinearOperator | None = None
        self._reference_vectors: np.ndarray | None = None
        self.operator: HessianOperator | None = None
        self.eigenvectors: np.ndarray | None = None
        self.eigenvalues: np.ndarray | None = None
        self.block_spectra: BlockSpectra | None = None
        self._preconditioned_vector: np.ndarray | None = None
        self._warned_preconditioner = False

    def _prepare(self) -> None:
        k = self.top_k if self.top_k is not None else self._num_outputs()
        loss = self._resolved_loss()
        self.operator = self._shared_operator(loss)
        if k > self.operator.dim:
            raise ValueError(
                f"`top_k`={k} exceeds the number of trainable parameters ({self.operator.dim}); "
                "ask for at most that many eigenvalues."
            )
        self.k = k
        self.eigenvectors = None
        self.reference, self._reference_vectors = self.operator, None
        if self.curvature_model and self.curvature_reference == "gauss_newton":
            self.reference = GGNOperator(
                self.model,
                loss,
                self.x,
                self.y,
                sample_weight=self.sample_weight,
                training=self.training,
                batch_size=self.batch_size,
            )
        self._preconditioned_vector = None
        groups = resolve_blocks(self.model, self.blocks)
        every = list(self.model.trainable_variables)
        self.block_spectra = None
        if groups:
            ranges = {name: variable_ranges(every, block) for name, block in groups.items()}
            self.block_spectra = BlockSpectra(self.operator, ranges, self.method, self.tol)
        if self.writer is not None:
            self.writer.add_charts("keras-curv: Hessian", self._charts(groups))

    def _charts(self, groups: dict) -> dict[str, list[str]]:
        """The custom-scalars charts of this callback (tags that may never appear are harmless)."""
        reference = r"^hessian/eigenvalue_\d+$"
        if self.reference is not self.operator:
            reference = r"^curvature_model/ggn_eigenvalue_\d+$"
        charts = {
            f"top-{self.k} Hessian eigenvalues": [r"^hessian/eigenvalue_\d+$"],
            "edge of stability: sharpness λ₁ and its threshold (2/η for SGD)": [
                "^hessian/sharpness$",
                "^hessian/sharpness_threshold$",
            ],
            "edge of stability: preconditioned sharpness λ₁(P⁻¹H) and its threshold": [
                "^hessian/preconditioned_sharpness$",
                "^hessian/preconditioned_threshold$",
            ],
            "curvature model: Rayleigh quotients uᵢᵀMuᵢ beside λᵢ": [
                reference,
                r"^curvature_model/rayleigh_\d+$",
            ],
            "curvature model: overlap, relative error, Rayleigh ratio": [
                "^curvature_model/(overlap|relative_error|rayleigh_ratio)$"
            ],
        }
        if groups:
            charts["per-layer top eigenvalue λ₁(H_BB)"] = [r"^blocks/.*/top_eigenvalue$"]
            charts["per-layer trace tr(H_BB)"] = [r"^blocks/.*/trace$"]
        return charts

    def _calibrate(self) -> None:
        super()._calibrate()
        if self.block_spectra is not None:
            self.block_spectra.calibrate()
        if self.reference is not self.operator:
            self.reference.matvec(tf.ones([self.reference.dim], self.reference.dtype)).numpy()

    def _expected_products(self) -> tuple[int, int]:
        # A cold top-k Lanczos to tol=1e-3 took about 3k products on the benchmark CNN; a
        # preconditioned one for λ₁ about 20, the curvature-model probes one each.
        other = self.trace_samples + (self.model_probes if self.curvature_model else 0)
        if self.reference is not self.operator:  # a top-k Lanczos on G, warm after the first
            other += 3 * self.k
        other += 20 if self.edge_of_stability else 0
        if self.block_spectra is not None:
            other += self.block_spectra.expected_products()
        return 3 * self.k, other

    def _measure(self, step: int) -> dict[str, float]:
        op = self.operator
        start = op.num_matvecs
        rng = self.probe_rng(step)
        result, _ = self.shared.top_eigenpairs(
            self.k,
            method=self.method,
            tol=self.tol,
            seed=int(rng.integers(2**31)),
            init=self.eigenvectors,
            model=self.model,
            clock=self.clock,
        )
        self.eigenvalues, self.eigenvectors = result.eigenvalues, result.eigenvectors
        blocks = self.block_spectra
        ranges = None if blocks is None else list(blocks.ranges.values())
        trace = hutchinson_trace(op, self.trace_samples, seed=rng, ranges=ranges)
        values = {
            "top_eigenvalue": float(result.eigenvalues[0]),
            "hessian_trace": float(trace.estimate),
        }
        scalars = {f"hessian/eigenvalue_{i + 1}": v for i, v in enumerate(result.eigenvalues)}
        scalars.update(
            {"hessian/trace": trace.estimate, "hessian/trace_std_error": trace.std_error}
        )
        histograms = {"hessian/spectrum": result.eigenvalues}
        if self.edge_of_stability:
            self._edge_of_stability(step, values, scalars)
        if self.curvature_model:
            self._curvature_model(step, values, scalars)
        if blocks is not None:
            before = blocks.num_matvecs
            for name, found in blocks.measure(self.probe_rng(step, 3), trace.parts).items():
                for key, value in found.items():
                    values[f"{name}_{key}"] = value
                    scalars[f"blocks/{name}/{key}"] = value
            scalars["blocks/num_matvecs"] = blocks.num_matvecs - before
        scalars["hessian/num_matvecs"] = op.num_matvecs - start
        if self.writer is None:
            return values

        images = {"hessian/eigenvalues": render_stem(result.eigenvalues, f"top-{self.k} at {step}")}
        if self.density:
            steps = min(self.density_steps, op.dim)
            slq = spectral_density(op, steps, self.density_probes, seed=rng.integers(2**31))
            images["hessian/density"] = render_density(
                slq.grid, slq.density, f"spectral density at {step}"
            )
        optimizer_scalars, optimizer_histograms = optimizer_summary(self.model)
        scalars.update(optimizer_scalars)
        histograms.update(optimizer_histograms)
        self.writer.write(step, scalars=scalars, histograms=histograms, images=images)
        return values

    def _edge_of_stability(self, step: int, values: dict, scalars: dict) -> None:
        """Sharpness against 2/η (SGD) or λ₁(P⁻¹H) against the optimizer's threshold."""
        sharpness = values["top_eigenvalue"]
        values["sharpness"] = sharpness
        scalars["hessian/sharpness"] = sharpness
        lr = learning_rate(model_optimizer(self.model))
        if lr is not None:
            values["sharpness_x_lr"] = lr * sharpness
        found = optimizer_preconditioning(self.model, self.operator.dim)
        if found is None:
            return
        if found.identity:
            if found.threshold is not None:
                scalars["hessian/sharpness_threshold"] = found.threshold
            return
        try:
            result = preconditioned_sharpness(
                self.operator,
                found.operator,
                method=self.method,
                tol=self.tol,
                seed=int(self.probe_rng(step, 1).integers(2**31)),
                init=self._preconditioned_vector,
            )
        except (ValueError, NotImplementedError) as error:
            self._warn_preconditioner(error)
            value = float("nan")
        else:
            self._preconditioned_vector = result.eigenvectors
            value = float(result.eigenvalues[0])
        values["preconditioned_sharpness"] = value
        scalars["hessian/preconditioned_sharpness"] = value
        if found.threshold is not None:
            scalars["hessian/preconditioned_threshold"] = found.threshold

    def _warn_preconditioner(self, error: Exception) -> None:
        if not self._warned_preconditioner:
            self._warned_preconditioner = True
            warnings.warn(
                f"HessianSpectrum: the optimizer's preconditioner has no inverse square root "
                f"({error}); preconditioned_sharpness is logged as NaN.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _curvature_model(self, step: int, values: dict, scalars: dict) -> None:
        """The optimizer's curvature model against the Hessian or the GGN (when it has one)."""
        model = optimizer_curvature_model(self.model, self.operator.dim)
        if model is None:
            return
        eigenvalues, eigenvectors = self.eigenvalues, self.eigenvectors
        if self.reference is not self.operator:
            found = top_eigenpairs(
                self.reference,
                self.k,
                method=self.method,
                tol=self.tol,
                seed=int(self.probe_rng(step, 4).integers(2**31)),
                init=self._reference_vectors,
            )
            eigenvalues, eigenvectors = found.eigenvalues, found.eigenvectors
            self._reference_vectors = eigenvectors
            values["ggn_top_eigenvalue"] = float(eigenvalues[0])
            for i, value in enumerate(eigenvalues):
                scalars[f"curvature_model/ggn_eigenvalue_{i + 1}"] = float(value)
        quality = curvature_model_quality(
            model,
            self.reference,
            eigenvalues,
            eigenvectors,
            self.probe_rng(step, 2),
            self.model_probes,
        )
        for name in ("rayleigh_ratio", "overlap", "relative_error"):
            values[f"curvature_model_{name}"] = float(quality[name])
            scalars[f"curvature_model/{name}"] = float(quality[name])
        for i, value in enumerate(quality["rayleigh"]):
            scalars[f"curvature_model/rayleigh_{i + 1}"] = float(value)
