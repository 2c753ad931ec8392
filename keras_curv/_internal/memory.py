"""Host-memory checks for optimizer state that grows with the number of classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def state_bytes(copies: int, variables: Sequence[Any]) -> int:
    """Bytes of ``copies`` vectors shaped and typed like ``variables`` together."""
    per_copy = sum(
        int(tf.TensorShape(v.shape).num_elements()) * tf.as_dtype(v.dtype).size for v in variables
    )
    return copies * per_copy


def ensure_fits(copies: int, variables: Sequence[Any], what: str, fix: str) -> int:
    """Raises before allocating ``copies`` parameter-sized vectors that cannot fit in memory.

    Args:
        copies: How many vectors the size of all of ``variables`` will be allocated.
        variables: The parameters.
        what: What is being allocated, for the message.
        fix: How to need less, for the message.

    Returns:
        The bytes needed.

    Raises:
        MemoryError: When they exceed the host's available memory.
    """
    needed = state_bytes(copies, variables)
    available = available_bytes()
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} needs {copies} parameter-sized vectors, {needed / 2**30:.2f} GiB, but only "
            f"{available / 2**30:.2f} GiB of host memory is available. {fix}"
        )
    return needed
