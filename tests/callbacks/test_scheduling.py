"""The overhead-budget schedule (with a fake clock) and the work the two callbacks share."""

import keras
import numpy as np
import pytest

from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
from tests.callbacks.conftest import FakeClock, dense_spectrum, tiny_data, tiny_model

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def budgeted(clock, calibration=0.45, hvp=0.01, cost=0.37, **kwargs):
    """A budget-mode HessianSpectrum whose calibration and measurements take fake seconds."""
    x, y = tiny_data()
    cb = HessianSpectrum((x, y), trace_samples=3, clock=clock, **kwargs)
    cb.trace_prior_epochs = 1.0  # the schedules below are worked out for a 1-epoch prior
    measure = cb._measure

    def calibrate():
        cb.shared.hvp_seconds = hvp
        clock.advance(calibration)

    def timed(step):
        values = measure(step)
        clock.advance(cost)
        return values

    cb._calibrate, cb._measure = calibrate, timed
    return cb


def fit(callbacks, epochs, clock, train_end_seconds=0.0):
    """Trains for ``epochs``; each epoch takes 1 fake second of training."""
    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer=keras.optimizers.SGD(0.05))
    ticker = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: clock.advance(1.0),
        on_train_end=lambda logs: clock.advance(train_end_seconds),
    )
    return model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=[ticker, *callbacks])


def test_budget_schedule_with_a_fake_clock():
    # Epochs of 1 s, budget 10 %. D = seconds in the callback, T = e + 1 after epoch e.
    # The first epoch is always measured: calibration 0.45 s and a measurement 0.37 s
    # (D = 0.82). Each later one costs 0.37 s, so it needs D + 0.37 <= 0.1 T:
    # 1.19 <= 1.2 at epoch 11, 1.56 <= 1.6 at epoch 15; epoch 19 is the last, always measured.
    clock = FakeClock()
    cb = budgeted(clock)
    history = fit([cb], 20, clock)
    assert cb.measurements["step"] == [0, 11, 15, 19]
    assert len(history.history["top_eigenvalue"]) == 4
    assert cb._ledger.diagnostic == pytest.approx(0.45 + 4 * 0.37)


def test_a_short_run_measures_at_the_start_and_at_the_end_and_says_so(capsys):
    clock = FakeClock()
    cb = budgeted(clock, cost=50.0)  # far over budget
    history = fit([cb], 5, clock)
    assert cb.measurements["step"] == [0, 4]
    assert len(history.history["top_eigenvalue"]) == 2
    cb.params = {"epochs": 5, "verbose": 1}
    assert "after the first epoch and at the end of training (epoch 5)" in cb._schedule_line()
    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer="sgd")
    model.fit(x, y, epochs=1, verbose=2, callbacks=[HessianSpectrum((x, y), every_n_epochs=2)])
    assert "HessianSpectrum: measures every 2 epoch(s) (fixed schedule)." in capsys.readouterr().out


def test_training_stopped_early_is_measured_at_train_end():
    clock = FakeClock()
    cb = budgeted(clock)

    def stop(epoch, logs):
        if epoch == 12:
            cb.model.stop_training = True

    fit([cb, keras.callbacks.LambdaCallback(on_epoch_end=stop)], 30, clock)
    # Epoch 12 is neither first nor last, and over budget (1.56 > 1.3): measured at train end.
    assert cb.measurements["step"] == [0, 11, 12]


def test_explicit_schedule_ignores_the_budget():
    clock = FakeClock()
    cb = budgeted(clock, every_n_epochs=2, cost=50.0)
    fit([cb], 6, clock)
    assert cb.measurements["step"] == [1, 3, 5]


def test_max_overhead_scales_the_schedule():
    clock = FakeClock()
    cb = budgeted(clock, max_overhead=1.0)
    fit([cb], 6, clock)
    # Calibration (1 s) at epoch 0 (1 <= 1.0 * 1), then D + 0.37 <= T every epoch.
    assert cb.measurements["step"] == [0, 1, 2, 3, 4, 5]


def test_two_callbacks_decide_together_on_one_budget():
    # One account per model and fit, one decision per epoch for both. Budget 9.5 %:
    # both calibrate (2 x 0.45) and measure (2 x 0.37) at the first epoch, D = 1.64. Then
    # 1.64 + 2 x 0.37 = 2.38 <= 0.095 T from T = 26 (epoch 25); the next would need
    # T >= 32.8, so the last epoch (29) comes first.
    clock = FakeClock()
    first, second = budgeted(clock, max_overhead=0.095), budgeted(clock, max_overhead=0.095)
    fit([first, second], 30, clock)
    assert first._ledger is second._ledger and first.shared is second.shared
    assert first.measurements["step"] == second.measurements["step"] == [0, 25, 29]
    # The second reused the first's eigenpairs at every epoch.
    assert first.shared.eig_runs == 3
    assert first._ledger.diagnostic == pytest.approx(0.9 + 6 * 0.37)


def test_subspace_alignment_reuses_the_spectrum_eigenvectors():
    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer=keras.optimizers.SGD(0.05))
    # Equal content, different array objects: matched by a hash of the probe batches.
    spectrum = HessianSpectrum((x[:32].copy(), y[:32].copy()), every_n_epochs=1, tol=1e-10)
    alignment = SubspaceAlignment((x[:32], y[:32]), every_n_epochs=1, tol=1e-10)
    other = SubspaceAlignment((x[:30], y[:30]), every_n_epochs=1, tol=1e-10)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[spectrum, alignment, other])
    assert alignment.operator is spectrum.operator
    assert other.operator is not spectrum.operator
    assert spectrum.shared.eig_runs == 2  # one per epoch; the alignment reused both
    assert other.shared.eig_runs == 2
    np.testing.assert_array_equal(alignment.eigenvectors, spectrum.eigenvectors)
    # The shared eigenvectors are those of the dense Hessian at the final weights.
    _, vectors, _ = dense_spectrum(model, x[:32], y[:32])
    overlap = np.abs(np.sum(vectors[:, :3] * alignment.eigenvectors, axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)


def test_a_looser_tolerance_is_not_reused_for_a_tighter_one():
    x, y = tiny_data()
    model = tiny_model()
    model.compile(loss=XENT, optimizer=keras.optimizers.SGD(0.05))
    spectrum = HessianSpectrum((x, y), every_n_epochs=1, tol=1e-2, trace_samples=3)
    alignment = SubspaceAlignment((x, y), every_n_epochs=1, tol=1e-10)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[spectrum, alignment])
    assert spectrum.shared is alignment.shared and spectrum.shared.eig_runs == 2
