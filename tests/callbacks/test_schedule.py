"""ProbeSchedule and OverheadLedger on their own: counts, steps and the budget rule."""

import pytest

from keras_curv.callbacks._schedule import OverheadLedger, ProbeSchedule
from tests.callbacks.conftest import FakeClock


def test_probe_schedule_steps():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_batches=4)
    due = []
    for epoch in range(2):
        schedule.epoch_begin()
        # steps_per_execution=3: Keras reports batches 2, 5, 6 of a 7-batch epoch.
        due += [schedule.batch_end(b) for b in (2, 5, 6)]
        assert schedule.epoch_due(epoch)
        assert schedule.step(epoch) == 7 * (epoch + 1)
    # Global counts 3, 6, 7 | 10, 13, 14: multiples of 4 are crossed at 6 (4), 10 (8), 13 (12).
    assert due == [False, True, False, True, True, False]
    assert ProbeSchedule(3, None).step(5) == 5
    assert [ProbeSchedule(3, None).epoch_due(e) for e in range(6)] == [0, 0, 1, 0, 0, 1]


def test_a_resumed_fit_counts_batches_from_where_it_stopped():
    # Resumed at epoch 2 of 7-batch epochs: the global count starts at 14, not 0.
    schedule = ProbeSchedule(None, 5)
    schedule.epoch_begin(2, 7)
    assert [schedule.batch_end(b) for b in range(3)] == [True, False, False]  # 15, 16, 17
    assert schedule.step(2) == 17
    schedule.epoch_begin(3, 7)  # later epochs continue the count
    assert schedule.global_batch == 17
    schedule.reset()
    assert schedule.global_batch == 0


def test_budgeted_schedule_is_never_due_on_its_own():
    schedule = ProbeSchedule(None, None, budgeted=True)
    assert not any(schedule.epoch_due(e) for e in range(5))
    schedule.epoch_begin()
    assert not any(schedule.batch_end(b) for b in range(5))


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, None), "`every_n_epochs` must be an int >= 1 or None"),
        ((2.0, None), "every_n_epochs"),
        ((True, None), "every_n_epochs"),
        ((None, -1), "`every_n_batches` must be an int >= 1 or None"),
        ((None, None), "Nothing is scheduled"),
    ],
)
def test_bad_schedules(args, match):
    with pytest.raises(ValueError, match=match):
        ProbeSchedule(*args)


def test_ledger_rule():
    clock = FakeClock()
    ledger = OverheadLedger(clock)
    ledger.begin("fit", clock)
    clock.advance(10.0)
    assert ledger.training_seconds() == 10.0
    assert ledger.allows(1.0, 0.1) and not ledger.allows(1.01, 0.1)
    ledger.charge(0.5)
    clock.advance(0.5)  # the charged seconds are not training time
    assert ledger.training_seconds() == 10.0
    assert ledger.allows(0.5, 0.1) and not ledger.allows(0.51, 0.1)
    ledger.begin("fit", clock)  # same fit: same account
    assert ledger.diagnostic == 0.5
    ledger.begin("next fit", clock)
    assert ledger.diagnostic == 0.0 and ledger.training_seconds() == 0.0


class Shared:
    """A SharedProbe stand-in: ``cached`` answers ``known`` and remembers the state."""

    def __init__(self, known=None):
        self.known = known
        self.states = []

    def cached(self, state, k, method, tol):
        self.states.append((state, k, method, tol))
        return self.known


class Member:
    """A budget-scheduled callback stand-in with fixed calibration and estimates."""

    k, method, tol = 2, "lanczos", 1e-3

    def __init__(self, clock, shared, own, eig, max_overhead=0.075, calibration=0.5):
        self.clock, self.shared, self.own, self.eig = clock, shared, own, eig
        self.max_overhead = max_overhead
        self.calibration = calibration
        self.trace_prior_epochs = 1.0
        self._calibrated = False
        self.calibrations = 0

    def _calibrate(self):
        self.calibrations += 1
        self.clock.advance(self.calibration)

    def _estimate(self):
        return self.own, self.eig


def _ledger(members, clock, seconds):
    ledger = OverheadLedger(clock)
    ledger.begin("fit", clock)
    ledger.members.extend(members)
    clock.advance(seconds)
    return ledger


def test_no_calibration_before_the_tracing_prior_fits():
    # Prior: 2 members x 1 first epoch of 1 s = 2 s > 0.075 x 20 s.
    clock, shared = FakeClock(), Shared()
    members = [Member(clock, shared, 0.3, 0.6), Member(clock, shared, 0.2, 0.4)]
    ledger = _ledger(members, clock, 20.0)
    states = []
    assert not ledger.decide(5, clock, 1.0, lambda: states.append(1))
    assert [m.calibrations for m in members] == [0, 0] and states == []
    assert ledger.diagnostic == 0.0


def test_one_eigensolver_run_per_shared_operator():
    # T = 30 s, budget 0.075 T = 2.25 s. Calibration charges 2 x 0.5 s (not training
    # time); the estimate is 0.3 + 0.2 plus one shared eigensolver run, max(0.6, 0.4):
    # 1.0 + 1.1 = 2.1 <= 2.25. Counted per member it would be 2.5 > 2.25.
    clock, shared = FakeClock(), Shared()
    members = [Member(clock, shared, 0.3, 0.6), Member(clock, shared, 0.2, 0.4)]
    ledger = _ledger(members, clock, 30.0)
    assert ledger.decide(5, clock, 1.0, lambda: "weights")
    assert [m.calibrations for m in members] == [1, 1] and all(m._calibrated for m in members)
    assert ledger.diagnostic == pytest.approx(1.0)
    assert ledger.training_seconds() == pytest.approx(30.0)
    assert shared.states == [("weights", 2, "lanczos", 1e-3)] * 2
    # Decided once per key: asking again changes nothing, calibrates nothing.
    members[0].own = 100.0
    assert ledger.decide(5, clock, 1.0, lambda: "weights")
    assert [m.calibrations for m in members] == [1, 1]
    assert not ledger.decide(6, clock, 1.0, lambda: "weights")  # 100 s no longer fits


def test_separate_operators_each_pay_their_eigensolver():
    clock = FakeClock()
    members = [Member(clock, Shared(), 0.3, 0.6), Member(clock, Shared(), 0.2, 0.4)]
    ledger = _ledger(members, clock, 30.0)
    assert not ledger.decide(5, clock, 1.0, lambda: "weights")  # 1.0 + 1.5 > 2.25
    # Eigenpairs already known at these weights cost nothing: 1.0 + 0.5 <= 2.25.
    for member in members:
        member.shared.known = object()
    assert ledger.decide(6, clock, 1.0, lambda: "weights")


def test_the_smallest_max_overhead_rules():
    clock, shared = FakeClock(), Shared()
    members = [Member(clock, shared, 0.3, 0.6), Member(clock, shared, 0.2, 0.4, 0.05)]
    ledger = _ledger(members, clock, 30.0)
    # The prior (2 s) fits 0.075 x 30 but not 0.05 x 30 = 1.5: nothing happens.
    assert not ledger.decide(5, clock, 1.0, lambda: "weights")
    assert [m.calibrations for m in members] == [0, 0]
