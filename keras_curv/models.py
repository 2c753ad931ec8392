"""Small reference classifiers used by the CLI, the examples and the benchmarks."""

from __future__ import annotations

import keras

from keras_curv._internal.validation import integer


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


def resnet9(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width: int = 64,
    batchnorm: bool = True,
    dtype: str | None = None,
) -> keras.Model:
    """The ResNet9 of the class-subspace paper's Fig. 1 (about 6.5M parameters at ``width=64``).

    Eight 3x3 convolutions, each followed by BatchNorm and ReLU, with channels
    ``w, 2w | 2w, 2w (residual) | 4w | 8w | 8w, 8w (residual)`` (``w`` = ``width``);
    a 2x2 max-pool after the ``2w``, ``4w`` and first ``8w`` convolutions; then a
    global max-pool and a dense layer of logits. The convolutions carry no bias (the
    BatchNorm shift plays its part). With ``width=64`` on ``(32, 32, 3)`` inputs and
    10 classes it has 6,577,610 parameters (6,573,130 trainable).

    Args:
        input_shape: ``(h, w, c)`` with ``h, w >= 8`` (three 2x2 poolings).
        num_classes: Number of classes C (size of the logit layer).
        width: Channels of the first convolution; the smoke examples use 4 or 8.
        batchnorm: ``False`` drops the BatchNorm layers (the convolutions then carry a
            bias), to study what BatchNorm does for an optimizer.
        dtype: Layer dtype (``None``: the global policy).

    Returns:
        An uncompiled functional ``keras.Model`` that outputs logits.

    Raises:
        ValueError: an input that is not ``(h, w, c)`` with ``h, w >= 8``, or ``width < 1``.

    Example:
        >>> model = resnet9((32, 32, 3), 10)
        >>> model.count_params()
        6577610
    """
    if len(input_shape) != 3 or min(input_shape[:2]) < 8:
        raise ValueError(
            f"resnet9 expects (h, w, c) images with h, w >= 8 (it pools three times); "
            f"got {input_shape}."
        )
    width = integer(width, "width", minimum=1)

    def conv_bn(tensor, filters):
        conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm, dtype=dtype)
        tensor = conv(tensor)
        if batchnorm:
            tensor = keras.layers.BatchNormalization(dtype=dtype)(tensor)
        return keras.layers.ReLU(dtype=dtype)(tensor)

    def residual(tensor, filters):
        branch = conv_bn(conv_bn(tensor, filters), filters)
        return keras.layers.Add(dtype=dtype)([tensor, branch])

    inputs = keras.Input(tuple(input_shape))
    x = conv_bn(inputs, width)
    x = keras.layers.MaxPooling2D(2, dtype=dtype)(conv_bn(x, 2 * width))
    x = residual(x, 2 * width)
    x = keras.layers.MaxPooling2D(2, dtype=dtype)(conv_bn(x, 4 * width))
    x = keras.layers.MaxPooling2D(2, dtype=dtype)(conv_bn(x, 8 * width))
    x = residual(x, 8 * width)
    x = keras.layers.GlobalMaxPooling2D(dtype=dtype)(x)
    outputs = keras.layers.Dense(num_classes, dtype=dtype)(x)
    return keras.Model(inputs, outputs, name="resnet9")


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: tuple[int, ...] = (64, 64),
    activation: str = "relu",
    dtype: str | None = None,
) -> keras.Model:
    """A fully connected classifier (inputs flattened) that outputs logits.

    Args:
        input_shape: Shape of one input, without the batch axis.
        num_classes: Number of classes C.
        widths: Hidden layer widths.
        activation: Hidden activation.
        dtype: Layer dtype (``None``: the global policy).

    Example:
        >>> model = mlp((8, 8, 1), 10)     # the digits MLP 64-64-10
    """
    layers = [keras.Input(input_shape), keras.layers.Flatten(dtype=dtype)]
    layers += [keras.layers.Dense(w, activation=activation, dtype=dtype) for w in widths]
    layers.append(keras.layers.Dense(num_classes, dtype=dtype))
    return keras.Sequential(layers, name="mlp")


