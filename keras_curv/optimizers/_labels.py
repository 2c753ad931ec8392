"""Checks on the training labels of a curvature optimizer's step.

Keras's losses do not validate label *values*. Sparse labels outside ``[0, C)`` make
TensorFlow's loss kernel fail with its own message on CPU and return NaN on GPU and
under XLA; fractional sparse labels are truncated; one-hot rows that are not
distributions give a loss of the wrong sign or scale. None of this names the cause,
and for the curvature optimizers the NaN case would quietly become skipped steps.

:func:`guard_training_labels` adds, once per trace, an assertion on the batch's
labels that runs *before* the loss (its op is made a control input of every op that
already reads the labels), so graph execution stops at the first bad batch with a
message that names the problem and the fix. XLA compiles no assertions: the same
predicate is also returned, and the optimizers skip (and count) a step whose labels
are invalid, which is what happens under ``jit_compile``.
"""

from __future__ import annotations

import tensorflow as tf

from keras_curv._internal.data import label_validity
from keras_curv._internal.keras_privates import run_before, under_xla
from keras_curv._internal.losses import loss_family
from keras_curv.optimizers.batch import TrainBatch


def _message(owner: str, form: str, num_classes: int) -> str:
    if form == "sparse":
        return (
            f"{owner}: a training batch has sparse labels that are not whole numbers in "
            f"[0, {num_classes}) (the model outputs {num_classes} classes). Remap the labels "
            f"to 0..{num_classes - 1} (e.g. np.unique(y, return_inverse=True)[1]), or give "
            "the model's last layer one unit per class. Smallest and largest label:"
        )
    return (
        f"{owner}: a training batch has one-hot labels whose rows are not distributions "
        f"over the {num_classes} classes (entries must be >= 0 and each row must sum to 1). "
        "Pass one-hot rows (keras.utils.to_categorical), or integer labels with "
        "sparse_categorical_crossentropy. Smallest entry and the row sum furthest from 1:"
    )


def guard_training_labels(
    batch: TrainBatch, num_classes: int | None, owner: str, *, always: bool = False
) -> tf.Tensor | None:
    """Asserts that the step's labels fit a C-class cross-entropy; returns the predicate.

    Call it from the optimizer's ``apply`` while the step is traced.

    Args:
        batch: The traced step.
        num_classes: C, or ``None`` to read it from a single ``(batch, C)`` output.
        owner: Name used in the message.
        always: Check whatever the loss (``ClassSubspaceNewton`` reads the labels as
            class labels itself); otherwise only for Keras's (sparse) categorical
            cross-entropies, and never for custom losses.

    Returns:
        A boolean scalar (true when the labels are valid), or ``None`` when nothing was
        checked (another loss, several outputs, an unknown C).

    Raises:
        ValueError: labels whose shape fits neither form (known while tracing).
    """
    family = loss_family(getattr(batch.model, "loss", None))
    if not always and family not in ("categorical", "categorical_focal"):
        return None
    if batch.y is None or isinstance(batch.y, (list, tuple, dict)):
        return None
    if isinstance(batch.y_pred, (list, tuple, dict)):
        return None
    if num_classes is None:
        shape = batch.y_pred.shape
        if shape.rank != 2 or shape[-1] is None:
            return None
        num_classes = int(shape[-1])
    with batch.step_graph():
        labels = tf.convert_to_tensor(batch.y)
        readers = [] if under_xla() else list(labels.consumers())
        valid, summary, form = label_validity(labels, num_classes)
        if under_xla():
            return valid
        check = tf.debugging.Assert(valid, [_message(owner, form, num_classes), *summary])
        # Run before the loss that already reads the labels: otherwise TensorFlow's loss
        # kernel may fail first, with its own message. Where that is unsupported the
        # check still runs (and skips the step), only after the loss.
        for op in readers:
            run_before(op, check)
        with tf.control_dependencies([check]):
            return tf.identity(valid)


def as_finite_flag(valid: tf.Tensor | None) -> tf.Tensor | None:
    """0 when ``valid`` holds (or is ``None``), NaN otherwise.

    Lets the optimizers fold the label check into their finite-step predicate, which is
    already agreed over replicas.
    """
    if valid is None:
        return None
    return tf.where(valid, tf.constant(0.0), tf.constant(float("nan")))
