r"""When the diagnostic callbacks measure: a fixed schedule, or the overhead budget.

* :class:`ProbeSchedule`: with ``every_n_epochs`` and/or ``every_n_batches`` set,
  measurements follow that fixed schedule, whatever they cost; it also gives the
  TensorBoard step of each summary.
* :class:`OverheadLedger`: with neither set, the *overhead budget* ``max_overhead``
  decides, for all the curvature callbacks of one model and ``fit`` together.

The budget (long form in ``docs/callbacks.md``). All the curvature callbacks of the model
share one account per ``fit`` of

* :math:`D`, the seconds spent inside them so far (set-up, tracing, measurements,
  summaries), and
* :math:`T = W - D`, the training seconds, with :math:`W` the wall time since
  ``on_train_begin``.

They always measure at the end of the fit's first epoch and at the end of training (the
last epoch, or ``on_train_end`` when training stopped early), whatever it costs, so that
even a short run shows its curvature at the start and at the end. At every other epoch
end the budget-scheduled callbacks of the fit decide *together* (the first to reach its
``on_epoch_end`` decides for all): with :math:`c` their summed estimated cost they all
measure iff :math:`D + c \le \text{max\_overhead} \cdot T` (the smallest
``max_overhead`` among them). Measuring at the same epochs lets ``SubspaceAlignment``
reuse ``HessianSpectrum``'s eigenpairs, and no callback starves another. A callback's
estimate is

1. before anything is traced: ``trace_prior_epochs`` (2.5) times the first epoch's
   duration, as the price of tracing (the first epoch contains the tracing of Keras's
   train step, a smaller graph than a Hessian-vector product's; on the benchmark CNN
   tracing cost 2.3 first epochs for ``HessianSpectrum`` and 1.7 for
   ``SubspaceAlignment``); the group's prior sums it over uncalibrated callbacks. Once it
   fits, each callback *calibrates*: it traces what a measurement needs and times one
   product (:math:`t_{hvp}`); the seconds are charged to the account;
2. before its first measurement: :math:`t_{hvp}` times the expected number of products;
3. afterwards: its last measurement's seconds without the eigensolver, plus the last
   eigensolver run's seconds, counted once per shared operator and not at all when the
   eigenpairs at the current weights are already known.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from keras_curv._internal.validation import integer


class ProbeSchedule:
    """When a diagnostic runs, and the TensorBoard step it is recorded at.

    A measurement is due at the end of every ``every_n_epochs``-th epoch and/or after every
    ``every_n_batches``-th training batch, counted globally across epochs (with
    ``steps_per_execution > 1`` Keras reports batches in chunks; a measurement is due when
    the count crosses a multiple of ``every_n_batches``).

    With neither set (``budgeted``), :meth:`epoch_due` is never true: the overhead budget
    decides instead (:class:`OverheadLedger`).

    The step of a summary is the epoch index (0-based, like ``keras.callbacks.TensorBoard``)
    when only ``every_n_epochs`` is set; as soon as ``every_n_batches`` is set, every
    summary, including the epoch-end ones, is written at the global batch count (batches
    completed since training began), so that all points share one axis.

    Args:
        every_n_epochs: Measure at the end of every n-th epoch (``None``: never).
        every_n_batches: Measure after every n-th training batch (``None``: never).
        budgeted: Whether the overhead budget schedules when neither is set.

    Raises:
        ValueError: a count that is not an int >= 1 or None; nothing scheduled at all.

    Example:
        >>> schedule = ProbeSchedule(every_n_epochs=None, every_n_batches=2)
        >>> schedule.epoch_begin()
        >>> [schedule.batch_end(b) for b in range(4)]
        [False, True, False, True]
    """

    def __init__(
        self, every_n_epochs: int | None, every_n_batches: int | None, budgeted: bool = False
    ):
        self.every_n_epochs = integer(every_n_epochs, "every_n_epochs", minimum=1, allow_none=True)
        self.every_n_batches = integer(
            every_n_batches, "every_n_batches", minimum=1, allow_none=True
        )
        if self.every_n_epochs is None and self.every_n_batches is None and not budgeted:
            raise ValueError(
                "Nothing is scheduled: set `every_n_epochs` and/or `every_n_batches` "
                "to a positive int, or `max_overhead` to a fraction of the training time."
            )
        self.global_batch = 0
        self._epoch_offset = 0

    def reset(self) -> None:
        """Starts counting batches from zero (a new ``fit``)."""
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
        """Whether a measurement is due at the end of epoch ``epoch`` (0-based)."""
        n = self.every_n_epochs
        return n is not None and (int(epoch) + 1) % n == 0

    def step(self, epoch: int) -> int:
        """The summary step of a measurement made in epoch ``epoch``."""
        return self.global_batch if self.every_n_batches is not None else int(epoch)


class OverheadLedger:
    r"""Diagnostic seconds against training seconds, for every callback of one ``fit``.

    With :math:`D` the seconds spent inside the callbacks so far (set-up, measurements,
    summaries) and :math:`W` the wall time since ``on_train_begin``, the training time is
    :math:`T = W - D`. A measurement estimated to cost :math:`c` seconds is allowed when

    .. math::
        D + c \le \text{max\_overhead} \cdot T .

    The budget-scheduled callbacks of the fit (:attr:`members`) decide *together*, once
    per epoch (:attr:`decisions`, made by :meth:`decide`), with :math:`c` their summed
    estimate: they measure at the same epochs, so that one can reuse another's
    eigenpairs, and the first in the callback list cannot starve the others.

    Args:
        clock: Returns seconds (monotonic); ``time.perf_counter`` by default.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._fit: Any = None
        self.start = clock()
        self.diagnostic = 0.0
        # Budget-scheduled callbacks of this fit, and their joint decision per epoch.
        self.members: list = []
        self.decisions: dict = {}

    def begin(self, fit_token: Any, clock: Callable[[], float]) -> None:
        """Starts a new account unless ``fit_token`` (Keras's ``params``) is this fit's.

        Keras hands every callback of one ``fit`` the same ``params`` dict, and a new one
        to the next ``fit``, so the first callback to begin opens the account.
        """
        if fit_token is None or fit_token is not self._fit:
            self._fit = fit_token
            self.clock = clock
            self.start = clock()
            self.diagnostic = 0.0
            self.members = []
            self.decisions = {}

    def training_seconds(self) -> float:
        """:math:`T`, the seconds since the account opened that were not charged."""
        return self.clock() - self.start - self.diagnostic

    def allows(self, estimate: float, max_overhead: float) -> bool:
        r"""Whether :math:`D + \text{estimate} \le \text{max\_overhead} \cdot T`."""
        return self.diagnostic + estimate <= max_overhead * self.training_seconds()

    def charge(self, seconds: float) -> None:
        """Adds ``seconds`` to :math:`D`."""
        self.diagnostic += float(seconds)

    def decide(
        self,
        when: Any,
        clock: Callable[[], float],
        first_epoch_seconds: float | None,
        weights_state: Callable[[], tuple],
        forced: bool = False,
    ) -> bool:
        """The joint decision of the :attr:`members` at ``when`` (an epoch, or ``"train_end"``).

        The first member to ask decides for all: calibrate every member once the prior
        (``trace_prior_epochs`` first epochs per uncalibrated member) fits, then measure
        iff the summed estimate fits. Eigensolver estimates are counted once per shared
        operator whose eigenpairs are not already known at the current weights.

        A member is a ``CurvatureCallback``: it has ``max_overhead``,
        ``trace_prior_epochs``, ``_calibrated``, ``_calibrate()``, ``_estimate() ->
        (own seconds, eigensolver seconds)``, and ``shared``, ``k``, ``method``, ``tol``
        for the eigenpairs it would reuse.

        Args:
            when: The decision's key: each is made once per fit.
            clock: Times the calibrations charged to the account.
            first_epoch_seconds: Training seconds of the first epoch (``None``: unknown).
            weights_state: Returns the identity of the current weights
                (``_shared.weights_state``); called only once calibrated.
            forced: Measure whatever it costs (the first epoch and the end of training);
                the members calibrate first if they have not.
        """
        if when in self.decisions:
            return self.decisions[when]
        members = self.members
        budget = min(m.max_overhead for m in members)
        decision = False
        uncalibrated = [m for m in members if not m._calibrated]
        prior = sum(m.trace_prior_epochs for m in uncalibrated) * (first_epoch_seconds or 0.0)
        if forced or not uncalibrated or self.allows(prior, budget):
            for member in uncalibrated:
                start = clock()
                member._calibrate()
                self.charge(clock() - start)
                member._calibrated = True
            decision = forced or self._estimate_fits(members, weights_state(), budget)
        self.decisions[when] = decision
        return decision

    def _estimate_fits(self, members: list, state: tuple, budget: float) -> bool:
        total, eig_by_probe = 0.0, {}
        for member in members:
            own, eig = member._estimate()
            total += own
            cached = member.shared.cached(state, member.k, member.method, member.tol)
            if cached is None:
                key = id(member.shared)
                eig_by_probe[key] = max(eig_by_probe.get(key, 0.0), eig)
        return self.allows(total + sum(eig_by_probe.values()), budget)
