import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

import contextlib  # noqa: E402

import keras  # noqa: E402


@contextlib.contextmanager
def float64_everywhere():
    """floatx and the global dtype policy both float64 (a policy set earlier wins over floatx)."""
    policy = keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy(policy)
