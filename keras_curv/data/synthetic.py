"""Synthetic tasks with planted structure, generated locally (no download)."""

from __future__ import annotations

import numpy as np

from keras_curv._internal.validation import integer


def motif_sequences(
    num_samples: int = 1024,
    *,
    sequence_length: int = 16,
    vocabulary: int = 32,
    num_classes: int = 4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences whose class is the two-token motif planted at a random position.

    Tokens ``0..C-1`` are reserved: class ``k``'s motif is the pair ``(k, (k + 1) % C)``;
    the rest of each sequence is drawn uniformly from the other tokens. A model must find
    the motif wherever it is, which attention and recurrence can and a bag of tokens can
    only partly (every motif shares a token with another class's).

    Returns:
        ``(tokens, labels)``: ``int32`` arrays of shapes ``(n, sequence_length)`` and ``(n,)``.

    Example:
        >>> x, y = motif_sequences(512, num_classes=4)
    """
    integer(num_samples, "num_samples", minimum=1)
    integer(sequence_length, "sequence_length", minimum=2)
    integer(num_classes, "num_classes", minimum=2)
    if integer(vocabulary, "vocabulary", minimum=1) <= num_classes:
        raise ValueError(
            f"`vocabulary` ({vocabulary}) must exceed `num_classes` ({num_classes}): the "
            "first num_classes tokens are the motifs."
        )
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_samples)
    tokens = rng.integers(num_classes, vocabulary, size=(num_samples, sequence_length))
    starts = rng.integers(0, sequence_length - 1, num_samples)
    rows = np.arange(num_samples)
    tokens[rows, starts] = labels
    tokens[rows, starts + 1] = (labels + 1) % num_classes
    return tokens.astype(np.int32), labels.astype(np.int32)


def split_halves(images: np.ndarray) -> dict[str, np.ndarray]:
    """Images ``(n, h, w, c)`` as two inputs, ``{"first": top half, "second": bottom half}``.

    For :func:`keras_curv.models.two_input_classifier` on real data.
    """
    images = np.asarray(images)
    middle = images.shape[1] // 2
    return {"first": images[:, :middle], "second": images[:, middle:]}


def spiked_regression(
    num_samples: int = 8192,
    num_features: int = 200,
    *,
    num_spikes: int = 10,
    condition: float = 1e4,
    spread: float = 10.0,
    noise: float = 0.1,
    rotate: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Least squares whose feature covariance has a few large eigenvalues over a flat bulk.

    The covariance is ``Q diag(λ) Qᵀ``: ``num_spikes`` eigenvalues spaced geometrically
    from ``condition · b`` down to ``condition · b / spread``, and ``b = 0.1`` for the
    other ``num_features − num_spikes`` (the ill-conditioning of real tabular data, where a
    few directions carry most of the variance). ``Q`` is a random rotation (``rotate``), or
    the identity (the large directions are single features). Targets are
    ``y = x w* + noise · ε`` with ``w*`` and ``ε`` standard normal, so the least-squares
    optimum of the mean squared error is about ``noise²``.

    Returns:
        ``(x, y)``: float32 arrays of shapes ``(n, num_features)`` and ``(n, 1)``.

    Example:
        >>> x, y = spiked_regression(8192, 200)  # condition 1e4, 10 spikes
    """
    integer(num_samples, "num_samples", minimum=1)
    integer(num_spikes, "num_spikes", minimum=0)
    if integer(num_features, "num_features", minimum=1) < num_spikes:
        raise ValueError(
            f"`num_spikes` ({num_spikes}) must not exceed `num_features` ({num_features})."
        )
    rng = np.random.default_rng(seed)
    bulk = 0.1
    spectrum = np.full(num_features, bulk)
    spectrum[:num_spikes] = np.geomspace(condition * bulk, condition * bulk / spread, num_spikes)
    basis = np.linalg.qr(rng.standard_normal((num_features, num_features)))[0]
    x = rng.standard_normal((num_samples, num_features)) * np.sqrt(spectrum)
    if rotate:
        x = x @ basis.T
    w = rng.standard_normal(num_features)
    y = x @ w + noise * rng.standard_normal(num_samples)
    return x.astype(np.float32), y[:, None].astype(np.float32)
