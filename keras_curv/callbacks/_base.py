"""What the diagnostic callbacks share: probe data, schedule, loss, TensorBoard writing, plots.

Each concern has exactly one implementation here:

* :class:`ProbeSchedule`: when a measurement is due (every ``n`` epochs and/or every ``n``
  training batches) and which TensorBoard step it is written at;
* :class:`CurvatureWriter`: ``tf.summary`` scalars, histograms and images under
  ``<log_dir>/curvature``;
* :func:`render_stem`, :func:`render_density`, :func:`render_heatmap`: matplotlib (Agg)
  figures rendered to image tensors (:func:`draw_stem` and :func:`draw_density` draw the
  same plots on given axes, for ``keras_curv.report``);
* :func:`model_loss`: the loss a callback differentiates when none is given;
* :func:`optimizer_summary`: the optimizer's ``curvature_summary()`` protocol;
* :class:`CurvatureCallback`: the Keras callback plumbing built on the above.
"""

from __future__ import annotations

import importlib.util
import io
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_curv._internal.data import ProbeData, probe_data
from keras_curv._internal.losses import PerSampleLoss, as_keras_loss
from keras_curv._internal.model import stateless_outputs
from keras_curv.callbacks._shared import (
    SharedProbe,
    model_entry,
    probe_fingerprint,
    shared_probe,
    weights_state,
)
from keras_curv.curvature.eigensolvers import METHODS
from keras_curv.curvature.operators import HessianOperator, resolve_loss

SUBDIR = "curvature"


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int or None; got {value!r}.")
    return int(value)


class ProbeSchedule:
    """When a diagnostic runs, and the TensorBoard step it is recorded at.

    A measurement is due at the end of every ``every_n_epochs``-th epoch and/or after every
    ``every_n_batches``-th training batch, counted globally across epochs (with
    ``steps_per_execution > 1`` Keras reports batches in chunks; a measurement is due when
    the count crosses a multiple of ``every_n_batches``).

    With neither set (``budgeted``), :meth:`epoch_due` is never true: the callback's
    overhead budget decides instead (see :class:`CurvatureCallback`).

    The step of a summary is the epoch index (0-based, like ``keras.callbacks.TensorBoard``)
    when only ``every_n_epochs`` is set; as soon as ``every_n_batches`` is set, every
    summary, including the epoch-end ones, is written at the global batch count (batches
    completed since training began), so that all points share one axis.
    """

    def __init__(
        self, every_n_epochs: int | None, every_n_batches: int | None, budgeted: bool = False
    ):
        self.every_n_epochs = _positive_int_or_none(every_n_epochs, "every_n_epochs")
        self.every_n_batches = _positive_int_or_none(every_n_batches, "every_n_batches")
        if self.every_n_epochs is None and self.every_n_batches is None and not budgeted:
            raise ValueError(
                "Nothing is scheduled: set `every_n_epochs` and/or `every_n_batches` "
                "to a positive int, or `max_overhead` to a fraction of the training time."
            )
        self.global_batch = 0
        self._epoch_offset = 0

    def reset(self) -> None:
        self.global_batch = 0
        self._epoch_offset = 0

    def epoch_begin(self, epoch: int | None = None, steps_per_epoch: int | None = None) -> None:
        """Marks the start of an epoch.

        A fit resumed at ``epoch > 0`` (``BackupAndRestore``, ``initial_epoch``) starts its
        global batch count at ``epoch * steps_per_epoch``, where an uninterrupted fit
        would be, so the batch schedule and the summary steps line up with it.
        """
        if self.global_batch == 0 and epoch and steps_per_epoch:
            self.global_batch = int(epoch) * int(steps_per_epoch)
        self._epoch_offset = self.global_batch

    def batch_end(self, batch: int) -> bool:
        """Records that batch ``batch`` (0-based, within the epoch) ended; whether one is due."""
        previous = self.global_batch
        self.global_batch = self._epoch_offset + int(batch) + 1
        n = self.every_n_batches
        return n is not None and self.global_batch // n > previous // n

    def epoch_due(self, epoch: int) -> bool:
        n = self.every_n_epochs
        return n is not None and (int(epoch) + 1) % n == 0

    def step(self, epoch: int) -> int:
        return self.global_batch if self.every_n_batches is not None else int(epoch)


