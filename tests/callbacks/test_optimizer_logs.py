"""OptimizerLogs: the optimizer's curvature_summary() in logs, History and TensorBoard."""

import keras
import numpy as np
import pytest

from keras_curv.callbacks import OptimizerLogs
from keras_curv.optimizers import AdaHessian, Sophia
from tests.callbacks.conftest import read_events, tiny_data, tiny_model

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Seen(keras.callbacks.Callback):
    """Records the logs every later callback sees, with the clip fraction of the state."""

    def __init__(self):
        super().__init__()
        self.batches, self.epochs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((dict(logs), float(self.model.optimizer.clip_fraction)))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(logs))


def _fit(callbacks, epochs=2, **fit_kwargs):
    x, y = tiny_data(n=24)
    model = tiny_model()
    model.compile(optimizer=Sophia(0.05, update_every=2, seed=0), loss=LOSS)
    history = model.fit(
        x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks,
        **fit_kwargs,
    )  # fmt: skip
    return model, history


def test_every_scalar_reaches_history_and_later_callbacks_each_n_batches():
    seen = _Seen()
    model, history = _fit([OptimizerLogs(every_n_batches=2), seen])
    summary = {k: float(v) for k, v in model.optimizer.curvature_summary().items()}
    assert set(summary) == {
        "clip_fraction", "win_rate", "hessian_diagonal_mean", "hessian_updates", "skipped_steps"
    }  # fmt: skip
    for name, value in summary.items():
        assert history.history[name][-1] == pytest.approx(value)
    assert history.history["hessian_updates"] == [2.0, 5.0]  # estimates at steps 2, 4, ...
    # Batches 2, 4, 6 of each epoch: the clip fraction of the state after that batch.
    logged = [(b, logs["clip_fraction"], c) for b, (logs, c) in enumerate(seen.batches)
              if "clip_fraction" in logs]  # fmt: skip
    assert [b for b, _, _ in logged] == [1, 3, 5, 7, 9, 11]
    for _, value, state in logged:
        assert value == pytest.approx(state)
    assert 0.0 < summary["clip_fraction"] < 1.0


def test_keys_select_and_training_is_unchanged():
    plain, _ = _fit([])
    model, history = _fit([OptimizerLogs(keys="win_rate")])
    assert "win_rate" in history.history and "clip_fraction" not in history.history
    for a, b in zip(plain.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_steps_are_epochs_or_global_batches(tmp_path, needs_tensorboard):
    _fit([OptimizerLogs(keys=["clip_fraction"], log_dir=tmp_path / "epochs")], epochs=3)
    events = read_events(str(tmp_path / "epochs" / "curvature"))
    assert [step for step, _, _ in events["optimizer/clip_fraction"]] == [0, 1, 2]
    # Batches 4, 6 per epoch of 6 batches: the epoch end adds no second point at 6, 12.
    _fit([OptimizerLogs(keys=["win_rate"], every_n_batches=4, log_dir=tmp_path / "b")])
    events = read_events(str(tmp_path / "b" / "curvature"))
    assert [step for step, _, _ in events["optimizer/win_rate"]] == [4, 6, 8, 12]


def test_other_optimizers_and_bad_keys_raise_clear_errors():
    x, y = tiny_data(n=8)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(), loss=LOSS)
    with pytest.raises(ValueError, match="curvature_summary.*Adam"):
        model.fit(x, y, verbose=0, callbacks=[OptimizerLogs()])
    with pytest.raises(ValueError, match=r"\['win'\] not in .*'win_rate'"):
        _fit([OptimizerLogs(keys=["win"])], epochs=1)
    with pytest.raises(ValueError, match="every_n_batches"):
        OptimizerLogs(every_n_batches=0)


def test_works_for_any_optimizer_with_a_summary():
    x, y = tiny_data(n=16)
    model = tiny_model()
    model.compile(optimizer=AdaHessian(0.05, seed=0), loss=LOSS)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[OptimizerLogs()])
    summary = model.optimizer.curvature_summary()
    # A vector entry (one value per variable) gives one scalar per entry.
    per_variable = np.asarray(summary.pop("hessian_diagonal_rms_per_variable"))
    expected = {k: float(v) for k, v in summary.items()}
    expected.update(
        {f"hessian_diagonal_rms_per_variable_{i + 1}": v for i, v in enumerate(per_variable)}
    )
    assert len(per_variable) == 4
    assert {k: history.history[k][-1] for k in expected} == pytest.approx(expected)
