"""The Keras and TensorFlow releases keras-curv needs, checked once at import.

The floors are measured, not guessed: ``tools/check_floor.sh`` installs exactly
these releases and runs a smoke subset of the tests; ``docs/compatibility.md``
records how they were found and which API sets each one. Keep the numbers here,
in ``pyproject.toml`` and in that page equal (a test checks the first two).
"""

from __future__ import annotations

import re

# Optimizer.add_optimizer_variables (the optimizers' `build`) arrived in Keras 3.10.
KERAS_FLOOR = "3.10.0"
# Exclusive: the Keras privates relied on (keras_privates.py) are Keras 3's.
KERAS_CEILING = "4"
# The first TensorFlow built for Keras 3 (2.15 pins keras<2.16); 2.16.0 was never on PyPI.
TENSORFLOW_FLOOR = "2.16.1"

# Public APIs whose arrival bounds the floors, with the release that brought each
# (Keras: read from the 3.0 to 3.10 wheels; TensorFlow: older than its floor).
# tests/_internal/test_versions.py checks that each resolves in the installed
# releases. The privates are pinned apart, in keras_privates and its test.
REQUIRED_APIS: dict[str, str] = {
    "keras.optimizers.Optimizer.add_optimizer_variables": "keras 3.10",
    "keras.optimizers.Optimizer.scale_loss": "keras 3.0",
    "keras.Model.stateless_call": "keras 3.0",
    "keras.random.SeedGenerator": "keras 3.0",
    "tf.autodiff.ForwardAccumulator": "tensorflow < 2.16",
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.16.0rc1"`` gives ``(2, 16, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"Cannot read a release number from version {version!r}.")
    return tuple(int(part) for part in match.group(0).split("."))


def _at_least(version: str, floor: str) -> bool:
    found, wanted = release(version), release(floor)
    width = max(len(found), len(wanted))
    return found + (0,) * (width - len(found)) >= wanted + (0,) * (width - len(wanted))


def check_versions(
    keras_version: str | None = None,
    tensorflow_version: str | None = None,
    backend: str | None = None,
) -> None:
    """Raise ImportError, naming the fix, when the installed Keras or TensorFlow cannot work.

    Args:
        keras_version: Version to judge; default the installed ``keras.__version__``.
        tensorflow_version: Version to judge; default the installed ``tf.__version__``.
        backend: Keras backend to judge; default ``keras.backend.backend()``.

    Raises:
        ImportError: TensorFlow older than :data:`TENSORFLOW_FLOOR`, Keras outside
            ``[KERAS_FLOOR, KERAS_CEILING)``, or a Keras backend other than TensorFlow.
    """
    if tensorflow_version is None:
        # TensorFlow first: a Keras 3 on an older TensorFlow may fail inside `import keras`.
        import tensorflow as tf

        tensorflow_version = tf.__version__
    if not _at_least(tensorflow_version, TENSORFLOW_FLOOR):
        raise ImportError(
            f"keras-curv needs tensorflow>={TENSORFLOW_FLOOR} (the first TensorFlow built for "
            f"Keras 3), but tensorflow {tensorflow_version} is installed. Upgrade with "
            f"`pip install -U 'tensorflow>={TENSORFLOW_FLOOR}'`."
        )
    if keras_version is None or backend is None:
        import keras

        keras_version = keras.__version__ if keras_version is None else keras_version
        backend = keras.backend.backend() if backend is None else backend
    if not _at_least(keras_version, KERAS_FLOOR) or _at_least(keras_version, KERAS_CEILING):
        raise ImportError(
            f"keras-curv needs keras>={KERAS_FLOOR},<{KERAS_CEILING} (its optimizers build "
            f"their state with Optimizer.add_optimizer_variables, new in Keras 3.10), but "
            f"keras {keras_version} is installed. Install a supported release with "
            f"`pip install -U 'keras>={KERAS_FLOOR},<{KERAS_CEILING}'`."
        )
    if backend != "tensorflow":
        raise ImportError(
            f"keras-curv runs on the TensorFlow backend, but Keras is using {backend!r}. Set "
            "the environment variable KERAS_BACKEND=tensorflow (or `backend` in "
            "~/.keras/keras.json) before the first `import keras`."
        )
