"""``HessianSpectrum``: the top of the Hessian spectrum and its trace, tracked during ``fit``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_curv._internal.validation import integer
from keras_curv.callbacks._base import CurvatureCallback, eigensolver_args
from keras_curv.callbacks._protocol import optimizer_summary
from keras_curv.curvature.estimators import hutchinson_trace
from keras_curv.curvature.operators import HessianOperator
from keras_curv.curvature.spectral_density import spectral_density
from keras_curv.plotting import render_density, render_stem


class HessianSpectrum(CurvatureCallback):
    r"""Logs the top-``k`` Hessian eigenvalues and the Hessian trace while a model trains.

    At each scheduled point the callback measures, on a fixed probe set,

    * the ``top_k`` largest eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k` of
      :math:`H = \nabla^2_\theta \frac{1}{N}\sum_\mu w^\mu \ell^\mu`, with
      :func:`~keras_curv.curvature.top_eigenpairs` warm-started from the previous
      eigenvectors (the spectrum moves slowly, so later calls need few products);
    * :math:`\operatorname{tr}(H)` by Hutch++ with ``trace_samples`` products;
    * optionally (``density=True``) the spectral density by stochastic Lanczos quadrature.

    ``logs["top_eigenvalue"]`` (:math:`\lambda_1`) and ``logs["hessian_trace"]`` are set
    at the end of each scheduled epoch (and batch, with ``every_n_batches``), so they show
    in the progress bar and in ``History``, like Keras's ``val_*`` metrics on epochs where
    validation runs. On unscheduled epochs the keys are absent.

    One :class:`~keras_curv.curvature.HessianOperator` is built at ``on_train_begin`` and
    reused: it reads the current weights at every product and is traced once. Products use
    a stateless forward pass and random probes come from ``numpy.random.default_rng((seed,
    step))`` (the same at a step whether or not the fit was interrupted and resumed),
    so the callback never changes weights, optimizer state, BatchNorm statistics or any
    Keras/TensorFlow random stream: training is bit-for-bit the same with or without it.

    With ``log_dir``, TensorBoard summaries go to ``<log_dir>/curvature`` (a run of its
    own, so ``keras.callbacks.TensorBoard`` can share ``log_dir``):

    ============================  ===========  ==========================================
    tag                           kind         content
    ============================  ===========  ==========================================
    ``hessian/eigenvalue_i``      scalar       :math:`\lambda_i`, ``i = 1..top_k``
    ``hessian/trace``             scalar       Hutch++ estimate of :math:`\operatorname{tr}H`
    ``hessian/trace_std_error``   scalar       its standard error
    ``hessian/num_matvecs``       scalar       products spent at this step
    ``hessian/spectrum``          histogram    the ``top_k`` eigenvalues
    ``hessian/eigenvalues``       image        stem plot of eigenvalue against rank
    ``hessian/density``           image        SLQ density (``density=True`` only)
    ``optimizer/<name>[_i]``      scalar/hist  the optimizer's ``curvature_summary()``
    ============================  ===========  ==========================================

    The step is the epoch index, or the global batch count once ``every_n_batches`` is set.
    An optimizer (unwrapped from a ``LossScaleOptimizer``) that defines
    ``curvature_summary() -> dict`` has its entries logged under ``optimizer/``: scalars as
    scalars, vectors as a histogram plus one scalar per entry (``optimizer/<name>_1`` ...).

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

    Raises:
        ValueError: bad data or arguments (at construction); ``top_k`` larger than the
            number of parameters, or no usable loss (at ``on_train_begin``).

    Example:
        >>> cb = HessianSpectrum((x_val[:256], y_val[:256]), log_dir="logs")
        >>> history = model.fit(x, y, epochs=5, callbacks=[cb])
        >>> history.history["top_eigenvalue"]
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
        self.operator: HessianOperator | None = None
        self.eigenvectors: np.ndarray | None = None
        self.eigenvalues: np.ndarray | None = None

    def _prepare(self) -> None:
        k = self.top_k if self.top_k is not None else self._num_outputs()
        self.operator = self._shared_operator(self._resolved_loss())
        if k > self.operator.dim:
            raise ValueError(
                f"`top_k`={k} exceeds the number of trainable parameters ({self.operator.dim}); "
                "ask for at most that many eigenvalues."
            )
        self.k = k
        self.eigenvectors = None

    def _expected_products(self) -> tuple[int, int]:
        # A cold top-k Lanczos to tol=1e-3 took about 3k products on the benchmark CNN.
        return 3 * self.k, self.trace_samples

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
        trace = hutchinson_trace(op, self.trace_samples, seed=rng)
        values = {
            "top_eigenvalue": float(result.eigenvalues[0]),
            "hessian_trace": float(trace.estimate),
        }
        if self.writer is None:
            return values

        images = {"hessian/eigenvalues": render_stem(result.eigenvalues, f"top-{self.k} at {step}")}
        if self.density:
            steps = min(self.density_steps, op.dim)
            slq = spectral_density(op, steps, self.density_probes, seed=rng.integers(2**31))
            images["hessian/density"] = render_density(
                slq.grid, slq.density, f"spectral density at {step}"
            )
        scalars = {f"hessian/eigenvalue_{i + 1}": v for i, v in enumerate(result.eigenvalues)}
        scalars.update(
            {
                "hessian/trace": trace.estimate,
                "hessian/trace_std_error": trace.std_error,
                "hessian/num_matvecs": op.num_matvecs - start,
            }
        )
        histograms = {"hessian/spectrum": result.eigenvalues}
        optimizer_scalars, optimizer_histograms = optimizer_summary(self.model)
        scalars.update(optimizer_scalars)
        histograms.update(optimizer_histograms)
        self.writer.write(step, scalars=scalars, histograms=histograms, images=images)
        return values
