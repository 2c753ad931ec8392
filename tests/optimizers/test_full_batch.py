"""The full-batch optimizers in ``fit``: the battery beyond the golden values.

Mini-batch detection, non-finite batches, save/load and resume, mixed precision,
distribution (fresh processes), bad arguments and the model zoo at the defaults.
"""

from __future__ import annotations

import functools
import os
import warnings

import keras
import numpy as np
import pytest

import keras_curv
from keras_curv.optimizers import LBFGS, LevenbergMarquardt, NewtonCG, NysNewtonCG
from tests.architectures import ZOO, first_epoch
from tests.optimizers._fresh_process import json_reports

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
OPTIMIZERS = {
    "lbfgs": lambda: LBFGS(),
    "newton_cg": lambda: NewtonCG(),
    "nys_newton_cg": lambda: NysNewtonCG(rank=4, seed=0),
    "levenberg_marquardt": lambda: LevenbergMarquardt(),
}


def _data(n=48, nan_row=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, 3, n)
    if nan_row is not None:
        x[nan_row, 1] = np.nan
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)]
    )


def _compiled(optimizer, **kwargs):
    model = _model()
    model.compile(optimizer=optimizer, loss=LOSS, **kwargs)
    return model


def _state(model):
    """Weights and optimizer state, without the skipped-steps counter."""
    state = [v for v in model.optimizer.variables if "skipped_steps" not in v.path]
    return [np.array(v) for v in [*model.get_weights(), *state]]


# -------------------------------------------------------------- batches


def test_a_fixed_full_batch_never_warns_even_shuffled():
    x, y = _data()
    model = _compiled(LBFGS())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = model.fit(x, y, batch_size=len(x), epochs=4, shuffle=True, verbose=0)
    assert int(model.optimizer.batch_changes) == 0
    losses = history.history["loss"]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # a line search: monotone


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_changing_batches_warn_once_and_are_counted(name):
    x, y = _data()
    model = _compiled(OPTIMIZERS[name]())
    with pytest.warns(UserWarning, match="full-batch method") as record:
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert sum("full-batch method" in str(w.message) for w in record) == 1
    # 6 steps; every one after the first sees another batch than its predecessor.
    assert int(model.optimizer.batch_changes) == 5
    assert np.all(np.isfinite(np.concatenate([w.ravel() for w in model.get_weights()])))
    summary = model.optimizer.curvature_summary()
    assert float(summary["batch_changes"]) == 5.0 and "step_size" in summary


