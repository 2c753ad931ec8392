"""Probe data: arrays or a finite ``tf.data.Dataset``, held as a list of device batches.

Curvature quantities are defined on a fixed probe set and accumulated exactly over
its batches, so the batches are materialised once (probe sets are small by design)
and reused by every matvec without touching the input pipeline again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from keras_curv._internal.validation import integer

DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class ProbeBatch:
    """One batch of the probe set: inputs, targets, optional sample weights."""

    x: Any
    y: tf.Tensor
    sample_weight: tf.Tensor | None
    size: int


@dataclass(frozen=True)
class ProbeData:
    """A finite probe set, split into device batches."""

    batches: tuple[ProbeBatch, ...]

    @property
    def num_samples(self) -> int:
        return sum(b.size for b in self.batches)


def _num_rows(x: Any) -> int:
    leaves = tf.nest.flatten(x)
    if not leaves:
        raise ValueError("The probe inputs `x` are empty: pass at least one sample.")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if -1 in sizes:
        raise ValueError("The probe inputs `x` must have a leading batch axis; got a scalar.")
    if len(sizes) != 1:
        raise ValueError(f"The probe inputs have different numbers of rows: {sorted(sizes)}.")
    return sizes.pop()


def _to_tensor(value: Any) -> Any:
    if value is None:
        return None
    return tf.nest.map_structure(tf.convert_to_tensor, value)


def _unpack(element: Any) -> tuple[Any, Any, Any]:
    if isinstance(element, (tuple, list)):
        if len(element) == 2:
            return element[0], element[1], None
        if len(element) == 3:
            return element[0], element[1], element[2]
    raise ValueError(
        "A probe dataset must yield `(x, y)` or `(x, y, sample_weight)` tuples; "
        f"got an element of type {type(element).__name__}."
    )


def probe_data(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    batch_size: int | None = None,
    *,
    targets_required: bool = True,
) -> ProbeData:
    """Normalises probe data into device batches.

    Args:
        x: Inputs (array, tensor, or a nest of them), or a finite ``tf.data.Dataset``
            yielding ``(x, y)`` or ``(x, y, sample_weight)``.
        y: Targets, when ``x`` holds arrays. Must be ``None`` for a dataset.
        sample_weight: Optional per-sample weights, when ``x`` holds arrays.
        batch_size: Rows per batch when ``x`` holds arrays (default 256). Ignored for
            datasets, which keep their own batching.
        targets_required: Refuse ``y=None`` for arrays (losses of inputs only, such as
            a PINN's residuals, pass ``False``; their batches have ``y=None``).

    Returns:
        A :class:`ProbeData` with at least one non-empty batch.

    Raises:
        ValueError: empty data, an infinite dataset, or mismatched lengths.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "Pass `y` and `sample_weight` inside the dataset, not as arguments, "
                "when `x` is a tf.data.Dataset."
            )
        if x.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "The probe dataset is infinite (it was `.repeat()`ed); curvature is "
                "defined on a finite probe set. Use `dataset.take(n)`."
            )
        batches = []
        for element in x:
            bx, by, bw = _unpack(element)
            n = _num_rows(bx)
            if n:
                batches.append(ProbeBatch(bx, by, bw, n))
        if not batches:
            raise ValueError("The probe dataset is empty: it yielded no samples.")
        return ProbeData(tuple(batches))

    if y is None and targets_required:
        raise ValueError("Probe data needs targets: pass `y` along with `x`.")
    n = _num_rows(x)
    if n == 0:
        raise ValueError("The probe inputs `x` are empty: pass at least one sample.")
    if y is not None and int(np.shape(y)[0]) != n:
        raise ValueError(f"`x` has {n} rows but `y` has {int(np.shape(y)[0])}.")
    if sample_weight is not None and int(np.shape(sample_weight)[0]) != n:
        raise ValueError(
            f"`x` has {n} rows but `sample_weight` has {int(np.shape(sample_weight)[0])}."
        )
    size = integer(batch_size, "batch_size", minimum=1, allow_none=True) or DEFAULT_BATCH_SIZE
    batches = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        rows = slice(start, stop)
        bx = tf.nest.map_structure(lambda a, rows=rows: a[rows], x)
        bw = None if sample_weight is None else sample_weight[rows]
        by = None if y is None else y[rows]
        batches.append(ProbeBatch(_to_tensor(bx), _to_tensor(by), _to_tensor(bw), stop - start))
    return ProbeData(tuple(batches))


def mean_over_batches(
    data: ProbeData, batch_fn: Callable[..., Any], *leading: Any, dtype: Any
) -> Any:
    """``(1/N) Σ_b batch_fn(*leading, x_b, y_b, w_b, n_b)``: exact over the probe set.

    ``batch_fn`` returns *sums* over its batch (a tensor or a nest of them), ``n_b`` is
    the batch's size as a scalar of ``dtype``, and ``N`` the number of samples; so a
    mean over the whole set comes out exactly, whatever the batching.
    """
    total = None
    for batch in data.batches:
        size = tf.constant(batch.size, dtype)
        part = batch_fn(*leading, batch.x, batch.y, batch.sample_weight, size)
        total = part if total is None else tf.nest.map_structure(tf.add, total, part)
    scale = tf.constant(1.0 / data.num_samples, dtype)
    return tf.nest.map_structure(lambda t: t * scale, total)