class CurvatureWriter:
    """Writes summaries to ``<log_dir>/curvature``, its own TensorBoard run.

    The subdirectory keeps these summaries apart from ``keras.callbacks.TensorBoard``'s
    ``train``/``validation`` runs in the same ``log_dir``. Writing is forced on with
    ``tf.summary.record_if(True)``, because the Keras callback may have installed a
    recording condition for its own batch-level summaries.
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
        """Writes one step's summaries and flushes them to disk."""
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
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def agg_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib ``Figure`` on its own Agg canvas (also used by ``keras_curv.report``)."""
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


def model_loss(model: keras.Model, loss: Any, owner: str) -> Any:
    """The loss to differentiate: ``loss`` if given, else the model's compiled loss.

    A loss *function* given to ``compile`` returns per-sample values that Keras averages,
    so it is wrapped accordingly.

    Raises:
        ValueError: no ``loss`` and the compiled loss is missing or not a single loss.
    """
    if loss is not None:
        return loss
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(
            f"{owner} needs a loss: the model is not compiled with one. Compile the model "
            "or pass `loss=` (a Keras loss name, a keras.losses.Loss or a callable)."
        )
    if isinstance(compiled, (list, tuple, dict)):
        raise ValueError(
            f"{owner} cannot use the model's compiled loss {compiled!r} (one per output); "
            "curvature diagnostics need a single-output model and a single loss: pass `loss=`."
        )
    if isinstance(compiled, str) or isinstance(compiled, keras.losses.Loss):
        return compiled
    if as_keras_loss(compiled) is not None:
        return compiled
    if callable(compiled):
        # In the variables' dtype: a local function cannot be re-created from its config
        # with another dtype, and a float32 loss would blur a float64 model's Hessian.
        variables = model.trainable_variables
        dtype = variables[0].dtype if variables else None
        return PerSampleLoss(compiled, dtype=dtype)
    raise ValueError(f"{owner} cannot use the compiled loss {compiled!r}; pass `loss=`.")


def unwrapped_optimizer(model: keras.Model) -> Any:
    """The model's optimizer, with a ``LossScaleOptimizer`` wrapper removed."""
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "inner_optimizer", optimizer)


