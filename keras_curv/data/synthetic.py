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
