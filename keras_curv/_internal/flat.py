"""The flat parameter layout shared by every operator, estimator and optimizer.

A *flat vector* holds one entry per trainable scalar: each variable of
``model.trainable_variables`` flattened row-major, concatenated in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def variable_shapes(variables: Sequence) -> list[tuple[int, ...]]:
    """Static shapes of ``variables``, as tuples of ints."""
    return [tuple(int(d) for d in v.shape) for v in variables]


def flat_dim(variables: Sequence) -> int:
    """Number of scalars in ``variables``."""
    return int(sum(int(np.prod(shape)) for shape in variable_shapes(variables)))


def flatten(tensors: Sequence[tf.Tensor], dtype: tf.DType | None = None) -> tf.Tensor:
    """Concatenates ``tensors`` row-major into one flat vector.

    ``None`` entries (variables the loss does not depend on) contribute zeros
    only if ``tensors`` gives their shape; callers pass zeros instead.
    """
    parts = [tf.reshape(t, [-1]) for t in tensors]
    if dtype is not None:
        parts = [tf.cast(p, dtype) for p in parts]
    return tf.concat(parts, axis=0)


def unflatten(vector: tf.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[tf.Tensor]:
    """Splits a flat vector (or a ``(dim, k)`` block) into tensors of ``shapes``.

    For a block, each piece has shape ``shape + (k,)``.
    """
    sizes = [int(np.prod(shape)) for shape in shapes]
    pieces = tf.split(vector, sizes, axis=0)
    if vector.shape.rank == 1:
        return [tf.reshape(p, shape) for p, shape in zip(pieces, shapes)]
    k = tf.shape(vector)[1]
    return [tf.reshape(p, tf.concat([shape, [k]], 0)) for p, shape in zip(pieces, shapes)]


def densify(gradient: tf.Tensor | tf.IndexedSlices, variable: tf.Tensor) -> tf.Tensor:
    """A gradient as a dense tensor of ``variable``'s shape, silently.

    An ``Embedding`` table's gradient is a ``tf.IndexedSlices``. Summing its rows into
    place with ``unsorted_segment_sum`` is what ``tf.convert_to_tensor`` does, without
    the warning TensorFlow logs when it has to do so inside a vectorised Jacobian.
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    rows = tf.shape(variable)[0]
    dense = tf.math.unsorted_segment_sum(gradient.values, gradient.indices, rows)
    return tf.reshape(dense, tf.shape(variable))


def zeros_for_none(grads: Sequence, variables: Sequence) -> list[tf.Tensor]:
    """Replaces ``None`` gradients by zeros of the matching variable, and densifies.

    An ``Embedding`` table's gradient is a ``tf.IndexedSlices``; curvature code
    differentiates gradients again, stacks and flattens them, which needs dense
    tensors (``tf.gradients`` of an ``IndexedSlices`` recurses without end).
    """
    return [tf.zeros_like(v) if g is None else densify(g, v) for g, v in zip(grads, variables)]


def variable_positions(variables: Sequence, block: Sequence | None) -> list[int]:
    """Positions in ``variables`` of the ``block`` variables (all when ``None``), in order.

    Raises:
        ValueError: an empty block, or a block variable that is not among ``variables``.
    """
    if block is None:
        return list(range(len(variables)))
    wanted = {id(v) for v in block}
    if not wanted:
        raise ValueError("`variables` is empty: a block needs at least one trainable variable.")
    positions = [i for i, v in enumerate(variables) if id(v) in wanted]
    if len(positions) != len(wanted):
        known = {id(v) for v in variables}
        missing = [getattr(v, "path", getattr(v, "name", "?")) for v in block if id(v) not in known]
        raise ValueError(
            f"`variables` must be trainable variables of the model; not among them: {missing}."
        )
    return positions


def variable_ranges(variables: Sequence, block: Sequence) -> list[tuple[int, int]]:
    """The ``(start, stop)`` flat index ranges of the ``block`` variables within ``variables``."""
    sizes = [int(np.prod(shape)) for shape in variable_shapes(variables)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [(int(starts[i]), int(starts[i + 1])) for i in variable_positions(variables, block)]


def flatten_rows(tensors: Sequence[tf.Tensor], dtype: tf.DType | None = None) -> tf.Tensor:
    """``(k, *shape)`` tensors, one per variable, as one ``(k, dim)`` block of flat rows."""
    parts = [tf.reshape(t, [tf.shape(t)[0], -1]) for t in tensors]
    if dtype is not None:
        parts = [tf.cast(p, dtype) for p in parts]
    return tf.concat(parts, axis=1)


def unflatten_rows(rows: tf.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[tf.Tensor]:
    """Splits a ``(k, dim)`` block of flat rows into ``(k, *shape)`` tensors of ``shapes``."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    pieces = tf.split(rows, sizes, axis=1)
    return [tf.reshape(p, [-1, *shape]) for p, shape in zip(pieces, shapes)]