@pytest.mark.parametrize("name", ["lbfgs", "levenberg_marquardt"])
def test_a_nan_batch_is_skipped_without_touching_weights_or_state(name):
    x, y = _data()
    bad, _ = _data(nan_row=3)
    model = _compiled(OPTIMIZERS[name]())
    states = []

    class Snapshots(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            states.append(_state(self.model))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN batch also counts as a changed batch
        model.fit(np.concatenate([x, bad, x]), np.concatenate([y, y, y]), batch_size=len(x),
                  shuffle=False, verbose=0, callbacks=[Snapshots()])  # fmt: skip
    assert int(model.optimizer.skipped_steps) == 1 and int(model.optimizer.iterations) == 2
    for before, after in zip(states[0], states[1]):
        np.testing.assert_array_equal(before, after)
    assert all(np.all(np.isfinite(v)) for v in states[2])


def test_loss_without_second_derivatives_is_refused():
    x, y = _data()
    model = _model()
    model.compile(optimizer=NewtonCG(), loss="mean_absolute_error")
    with pytest.raises(ValueError, match="mean_absolute_error.*second derivatives|second"):
        model.fit(x, np.eye(3)[y], batch_size=len(x), verbose=0)


# ------------------------------------------------------- save / load / resume


@pytest.mark.parametrize("name", ["lbfgs", "nys_newton_cg"])
def test_save_load_and_backup_resume_match_uninterrupted(name, tmp_path):
    x, y = _data()

    def fresh():
        return _compiled(OPTIMIZERS[name]())

    straight = fresh()
    straight.fit(x, y, batch_size=len(x), epochs=5, shuffle=False, verbose=0)

    first = fresh()
    first.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(first.optimizer)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.fit(x, y, batch_size=len(x), epochs=3, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed = fresh()
    with pytest.raises(RuntimeError, match="interrupted"):
        resumed.fit(x, y, batch_size=len(x), epochs=5, shuffle=False, verbose=0,
                    callbacks=[backup, Interrupt()])  # fmt: skip
    resumed = fresh()
    resumed.fit(x, y, batch_size=len(x), epochs=5, shuffle=False, verbose=0, callbacks=[backup])
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_config_round_trip(name):
    optimizer = OPTIMIZERS[name]()
    again = type(optimizer).from_config(optimizer.get_config())
    assert again.get_config() == optimizer.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is type(optimizer) and restored.get_config() == optimizer.get_config()


# -------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (LBFGS, {"memory": 0}, "memory"),
        (LBFGS, {"memory": 2.0}, "memory"),
        (LBFGS, {"c1": 0.95, "c2": 0.9}, "c2"),
        (LBFGS, {"max_evaluations": 0}, "max_evaluations"),
        (LBFGS, {"weight_decay": 0.1}, "weight_decay"),
        (LBFGS, {"clipnorm": 1.0}, "clipnorm"),
        (NewtonCG, {"curvature": "fisher"}, "curvature"),
        (NewtonCG, {"damping": -1.0}, "damping"),
        (NewtonCG, {"cg_tolerance": 1.0}, "cg_tolerance"),
        (NewtonCG, {"max_cg_iterations": 0}, "max_cg_iterations"),
        (NewtonCG, {"backtracking": 1.0}, "backtracking"),
        (NewtonCG, {"global_clipnorm": 1.0}, "global_clipnorm"),
        (NysNewtonCG, {"rank": 0}, "rank"),
        (NysNewtonCG, {"mu": 0.0}, "mu"),
        (NysNewtonCG, {"update_frequency": 0}, "update_frequency"),
        (NysNewtonCG, {"damping": 1.0}, "damping"),
        (NysNewtonCG, {"seed": 1.5}, "seed"),
        (LevenbergMarquardt, {"damping": 0.0}, "damping"),
        (LevenbergMarquardt, {"max_trials": 0}, "max_trials"),
        (LevenbergMarquardt, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_rank_above_the_parameter_count_is_refused():
    with pytest.raises(ValueError, match="rank"):
        NysNewtonCG(rank=100).build(_model().trainable_variables)


# --------------------------------------------------- distribution, precision


_CASE_SCRIPT = os.path.join(os.path.dirname(__file__), "_full_batch_distributed_case.py")


@functools.cache
def _distributed():
    groups = (
        ["lbfgs", "newton_cg_ggn", "lbfgs_loss_scaled"],
        ["nys_newton_cg", "levenberg_marquardt", "newton_cg_loss_scaled"],
    )
    report = {}
    for part in json_reports(_CASE_SCRIPT, groups, timeout=900):
        report.update(part)
    return report


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "lbfgs",
        "newton_cg_ggn",
        "nys_newton_cg",
        "levenberg_marquardt",
        "lbfgs_loss_scaled",
        "newton_cg_loss_scaled",
    ],
)
def test_two_replicas_equal_one_device(case):
    result = _distributed()[case]
    assert result["iterations"] == [4, 4] and result["batch_changes"] == 0
    assert result["moved"] > 0.3 and result["finite"]
    assert result["abs"] < 1e-9 * max(1.0, result["moved"]), result


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_state(policy):
    x, y = _data()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _model()
        model.compile(optimizer=LBFGS(), loss=LOSS)
        history = model.fit(x, y, batch_size=len(x), epochs=4, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    assert isinstance(inner, LBFGS)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16"
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    for v in inner.variables:
        assert np.all(np.isfinite(np.asarray(v, np.float64)))
    assert inner._state["s_memory"].dtype == "float32"


# ------------------------------------------------------------ the model zoo


def _training_mode_loss(model, x, y):
    return float(LOSS(y, model(x, training=True)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_defaults_train_every_zoo_model(name):
    """One full-batch step (their intended use) at the defaults lowers the training loss.

    For the BatchNorm CNN the loss is compared in training mode, the objective the step
    minimises: one step barely moves the moving statistics (momentum 0.99), so the
    inference-mode loss measures another network (docs/full_batch.md, BatchNorm).
    """
    build, data = ZOO[name]
    for factory in (LBFGS, NewtonCG, NysNewtonCG, LevenbergMarquardt):
        if name != "batchnorm_cnn":
            result = first_epoch(name, factory(), batch_size=512)
            before, after = result["initial"], result["final"]
        else:
            keras.utils.set_random_seed(0)
            x, y = data()
            model = build()
            model.compile(optimizer=factory(), loss=LOSS)
            before = _training_mode_loss(model, x, y)
            model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
            after = _training_mode_loss(model, x, y)
        assert np.isfinite(after) and after < before, (factory.__name__, before, after)


def test_exported_at_the_top_level():
    assert keras_curv.LBFGS is LBFGS and keras_curv.NysNewtonCG is NysNewtonCG
    assert keras_curv.NewtonCG is NewtonCG and keras_curv.LevenbergMarquardt is LevenbergMarquardt
