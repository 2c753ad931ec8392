"""Small classification datasets as NumPy arrays, for the CLI, examples, tests and benchmarks.

Two datasets work offline and are always available:

* ``"digits"``: scikit-learn's 1,797 real 8x8 handwritten digits (shipped with
  scikit-learn), as ``(8, 8, 1)`` images in ``[0, 1]``.
* ``"mnist1d"``: MNIST-1D signals of length 40, generated locally by the
  ``mnist1d`` package from its digit templates, standardised to zero mean and unit
  variance and cached on disk.

Four more come from tensorflow-datasets (``"mnist"``, ``"fashion_mnist"``,
``"cifar10"``, ``"cifar100"``) and need either a prepared ``data_dir`` or network
access; when neither is there, :class:`DatasetUnavailableError` says so in one line.

Heavy optional dependencies (scikit-learn, mnist1d, tensorflow-datasets) are imported
only by the loader that needs them.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_curv._internal.validation import choice, integer, number

OFFLINE_DATASETS = ("digits", "mnist1d")
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
DATASET_NAMES = OFFLINE_DATASETS + TFDS_DATASETS

_TFDS_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}

# Bump when the arrays written to the cache change meaning, so stale files are ignored.
_CACHE_FORMAT = 1


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be found locally nor downloaded.

    The message is a single sentence meant to be shown to a user as is (the CLI prints
    it without a traceback); the underlying error is kept as ``__cause__``.
    """