def _sparse_labels(y: tf.Tensor, num_classes: int) -> tf.Tensor | None:
    """Sparse labels as ``(n,)``, or ``None`` when ``y`` is one-hot ``(n, C)``.

    Raises:
        ValueError: labels of neither shape.
    """
    if y.shape.rank == 2 and y.shape[-1] == num_classes and num_classes > 1:
        return None
    if y.shape.rank == 2 and y.shape[-1] == 1:
        y = tf.squeeze(y, -1)
    if y.shape.rank != 1:
        raise ValueError(
            f"Labels must be sparse integers of shape (n,) or (n, 1), or one-hot of "
            f"shape (n, {num_classes}); got shape {tuple(y.shape)}."
        )
    return y


def label_validity(y: Any, num_classes: int) -> tuple[tf.Tensor, list[tf.Tensor], str]:
    """Whether class labels are valid targets of a C-class cross-entropy, as tensors.

    Sparse labels must be whole numbers in ``[0, C)``. One-hot (or soft) labels must
    be non-negative rows that sum to 1 (to 1e-3; 1e-2 for 16-bit labels), as
    ``categorical_crossentropy`` assumes. One-hot rows with NaN or Inf are not judged
    here: they make the loss non-finite, and the optimizers skip such steps. Built
    from tensor ops only, so that it works inside a traced step (a handful of
    reductions over the labels).

    Args:
        y: Sparse ``(n,)``/``(n, 1)`` or one-hot ``(n, C)`` labels.
        num_classes: Number of classes C.

    Returns:
        ``(valid, summary, form)``: a boolean scalar; the tensors that describe the
        labels (smallest and largest sparse label, or smallest entry and the row sum
        furthest from 1); ``"sparse"`` or ``"one-hot"``.

    Raises:
        ValueError: labels of the wrong shape (known statically).
    """
    y = tf.convert_to_tensor(y)
    sparse = _sparse_labels(y, num_classes)
    if sparse is None:
        values = tf.cast(y, tf.float32)
        loose = y.dtype in (tf.float16, tf.bfloat16)
        # Rows with NaN/Inf are left to the non-finite step handling (they give a
        # non-finite loss, and the optimizers skip such steps): judged as one-hot here.
        finite = tf.reduce_all(tf.math.is_finite(values), axis=-1, keepdims=True)
        values = tf.where(finite, values, tf.one_hot(0, num_classes, dtype=tf.float32))
        sums = tf.reduce_sum(values, axis=-1)
        low = tf.reduce_min(values)
        worst = tf.reduce_max(tf.abs(sums - 1.0))
        empty = tf.equal(tf.size(values), 0)
        ok = tf.logical_and(low >= 0.0, worst <= (1e-2 if loose else 1e-3))
        return tf.logical_or(empty, ok), [low, 1.0 + worst], "one-hot"
    if sparse.dtype.is_floating:
        # NaN fails this and +-Inf the range check (Keras would cast them to any integer).
        values = tf.cast(sparse, tf.float64)
        whole = tf.reduce_all(tf.equal(tf.floor(values), values))
    else:
        values, whole = tf.cast(sparse, tf.int64), True
    empty = tf.equal(tf.size(values), 0)
    # reduce_min/max of an empty tensor are +-inf (or the integer limits): masked by `empty`.
    low, high = tf.reduce_min(values), tf.reduce_max(values)
    in_range = tf.logical_and(low >= 0, high < tf.cast(num_classes, values.dtype))
    return tf.logical_or(empty, tf.logical_and(whole, in_range)), [low, high], "sparse"


def class_targets(y: tf.Tensor, num_classes: int, dtype: tf.DType) -> tf.Tensor:
    """One-hot ``(n, C)`` targets from sparse ``(n,)``/``(n, 1)`` or one-hot labels.

    Raises:
        ValueError: labels of the wrong shape, or (eagerly) sparse labels outside
            ``[0, C)`` or with fractional values.
    """
    y = tf.convert_to_tensor(y)
    sparse = _sparse_labels(y, num_classes)
    if sparse is None:
        return tf.cast(y, dtype)
    y = sparse
    if tf.executing_eagerly() and tf.size(y) > 0:
        # NaN fails this too: probe labels must be usable as they are.
        if y.dtype.is_floating and not bool(tf.reduce_all(tf.floor(y) == y)):
            raise ValueError("Sparse labels must be whole numbers; got fractional values.")
        valid, (low, high), _ = label_validity(y, num_classes)
        if not bool(valid):
            raise ValueError(
                f"Labels must lie in [0, {num_classes}) for a {num_classes}-class output; "
                f"got values from {int(low)} to {int(high)}."
            )
    return tf.one_hot(tf.cast(y, tf.int32), num_classes, dtype=dtype)
