"""One process of a two-worker ``MultiWorkerMirroredStrategy`` run, or its one-worker reference.

Run by ``test_multi_worker.py``: ``worker`` processes find the cluster and their index
in ``TF_CONFIG`` (two workers on 127.0.0.1, one CPU replica each) and train under
``tf.distribute.MultiWorkerMirroredStrategy`` with ring collectives; the ``single``
process trains the same models, from the same initial weights, on the same global
batches without a strategy. Each prints one JSON line: per case, the final weights
(as float64, which JSON writes exactly), the losses and the skipped steps, or the
error that stopped the case.

Paths (see ``CASES``):

* ``fit``: ``model.fit`` (the model attached with ``keras_curv.attach`` first, which
  installs the workaround for keras-team/keras#20585), then ``model.evaluate``;
* ``loop``: ``keras_curv.curvature_step`` inside ``strategy.run`` in a user
  ``tf.function``, over ``strategy.experimental_distribute_dataset``;
* ``resume``: ``fit`` with ``BackupAndRestore``, stopped after the first epoch and
  resumed by a new model and optimizer (its one-worker reference is ``fit``);
* ``nonfinite``: ``fit`` on data with one NaN sample, which lands on one worker only;
* ``canary`` and ``build_only``: plain Keras ``fit`` without the workaround, and with
  only its first half: both must still fail (when they stop, upstream has fixed it).

Usage: ``python tests/optimizers/_multi_worker_case.py worker|single BACKUP_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras_curv  # noqa: E402
from keras_curv._internal.keras_privates import build_from_a_local_batch  # noqa: E402

OPTIMIZERS = {
    "adahessian": lambda: keras_curv.AdaHessian(0.05, seed=3),
    "csn": lambda: keras_curv.ClassSubspaceNewton(0.05, curvature="paper", damping=0.1),
    "sgd": lambda: keras.optimizers.SGD(0.1),
}
# name -> (optimizer, path, dtype policy)
CASES = {
    "sgd_canary": ("sgd", "canary", "float64"),
    "sgd_build_only": ("sgd", "build_only", "float64"),
    "sgd_fit_f64": ("sgd", "fit", "float64"),
    "adahessian_fit_f64": ("adahessian", "fit", "float64"),
    "adahessian_fit_f32": ("adahessian", "fit", "float32"),
    "csn_fit_f64": ("csn", "fit", "float64"),
    "csn_fit_f32": ("csn", "fit", "float32"),
    "adahessian_loop_f64": ("adahessian", "loop", "float64"),
    "csn_loop_f64": ("csn", "loop", "float64"),
    "adahessian_resume_f64": ("adahessian", "resume", "float64"),
    "adahessian_nonfinite_f64": ("adahessian", "nonfinite", "float64"),
    "adahessian_fit_mixed_float16": ("adahessian", "fit", "mixed_float16"),
}
WORKER_ONLY = ("sgd_canary", "sgd_build_only", "adahessian_fit_mixed_float16")
GLOBAL_BATCH = 16
EPOCHS = 2
NAN_SAMPLE = 28  # in the second global batch, so the first step is a normal one


def _data(dtype: str, path: str):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 5)).astype("float32" if dtype.startswith("mixed") else dtype)
    y = rng.integers(0, 3, 48)
    if path == "nonfinite":
        x[NAN_SAMPLE, 2] = np.nan
    return x, y


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(
                6, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-3)
            ),
            keras.layers.Dense(3),
        ]
    )


def _loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compiled(strategy, optimizer: str, attach: bool = True) -> keras.Model:
    with strategy.scope():
        model = _model()
        if attach:
            keras_curv.attach(model)
        model.compile(optimizer=OPTIMIZERS[optimizer](), loss=_loss())
    return model


def _fit(model: keras.Model, x, y, callbacks=()) -> keras.callbacks.History:
    return model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


def _outcome(model: keras.Model, losses, optimizer=None) -> dict:
    optimizer = optimizer or model.optimizer
    skipped = getattr(getattr(optimizer, "inner_optimizer", optimizer), "skipped_steps", None)
    return {
        "weights": model.get_weights(),
        "losses": [float(v) for v in losses],
        "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations)),
        "skipped": None if skipped is None else int(keras.ops.convert_to_numpy(skipped)),
    }


class _Preempted(Exception):
    """Stands for a worker lost mid-training."""


class _Interrupt(keras.callbacks.Callback):
    """Stops training after the first epoch (after BackupAndRestore saved it)."""

    def on_epoch_end(self, epoch, logs=None):
        raise _Preempted(f"interrupted after epoch {epoch}")


def _resume(strategy, optimizer: str, x, y, backup: str) -> dict:
    # Keras 3's BackupAndRestore is not multi-worker aware: every worker writes its
    # files, so each needs its own directory (on one shared file, a worker's HDF5
    # lock makes the other fail).
    task = getattr(strategy, "cluster_resolver", None)
    directory = os.path.join(backup, f"worker-{task.task_id if task else 'single'}")
    try:
        backup_then_stop = [keras.callbacks.BackupAndRestore(directory), _Interrupt()]
        _fit(_compiled(strategy, optimizer), x, y, backup_then_stop)
    except _Preempted:
        pass
    else:
        raise AssertionError("the first fit was not interrupted")
    resumed = _compiled(strategy, optimizer)
    history = _fit(resumed, x, y, [keras.callbacks.BackupAndRestore(directory)])
    return _outcome(resumed, history.history["loss"])


def _loop(strategy, optimizer_name: str, x, y) -> dict:
    with strategy.scope():
        model = _model()
        optimizer = OPTIMIZERS[optimizer_name]()
        if optimizer_name == "adahessian":
            # As docs/hardening.md advises; CSN builds itself in the first step.
            optimizer.build(model.trainable_variables)
    # A Keras loss for AdaHessian, a plain batch-mean function for CSN: both are means
    # over the replica's own batch, which curvature_step turns into its share.
    if optimizer_name == "adahessian":
        loss = _loss()
    else:

        def loss(labels, logits):
            return tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = strategy.experimental_distribute_dataset(dataset.with_options(options))

    @tf.function
    def train_step(inputs, labels):
        def step(inputs, labels):
            return keras_curv.curvature_step(model, optimizer, loss, inputs, labels)

        shares = strategy.run(step, args=(inputs, labels))
        return strategy.reduce("SUM", shares, axis=None)

    losses = []
    for _ in range(EPOCHS):
        losses.append(np.mean([float(train_step(inputs, labels)) for inputs, labels in batches]))
    return _outcome(model, losses, optimizer)


def _case(strategy, name: str, backup: str) -> dict:
    optimizer, path, dtype = CASES[name]
    x, y = _data(dtype, path)
    if path == "canary" or path == "build_only":
        with strategy.scope():
            model = _model()
            if path == "build_only":
                build_from_a_local_batch(model)
            model.compile(optimizer=OPTIMIZERS[optimizer](), loss=_loss())
        return _outcome(model, _fit(model, x, y).history["loss"])
    if path == "loop":
        return _loop(strategy, optimizer, x, y)
    if path == "resume":
        return _resume(strategy, optimizer, x, y, os.path.join(backup, name))
    model = _compiled(strategy, optimizer)
    report = _outcome(model, _fit(model, x, y).history["loss"])
    if path == "fit":
        report["evaluated"] = model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0)
    return report


def _plain(weights) -> list[float]:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in weights]).tolist()


def _run(strategy, name: str, backup: str) -> dict:
    """The case under its dtype policy (floatx too: the losses are computed in it)."""
    dtype = CASES[name][2]
    keras.config.set_floatx("float32" if dtype.startswith("mixed") else dtype)
    keras.config.set_dtype_policy(dtype)
    start = time.perf_counter()
    try:
        report = _case(strategy, name, backup)
    except (ValueError, TypeError, RuntimeError, tf.errors.OpError) as error:
        report = {"error": f"{type(error).__name__}: {str(error)[-800:]}"}
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    if "weights" in report:
        report["weights"] = _plain(report["weights"])
    report["seconds"] = time.perf_counter() - start
    return report


def main(role: str, backup: str) -> None:
    if role == "worker":
        ring = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=ring)
        names = list(CASES)
    else:
        strategy = tf.distribute.get_strategy()
        names = [name for name in CASES if name not in WORKER_ONLY]
    report = {"num_replicas": strategy.num_replicas_in_sync, "initial": _plain(_model().weights)}
    for name in names:
        report[name] = _run(strategy, name, os.path.join(backup, role))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