def optimizer_summary(model: keras.Model) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Reads the optimizer's ``curvature_summary()`` into scalar and histogram summaries.

    Protocol: an optimizer may define ``curvature_summary() -> dict[str, scalar | vector]``
    (tensors or arrays). It must only *read* its state. Scalars become ``optimizer/<name>``;
    a vector becomes a histogram ``optimizer/<name>`` plus one scalar per entry,
    ``optimizer/<name>_1`` ... ``optimizer/<name>_n``.

    Returns:
        ``(scalars, histograms)``, both empty when the optimizer has no such method.

    Raises:
        ValueError: the method returns something other than a mapping of scalars/vectors.
    """
    method = getattr(unwrapped_optimizer(model), "curvature_summary", None)
    if not callable(method):
        return {}, {}
    summary = method()
    if not isinstance(summary, Mapping):
        raise ValueError(
            "`optimizer.curvature_summary()` must return a dict name -> scalar or vector; "
            f"got {type(summary).__name__}."
        )
    scalars, histograms = {}, {}
    for name, value in summary.items():
        array = np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)
        tag = f"optimizer/{name}"
        if array.ndim == 0:
            scalars[tag] = float(array)
        elif array.ndim == 1:
            histograms[tag] = array
            scalars.update({f"{tag}_{i + 1}": float(v) for i, v in enumerate(array)})
        else:
            raise ValueError(
                f"`optimizer.curvature_summary()[{name!r}]` has shape {array.shape}; only "
                "scalars and vectors are supported."
            )
    return scalars, histograms


def check_eigensolver_args(top_k: Any, method: Any, tol: Any) -> None:
    """Validates the eigensolver arguments the diagnostic callbacks share.

    Raises:
        ValueError: ``top_k`` not a positive int (or None), an unknown ``method``, or a
            ``tol`` that is not a positive number.
    """
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
    ):
        raise ValueError(f"`top_k` must be a positive int or None; got {top_k!r}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol > 0):
        raise ValueError(f"`tol` must be a positive number; got {tol!r}.")


def _unpack_data(data: Any, owner: str) -> tuple[Any, Any, Any]:
    if isinstance(data, tf.data.Dataset):
        return data, None, None
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return (*data, None) if len(data) == 2 else tuple(data)
    raise ValueError(
        f"{owner} needs probe data as `(x, y)`, `(x, y, sample_weight)` or a finite "
        f"tf.data.Dataset of such tuples; got {type(data).__name__}."
    )


def _check_max_overhead(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"`max_overhead` must be a positive number or None; got {value!r}.")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"`max_overhead` must be a positive number or None; got {value!r}.")
    return float(value)


class CurvatureCallback(keras.callbacks.Callback):
    r"""Keras plumbing shared by the diagnostic callbacks.

    Subclasses implement :meth:`_prepare` (called at ``on_train_begin`` with the model
    built; build operators there, cheaply: nothing is traced yet), :meth:`_calibrate`
    (traces what a measurement needs), :meth:`_expected_products` (the products of a
    cold measurement) and :meth:`_measure` (returns the
    values for ``logs`` and writes summaries). Measurements never change the model, the
    optimizer or any random stream: products use the stateless forward pass and probes
    come from :meth:`probe_rng`, a NumPy generator seeded with ``(seed, step)``. Each
    measurement's randomness is therefore a function of the seed and the step alone, so
    a fit that is interrupted and resumed (``keras.callbacks.BackupAndRestore``, or
    ``load_model`` and ``fit(initial_epoch=...)``) measures what an uninterrupted fit
    would. The one difference is the eigensolver's warm start from the previous
    measurement's eigenvectors, which a resumed fit does not have: its first
    eigenpairs agree with the uninterrupted ones to the solver's ``tol``, not bit for
    bit.

    **Schedule.** With ``every_n_epochs`` and/or ``every_n_batches`` set, measurements
    follow that fixed schedule (:class:`ProbeSchedule`), whatever they cost. With neither
    set, the *overhead budget* decides: all curvature callbacks of the model share one
    account per ``fit`` (:class:`~keras_curv.callbacks._shared.OverheadLedger`) of

    * :math:`D`, the seconds spent inside them so far (set-up, tracing, measurements,
      summaries), and
    * :math:`T = W - D`, the training seconds, with :math:`W` the wall time since
      ``on_train_begin``.

    At every epoch end the budget-scheduled callbacks of the fit decide *together* (the
    first to reach its ``on_epoch_end`` decides for all): with :math:`c` their summed
    estimated cost they all measure iff :math:`D + c \\le \\text{max\\_overhead} \\cdot T`
    (the smallest ``max_overhead`` among them). Measuring at the same epochs lets
    ``SubspaceAlignment`` reuse ``HessianSpectrum``'s eigenpairs, and no callback starves
    another. A callback's estimate is

    1. before anything is traced: :attr:`trace_prior_epochs` (2.5) times the first
       epoch's duration, as the price of tracing (the first epoch contains the tracing of
       Keras's train step, a smaller graph than a Hessian-vector product's; on the
       benchmark CNN tracing cost 2.3 first epochs for ``HessianSpectrum`` and 1.7 for
       ``SubspaceAlignment``); the group's prior sums it over uncalibrated callbacks.
       Once it fits, each callback *calibrates*: it traces what a measurement needs and
       times one product (:math:`t_{hvp}`); the seconds are charged to the account;
    2. before its first measurement: :math:`t_{hvp}` times the expected number of
       products (:meth:`_expected_products`);
    3. afterwards: its last measurement's seconds without the eigensolver, plus the last
       eigensolver run's seconds, counted once per shared operator and not at all when
       the eigenpairs at the current weights are already known.

    At ``on_train_end``, if the last epoch was not measured and the budget allows, a
    final measurement is made at the final weights (its values go to
    :attr:`measurements` and TensorBoard, not to ``History``, which is already written).
    If the budget allowed no measurement at all, a warning says so once, at the end of
    training, and how to force them (``every_n_epochs=1``).

    Attributes:
        trace_prior_epochs: Prior for the one-off tracing cost, in first-epoch durations.
        measurements: ``{"step": [...], "<logs key>": [...]}`` for every measurement of
            the last ``fit``, including a final one made at ``on_train_end``; unlike
            ``History``, it says at which step each value was taken.
    """

    trace_prior_epochs = 2.5

    def __init__(
        self,
        data: Any,
        *,
        every_n_epochs: int | None,
        every_n_batches: int | None,
        log_dir: str | os.PathLike | None,
        loss: Any,
        batch_size: int | None,
        training: bool,
        seed: int,
        max_overhead: float | None = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ):
        super().__init__()
        owner = type(self).__name__
        self.x, self.y, self.sample_weight = _unpack_data(data, owner)
        self.batch_size = _positive_int_or_none(batch_size, "batch_size")
        # Validate (and materialise) the probe set now, not mid-training.
        self.probe: ProbeData = probe_data(self.x, self.y, self.sample_weight, self.batch_size)
        self.max_overhead = _check_max_overhead(max_overhead)
        self.budgeted = every_n_epochs is None and every_n_batches is None
        self.schedule = ProbeSchedule(
            every_n_epochs, every_n_batches, budgeted=self.max_overhead is not None
        )
        if not callable(clock):
            raise ValueError(f"`clock` must be a callable returning seconds; got {clock!r}.")
        self.clock = clock
        self.writer = CurvatureWriter(log_dir) if log_dir is not None else None
        self.loss = loss
        self.training = bool(training)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an int; got {seed!r}.")
        self.seed = int(seed)
        self._prepared_for = None
        self._fingerprint = probe_fingerprint(self.probe)
        self.shared: SharedProbe | None = None
        self.measurements: dict[str, list] = {}
        self._ledger = None
        self._calibrated = False
        self._last_cost: float | None = None
        self._first_epoch_seconds: float | None = None
        self._last_epoch: int | None = None
        self._last_epoch_measured: int | None = None
        if self.schedule.every_n_batches is None:
            # Leave Keras free to dispatch batch ends asynchronously: it only does so when
            # no callback overrides on_train_batch_end.
            self.on_train_batch_end = keras.callbacks.Callback.on_train_batch_end.__get__(self)

    # Subclass hooks ----------------------------------------------------------------------

    def _prepare(self) -> None:
        raise NotImplementedError

    def _measure(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def _expected_products(self) -> tuple[int, int]:
        """(eigensolver products, other products) a cold measurement is expected to need."""
        raise NotImplementedError

    def _calibrate(self) -> None:
        """Traces what a measurement needs (at least the Hessian-vector product)."""
        self.shared.calibrate(self.clock)

    # Helpers -----------------------------------------------------------------------------

    def probe_rng(self, step: int) -> np.random.Generator:
        """The random stream of the measurement at ``step``, a function of ``(seed, step)``.

        Stateless across measurements, so that a resumed fit draws the same probes at the
        same step as an uninterrupted one.
        """
        return np.random.default_rng([self.seed, int(step)])

    def _probe_outputs(self) -> Any:
        """The model's outputs on the first probe batch.

        Raises:
            ValueError: the probe inputs do not fit the model (named as such, rather
                than as a layer's shape error in the middle of training).
        """
        first = self.probe.batches[0]
        values = [v.value for v in self.model.trainable_variables]
        try:
            return stateless_outputs(self.model, values, first.x, False)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"{type(self).__name__}: the probe inputs do not fit the model ({error}). "
                "Pass probe inputs shaped like the model's training inputs."
            ) from error

    def _check_probe(self, outputs: Any) -> None:
        """Evaluates the loss on the first probe batch, so bad targets fail before training.

        Raises:
            ValueError: no usable loss, or targets the loss cannot take (wrong shape,
                sparse labels outside ``[0, C)``).
        """
        loss = self._resolved_loss()
        if isinstance(outputs, (list, tuple, dict)):
            return  # the subclass names the multi-output problem
        first = self.probe.batches[0]
        dtype = outputs.dtype
        try:
            value = resolve_loss(loss, dtype)(
                first.y, outputs, first.sample_weight, tf.constant(first.size, dtype)
            )
            tf.convert_to_tensor(value).numpy()
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"{type(self).__name__}: the probe targets do not fit the loss ({error}). "
                "Pass targets of the form the training loss takes, e.g. integer labels in "
                "[0, C) of shape (n,) for sparse_categorical_crossentropy, one-hot (n, C) "
                "for categorical_crossentropy."
            ) from error

    def _num_outputs(self) -> int:
        """Size of the model's last output axis (the number of classes of a classifier)."""
        outputs = self._probe_outputs()
        if isinstance(outputs, (list, tuple, dict)):
            raise ValueError(
                f"{type(self).__name__} needs a single-output model; this one has several."
            )
        return int(outputs.shape[-1]) if outputs.shape.rank >= 2 else 1

    def _resolved_loss(self) -> Any:
        return model_loss(self.model, self.loss, type(self).__name__)

    def _shared_operator(self, loss: Any) -> HessianOperator:
        """The Hessian operator, shared with other callbacks on the same probe data and loss."""
        if self.loss is None:
            loss_key = ("compiled", id(getattr(self.model, "loss", None)))
        else:
            loss_key = self.loss if isinstance(self.loss, str) else ("object", id(self.loss))
        key = (
            self._fingerprint,
            loss_key,
            self.training,
            tuple(id(v) for v in self.model.trainable_variables),
        )
        self.shared = shared_probe(
            self.model,
            key,
            lambda: HessianOperator(
                self.model,
                loss,
                self.x,
                self.y,
                sample_weight=self.sample_weight,
                training=self.training,
                batch_size=self.batch_size,
            ),
        )
        return self.shared.operator

    def _estimate(self) -> tuple[float, float]:
        """Estimated seconds of the next measurement: ``(own part, eigensolver part)``."""
        shared = self.shared
        eig_products, other_products = self._expected_products()
        if self._last_cost is None:
            return shared.hvp_seconds * other_products, shared.hvp_seconds * eig_products
        eig = shared.eig_seconds if shared.eig_seconds is not None else 0.0
        return self._last_cost, eig

    def _record(self, step: int, values: dict[str, float]) -> None:
        self.measurements.setdefault("step", []).append(int(step))
        for key, value in values.items():
            self.measurements.setdefault(key, []).append(value)

    def _timed_measure(self, step: int) -> dict[str, float]:
        start = self.clock()
        runs = self.shared.eig_runs
        values = self._measure(step)
        cost = self.clock() - start
        self._ledger.charge(cost)
        # Keep the eigensolver apart: another callback may pay it next time.
        own = cost - (self.shared.eig_seconds if self.shared.eig_runs != runs else 0.0)
        self._last_cost = max(own, 0.0)
        self._record(step, values)
        return values

    def _group_allows(self, when: Any) -> bool:
        """The joint decision of this fit's budget-scheduled callbacks at ``when``.

        The first member to ask decides for all (see the class docstring): calibrate
        every member once the prior fits, then measure iff the summed estimate fits.
        Eigensolver estimates are counted once per shared operator whose eigenpairs are
        not already known at the current weights.
        """
        ledger = self._ledger
        if when in ledger.decisions:
            return ledger.decisions[when]
        members = ledger.members
        budget = min(m.max_overhead for m in members)
        decision = False
        uncalibrated = [m for m in members if not m._calibrated]
        first_epoch = self._first_epoch_seconds or 0.0
        prior = sum(m.trace_prior_epochs for m in uncalibrated) * first_epoch
        if not uncalibrated or ledger.allows(prior, budget):
            for member in uncalibrated:
                start = self.clock()
                member._calibrate()
                ledger.charge(self.clock() - start)
                member._calibrated = True
            total, eig_by_probe = 0.0, {}
            state = weights_state(self.model)
            for member in members:
                own, eig = member._estimate()
                total += own
                cached = member.shared.cached(state, member.k, member.method, member.tol)
                if cached is None:
                    key = id(member.shared)
                    eig_by_probe[key] = max(eig_by_probe.get(key, 0.0), eig)
            decision = ledger.allows(total + sum(eig_by_probe.values()), budget)
        ledger.decisions[when] = decision
        return decision

    # Keras hooks -------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._ledger = model_entry(self.model, self.clock).ledger
        self._ledger.begin(getattr(self, "params", None), self.clock)
        if self.budgeted and self.max_overhead is not None:
            self._ledger.members.append(self)
        start = self.clock()
        self.schedule.reset()
        self.measurements = {}
        self._last_epoch_measured = None
        self._last_epoch = None
        self._first_epoch_seconds = None
        # Rebuild only when the model or its set of trainable variables changed.
        key = (id(self.model), tuple(id(v) for v in self.model.trainable_variables))
        if key != self._prepared_for:
            # Probe data that does not fit the model or the loss fails here, before the
            # first epoch, not at the first (possibly much later) measurement.
            self._check_probe(self._probe_outputs())
            self._prepare()
            self._prepared_for = key
            self._calibrated = False
            self._last_cost = None
        self._ledger.charge(self.clock() - start)

    def on_epoch_begin(self, epoch, logs=None):
        steps = (getattr(self, "params", None) or {}).get("steps")
        self.schedule.epoch_begin(epoch, steps)

    def on_train_batch_end(self, batch, logs=None):
        if self.schedule.batch_end(batch):
            values = self._timed_measure(self.schedule.global_batch)
            if logs is not None:
                logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        if self._first_epoch_seconds is None:
            self._first_epoch_seconds = self._ledger.training_seconds()
        if self.budgeted:
            due = self.max_overhead is not None and self._group_allows(int(epoch))
        else:
            due = self.schedule.epoch_due(epoch)
        if due:
            values = self._timed_measure(self.schedule.step(epoch))
            self._last_epoch_measured = int(epoch)
            if logs is not None:
                # Keras appends History and ProgbarLogger after user callbacks and hands
                # every callback the same dict, so these keys reach both.
                logs.update(values)
        self._last_epoch = int(epoch)

    def on_train_end(self, logs=None):
        try:
            if self.budgeted and self.max_overhead is not None:
                last = self._last_epoch
                if (
                    last is not None
                    and self._last_epoch_measured != last
                    and self._group_allows("train_end")
                ):
                    self._timed_measure(self.schedule.step(last))
                if not self.measurements:
                    warnings.warn(
                        f"{type(self).__name__} made no measurement: its cost did not fit in "
                        f"max_overhead={self.max_overhead:g} of this run's training time. "
                        "Train longer, use a smaller probe set, raise `max_overhead`, or "
                        "force a fixed schedule with `every_n_epochs=1`.",
                        stacklevel=2,
                    )
        finally:
            if self.writer is not None:
                self.writer.close()