def batchnorm_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    filters: int = 8,
    depthwise: bool = False,
    dtype: str | None = None,
) -> keras.Model:
    """A small CNN with BatchNormalization (and optionally a depthwise-separable block).

    ``Conv2D → BN → ReLU → [DepthwiseConv2D → BN → ReLU → 1x1 Conv2D] → Conv2D → BN → ReLU
    → global average pooling → Dense`` (logits).

    Example:
        >>> model = batchnorm_cnn((8, 8, 1), 10, depthwise=True)
    """
    inputs = keras.Input(input_shape)

    def block(h, layer):
        h = layer(h)
        h = keras.layers.BatchNormalization(dtype=dtype)(h)
        return keras.layers.Activation("relu", dtype=dtype)(h)

    h = block(inputs, keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, dtype=dtype))
    if depthwise:
        h = block(h, keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, dtype=dtype))
        h = keras.layers.Conv2D(2 * filters, 1, dtype=dtype)(h)
    h = block(h, keras.layers.Conv2D(2 * filters, 3, padding="same", use_bias=False, dtype=dtype))
    h = keras.layers.GlobalAveragePooling2D(dtype=dtype)(h)
    outputs = keras.layers.Dense(num_classes, dtype=dtype)(h)
    return keras.Model(inputs, outputs, name="batchnorm_cnn")


