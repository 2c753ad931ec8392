"""``keras.callbacks.BackupAndRestore``: an interrupted, resumed fit ends where an
uninterrupted one does, for both optimizers (AdaHessian's probe stream included), and
the diagnostic callbacks measure the same values."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_curv.callbacks import HessianSpectrum, SubspaceAlignment
from keras_curv.optimizers import AdaHessian, ClassSubspaceNewton

_OPTIMIZERS = {
    # A fixed seed: a probe generator that was not restored would restart its stream.
    "adahessian": lambda: AdaHessian(0.05, seed=1, weight_decay=0.01),
    "csn_paper_momentum": lambda: ClassSubspaceNewton(
        0.05, momentum=0.5, damping=0.1, curvature="paper"
    ),
    "csn_projected_update_each": lambda: ClassSubspaceNewton(
        0.05, curvature="projected_newton", damping=0.1, update_each=3
    ),
}
_EPOCHS, _INTERRUPT_AT = 4, 2


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == _INTERRUPT_AT:
            raise RuntimeError("simulated preemption")


def _run(name, callbacks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3))
    y = rng.integers(0, 3, 16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    model.compile(
        optimizer=_OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=4, epochs=_EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
    return model


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_backup_and_restore_resumes_to_the_uninterrupted_weights(name, tmp_path):
    reference = _run(name, [])
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _run(name, [keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    with warnings.catch_warnings():
        # Keras warns (and skips the whole optimizer state) when it cannot restore it.
        warnings.simplefilter("error", UserWarning)
        resumed = _run(name, [keras.callbacks.BackupAndRestore(backup)])
    # A fresh model and optimizer, resumed at epoch 2: only 2 epochs were trained here.
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations) == 16
    moved = max(
        float(np.max(np.abs(w.numpy() - w0))) for w, w0 in zip(resumed.weights, _initial(name))
    )
    assert moved > 0.05
    for a, b in zip(reference.weights, resumed.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-10)
    assert len(reference.optimizer.variables) == len(resumed.optimizer.variables)
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(
            np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=0, atol=1e-10
        )


def _initial(name):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    return [w.numpy() for w in model.weights]


# ------------------------------------------------------------- diagnostic callbacks

_SCHEDULES = {"epochs": {"every_n_epochs": 1}, "batches": {"every_n_batches": 3}}


def _measured(schedule, extra_callbacks):
    """Fits with HessianSpectrum and SubspaceAlignment on ``schedule``; their measurements."""
    rng = np.random.default_rng(1)
    probe = (rng.normal(size=(12, 3)), rng.integers(0, 3, 12))
    callbacks = [
        HessianSpectrum(probe, top_k=2, trace_samples=6, seed=3, **_SCHEDULES[schedule]),
        SubspaceAlignment(probe, top_k=3, seed=4, **_SCHEDULES[schedule]),
    ]
    try:
        _run("csn_paper_momentum", [*extra_callbacks, *callbacks])
    except RuntimeError as error:
        assert "simulated preemption" in str(error)
    return [c.measurements for c in callbacks]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(_SCHEDULES))
def test_callbacks_measure_the_same_after_backup_and_restore(schedule, tmp_path):
    """Probes are drawn from (seed, step): a resumed fit measures what an uninterrupted
    one does. Only the eigensolver's warm start differs (cold after the restart), so the
    values computed from eigenpairs agree to the solver's tol (1e-3 relative; 4e-5 seen
    here), the curvature-model measures, which use the eigenvectors (accurate to about the
    square root of the eigenvalues' error), to 1e-2 (1.3e-3 seen), and the Hutch++ trace,
    which uses no eigenpairs, to 1e-9."""
    reference = _measured(schedule, [])
    backup = str(tmp_path / "backup")
    first = _measured(schedule, [keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    second = _measured(schedule, [keras.callbacks.BackupAndRestore(backup)])
    steps = {"epochs": [0, 1, 2, 3], "batches": [3, 6, 9, 12, 15]}[schedule]
    for ref, a, b in zip(reference, first, second):
        assert ref["step"] == steps
        assert a["step"] + b["step"] == steps  # the resumed fit continues the step axis
        for key in ref:
            if key == "step":
                continue
            resumed = np.array(a[key] + b[key], np.float64)
            rtol = {"hessian_trace": 1e-9}.get(key, 1e-2 if "curvature_model" in key else 1e-3)
            np.testing.assert_allclose(resumed, ref[key], rtol=rtol, atol=1e-12, err_msg=key)
