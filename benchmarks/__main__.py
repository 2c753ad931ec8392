"""``python -m benchmarks`` (``make bench``): the whole suite; see :mod:`benchmarks.suite`."""

from benchmarks import suite  # first: it sets TensorFlow's environment before TF loads

if __name__ == "__main__":
    suite.main()