def transformer_classifier(
    sequence_length: int,
    vocabulary: int,
    num_classes: int,
    *,
    dim: int = 32,
    heads: int = 2,
    dropout: float = 0.1,
    dtype: str | None = None,
) -> keras.Model:
    """A one-block Transformer encoder over token ids that outputs logits.

    Token and position ``Embedding``s, ``MultiHeadAttention`` with a residual and
    ``LayerNormalization``, a ReLU feed-forward block with a residual and
    ``LayerNormalization``, ``Dropout``, mean pooling, ``Dense``.

    Example:
        >>> model = transformer_classifier(16, 32, 4)
    """
    tokens = keras.Input((sequence_length,), dtype="int32")
    positions = keras.ops.arange(sequence_length)
    h = keras.layers.Embedding(vocabulary, dim, dtype=dtype)(tokens)
    h = h + keras.layers.Embedding(sequence_length, dim, dtype=dtype)(positions)
    attended = keras.layers.MultiHeadAttention(heads, dim // heads, dtype=dtype)(h, h)
    h = keras.layers.LayerNormalization(dtype=dtype)(h + keras.layers.Dropout(dropout)(attended))
    forward = keras.layers.Dense(2 * dim, activation="relu", dtype=dtype)(h)
    forward = keras.layers.Dense(dim, dtype=dtype)(forward)
    h = keras.layers.LayerNormalization(dtype=dtype)(h + keras.layers.Dropout(dropout)(forward))
    h = keras.layers.GlobalAveragePooling1D(dtype=dtype)(h)
    return keras.Model(tokens, keras.layers.Dense(num_classes, dtype=dtype)(h), name="transformer")


def lstm_classifier(
    sequence_length: int,
    vocabulary: int,
    num_classes: int,
    *,
    units: int = 32,
    dtype: str | None = None,
) -> keras.Model:
    """``Embedding → LSTM → Dense`` over token ids, outputting logits.

    Example:
        >>> model = lstm_classifier(16, 32, 4)
    """
    return keras.Sequential(
        [
            keras.Input((sequence_length,), dtype="int32"),
            keras.layers.Embedding(vocabulary, 16, dtype=dtype),
            keras.layers.LSTM(units, dtype=dtype),
            keras.layers.Dense(num_classes, dtype=dtype),
        ],
        name="lstm",
    )


def two_input_classifier(
    first_shape: tuple[int, ...],
    second_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 32,
    dtype: str | None = None,
) -> keras.Model:
    """A Functional model with two inputs (a dict ``{"first", "second"}``) and logits.

    Each input goes through its own ``Dense`` branch; the branches are concatenated.

    Example:
        >>> model = two_input_classifier((32,), (32,), 10)
    """
    first = keras.Input(first_shape, name="first")
    second = keras.Input(second_shape, name="second")
    a = keras.layers.Dense(width, activation="relu", dtype=dtype)(keras.layers.Flatten()(first))
    b = keras.layers.Dense(width, activation="tanh", dtype=dtype)(keras.layers.Flatten()(second))
    h = keras.layers.Concatenate(dtype=dtype)([a, b])
    outputs = keras.layers.Dense(num_classes, dtype=dtype)(h)
    return keras.Model({"first": first, "second": second}, outputs, name="two_input")


def batchnorm_resnet(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width: int = 16,
    dtype: str | None = None,
) -> keras.Model:
    """A small ResNet with BatchNormalization (about 20k parameters at ``width=16``).

    ``Conv 3x3 (w) → BN → ReLU``, a residual block of two ``Conv → BN`` at ``w`` channels,
    a strided block to ``2w`` channels (3x3 stride 2 and 3x3 on the branch, a 1x1
    stride-2 convolution with BN on the shortcut), global average pooling, ``Dense``
    logits. Convolutions carry no bias. On ``(16, 16, 3)`` inputs with 10 classes and
    ``width=16`` it has 19,994 trainable parameters (20,282 in all).

    Args:
        input_shape: ``(h, w, c)`` images.
        num_classes: Number of classes C.
        width: Channels of the first stage.
        dtype: Layer dtype (``None``: the global policy).

    Example:
        >>> model = batchnorm_resnet((16, 16, 3), 10)
    """
    if len(input_shape) != 3:
        raise ValueError(f"batchnorm_resnet expects (h, w, c) images; got {input_shape}.")
    width = integer(width, "width", minimum=1)

    def conv_bn(tensor, filters, strides=1, kernel=3):
        tensor = keras.layers.Conv2D(
            filters, kernel, strides=strides, padding="same", use_bias=False, dtype=dtype
        )(tensor)
        return keras.layers.BatchNormalization(dtype=dtype)(tensor)

    def block(tensor, filters, strides=1):
        branch = keras.layers.ReLU(dtype=dtype)(conv_bn(tensor, filters, strides))
        branch = conv_bn(branch, filters)
        shortcut = tensor if strides == 1 else conv_bn(tensor, filters, strides, kernel=1)
        return keras.layers.ReLU(dtype=dtype)(keras.layers.Add(dtype=dtype)([shortcut, branch]))

    inputs = keras.Input(tuple(input_shape))
    x = keras.layers.ReLU(dtype=dtype)(conv_bn(inputs, width))
    x = block(x, width)
    x = block(x, 2 * width, strides=2)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    outputs = keras.layers.Dense(num_classes, dtype=dtype)(x)
    return keras.Model(inputs, outputs, name="batchnorm_resnet")


def mobilenet_v2(
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    *,
    alpha: float = 0.35,
) -> keras.Model:
    """``keras.applications.MobileNetV2`` from scratch (``weights=None``), softmax outputs.

    At the defaults (α = 0.35, 32×32×3, 10 classes) it has 408,938 trainable parameters
    (423,018 in all): depthwise-separable inverted residuals with BatchNormalization and ReLU6, the
    architecture people fine-tune on small images.

    Example:
        >>> model = mobilenet_v2()
    """
    import warnings

    with warnings.catch_warnings():
        # Keras warns that 32x32 is not one of the ImageNet sizes; no weights are loaded.
        warnings.simplefilter("ignore", UserWarning)
        return keras.applications.MobileNetV2(
            input_shape=tuple(input_shape), alpha=alpha, weights=None, classes=num_classes
        )
