"""Small reference classifiers used by the CLI, the examples and the benchmarks."""

from __future__ import annotations

import keras


def small_cnn(
    input_shape: tuple[int, ...], num_classes: int, *, filters: int = 8, dtype: str | None = None
) -> keras.Model:
    """A small convolutional classifier that outputs logits.

    ``Conv2D`` for image inputs ``(h, w, c)``, ``Conv1D`` for signals ``(length, c)``.

    Args:
        input_shape: Shape of one input, without the batch axis.
        num_classes: Number of classes C (size of the logit layer).
        filters: Channels of the first convolution (the second has twice as many).
        dtype: Layer dtype (``None``: the global policy).

    Returns:
        An uncompiled ``keras.Sequential`` model.

    Example:
        >>> model = small_cnn((8, 8, 1), 10)
    """
    if len(input_shape) == 3:
        conv, pool = keras.layers.Conv2D, keras.layers.MaxPooling2D
    elif len(input_shape) == 2:
        conv, pool = keras.layers.Conv1D, keras.layers.MaxPooling1D
    else:
        raise ValueError(
            f"small_cnn expects (h, w, c) images or (length, c) signals; got {input_shape}."
        )
    return keras.Sequential(
        [
            keras.Input(input_shape),
            conv(filters, 3, padding="same", activation="relu", dtype=dtype),
            conv(2 * filters, 3, padding="same", activation="relu", dtype=dtype),
            pool(2, dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
            keras.layers.Dense(num_classes, dtype=dtype),
        ],
        name="small_cnn",
    )