@dataclass(frozen=True)
class DatasetSplits:
    """A train/test split of a classification dataset, held as NumPy arrays.

    Attributes:
        name: The dataset name passed to :func:`load_dataset`.
        x_train: ``float32`` inputs of shape ``(n_train, *input_shape)``.
        y_train: ``int32`` labels in ``[0, num_classes)``, shape ``(n_train,)``.
        x_test: ``float32`` inputs of shape ``(n_test, *input_shape)``.
        y_test: ``int32`` labels, shape ``(n_test,)``.
        num_classes: Number of classes ``C``.
        input_shape: Shape of one input, without the batch axis.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])


def default_cache_dir() -> Path:
    """Where generated datasets are cached: ``$KERAS_CURV_CACHE`` or ``~/.cache/keras_curv``."""
    override = os.environ.get("KERAS_CURV_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "keras_curv"


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
    download: bool = True,
    mnist1d_samples: int = 5000,
) -> DatasetSplits:
    """Loads a small classification dataset as NumPy train/test arrays.

    Splits of ``"digits"`` and ``"mnist1d"`` are stratified: each class keeps
    ``round(test_fraction * n_c)`` of its ``n_c`` samples for testing (up to one
    sample of rounding per class), chosen by ``seed``. The tensorflow-datasets names
    use their official train/test splits and ignore ``test_fraction``. Subsampling by
    ``max_train``/``max_test`` is also stratified: a class with ``n_c`` of the ``n``
    samples contributes about ``k * n_c / n`` of the ``k`` kept.

    Args:
        name: One of ``"digits"``, ``"mnist1d"``, ``"mnist"``, ``"fashion_mnist"``,
            ``"cifar10"``, ``"cifar100"``.
        data_dir: For tensorflow-datasets names, the tfds data directory (``None``:
            tfds's default). For ``"mnist1d"``, the folder holding the generated-data
            cache (``None``: :func:`default_cache_dir`). Unused by ``"digits"``.
        seed: Seeds the split, the subsampling and the MNIST-1D generator; the same
            seed always gives the same arrays.
        test_fraction: Share of samples held out for testing, in ``(0, 1)``.
        max_train: Keep at most this many training samples (smoke runs).
        max_test: Keep at most this many test samples.
        download: Let tensorflow-datasets download and prepare missing data. With
            ``False`` a missing dataset fails at once, without touching the network.
        mnist1d_samples: Total MNIST-1D samples to generate (train plus test); a
            multiple of 10 keeps the classes exactly balanced.

    Returns:
        A :class:`DatasetSplits` with ``float32`` inputs and ``int32`` labels.

    Raises:
        ValueError: an unknown name or an out-of-range argument.
        DatasetUnavailableError: a tensorflow-datasets name whose data is neither in
            ``data_dir`` nor downloadable.

    Example:
        >>> data = load_dataset("digits", seed=0)
        >>> data.x_train.shape, data.num_classes
        ((1438, 8, 8, 1), 10)
    """
    choice(name, "name", DATASET_NAMES)
    test_fraction = number(
        test_fraction, "test_fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    max_train = integer(max_train, "max_train", minimum=1, allow_none=True)
    max_test = integer(max_test, "max_test", minimum=1, allow_none=True)
    mnist1d_samples = integer(mnist1d_samples, "mnist1d_samples", minimum=20)

    if name == "digits":
        data = _load_digits(seed, test_fraction)
    elif name == "mnist1d":
        data = _load_mnist1d(data_dir, seed, test_fraction, mnist1d_samples)
    else:
        data = _load_tfds(name, data_dir, download)

    rng = np.random.default_rng([seed, 1])
    x_train, y_train = _subsample(data.x_train, data.y_train, max_train, rng)
    x_test, y_test = _subsample(data.x_test, data.y_test, max_test, rng)
    return DatasetSplits(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
    )


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(len(y))`` whose every prefix is near class-proportional.

    Each sample gets the key ``(rank within its shuffled class + 1/2) / class size``;
    sorting by it interleaves the classes so that any prefix of length ``k`` holds
    ``k * n_c / n`` samples of class ``c``, up to rounding.
    """
    n = len(y)
    shuffled = rng.permutation(n)
    keys = np.empty(n, dtype=np.float64)
    labels = y[shuffled]
    for c in np.unique(labels):
        members = shuffled[labels == c]
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    # The random tie-break keeps classes of equal size from always coming in label order.
    return np.lexsort((rng.random(n), keys))


def _stratified_split(x, y, test_fraction, seed):
    rng = np.random.default_rng([seed, 0])
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        count = int(round(test_fraction * len(members)))
        test[rng.choice(members, size=count, replace=False)] = True
    return x[~test], y[~test], x[test], y[test]


def _subsample(x, y, limit, rng):
    if limit is None or limit >= len(y):
        return x, y
    keep = np.sort(_stratified_order(y, rng)[:limit])
    return x[keep], y[keep]


def _splits(name, x, y, test_fraction, seed, num_classes):
    x_train, y_train, x_test, y_test = _stratified_split(x, y, test_fraction, seed)
    return DatasetSplits(
        name=name,
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=y_train.astype(np.int32),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=y_test.astype(np.int32),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
    )


def _load_digits(seed: int, test_fraction: float) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel intensities are integer counts 0..16 (4x4 blocks of a 32x32 bitmap).
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    return _splits("digits", x, bunch.target, test_fraction, seed, 10)


def _load_mnist1d(data_dir, seed: int, test_fraction: float, num_samples: int) -> DatasetSplits:
    x, y = _mnist1d_arrays(Path(data_dir) if data_dir is not None else None, seed, num_samples)
    return _splits("mnist1d", x[..., None], y, test_fraction, seed, 10)


def _mnist1d_arrays(cache_dir: Path | None, seed: int, num_samples: int):
    """The full MNIST-1D set ``(x (n, 40) float32, y (n,) int64)``, from cache or generated."""
    import mnist1d

    version = getattr(mnist1d, "__version__", None) or _package_version("mnist1d")
    # The key covers everything that changes the arrays: generator version, size and seed.
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{version}|{num_samples}|{seed}".encode()).hexdigest()
    folder = cache_dir if cache_dir is not None else default_cache_dir()
    path = folder / f"mnist1d-n{num_samples}-seed{seed}-{key[:12]}.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                x, y = stored["x"], stored["y"]
            if x.shape == (num_samples - num_samples % 10, 40) and y.shape == x.shape[:1]:
                return x, y
        except (OSError, ValueError, KeyError):
            pass  # A truncated or foreign file: regenerate and overwrite it.

    x, y = _generate_mnist1d(seed, num_samples)
    folder.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent or interrupted run never sees half a file.
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(partial, x=x, y=y)
    os.replace(partial, path)
    return x, y


def _generate_mnist1d(seed: int, num_samples: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # Keep every sample in one pool; the stratified split is ours, like for digits.
    args.train_split = 1.0
    # The generator reseeds Python's and NumPy's global RNGs; restore them afterwards
    # so that loading data never changes the caller's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)
    y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
    return x, y


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _load_tfds(name: str, data_dir, download: bool) -> DatasetSplits:
    where = _tfds_location(data_dir)
    hint = "use an offline dataset instead: 'digits' or 'mnist1d'"
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DatasetUnavailableError(
            f"Dataset {name!r} needs tensorflow-datasets, which is not installed "
            f"(pip install 'keras-curv[data]'); {hint}."
        ) from err
    try:
        train, test = tfds.load(
            name,
            split=["train", "test"],
            data_dir=None if data_dir is None else os.fspath(data_dir),
            as_supervised=True,
            download=download,
            # Never fall back to Google Cloud Storage: offline it only adds retries.
            try_gcs=False,
        )
        x_train, y_train = _tfds_to_numpy(train, tfds.as_numpy)
        x_test, y_test = _tfds_to_numpy(test, tfds.as_numpy)
    except Exception as err:  # noqa: BLE001 - tfds signals "missing" with many types
        action = "could not be downloaded" if download else "downloading is disabled"
        raise DatasetUnavailableError(
            f"Dataset {name!r} was not found in the tensorflow-datasets data_dir {where} "
            f"and {action} ({type(err).__name__}); point data_dir at a prepared copy, or "
            f"{hint}."
        ) from err
    return DatasetSplits(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=_TFDS_NUM_CLASSES[name],
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )


def _tfds_location(data_dir) -> str:
    if data_dir is not None:
        return repr(os.fspath(data_dir))
    default = os.environ.get("TFDS_DATA_DIR") or str(Path.home() / "tensorflow_datasets")
    return f"{default!r} (the default)"


def _tfds_to_numpy(dataset, as_numpy: Callable):
    """Stacks a ``(image uint8, label)`` dataset into ``float32`` images in ``[0, 1]``.

    Batching here rather than with ``tfds.load(batch_size=-1)``: the full-batch path
    sizes its single batch from the split metadata, which a dataset without recorded
    split sizes does not have.
    """
    images, labels = [], []
    for image, label in as_numpy(dataset.batch(8192)):
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError("the split is empty")
    x = np.concatenate(images).astype(np.float32) / 255.0
    y = np.concatenate(labels).astype(np.int32)
    return x, y
