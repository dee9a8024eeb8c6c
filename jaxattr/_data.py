"""Image classification data for the demo: scikit-learn's digits or an .npz file.

Every check raises :class:`InputError` with a message that says what came in and
how to fix it, so the command line can print it without a traceback.
"""

import dataclasses
import math
import os
import zipfile

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DIGITS_TRAIN = 1500
MAX_CLASSES = 1000


class InputError(ValueError):
    """Input the demo cannot use; the message names it and says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Flattened, normalised images with integer class labels.

    Attributes:
      x_train: ``(num_train, num_features)`` float32.
      y_train: ``(num_train,)`` int32 in ``[0, num_classes)``.
      x_test: ``(num_test, num_features)`` float32.
      y_test: ``(num_test,)`` int32 in ``[0, num_classes)``.
      image_shape: shape to draw one row of ``x`` as an image.
      num_classes: number of model outputs.
      name: a short description of the source.
      normalisation: how the pixels were scaled, in words.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple
    num_classes: int
    name: str
    normalisation: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def load_digits(num_train: int | None = None, num_test: int | None = None) -> Dataset:
    """scikit-learn's 8x8 digits: the first 1500 images train, the other 297 test.

    Pixels (0..16) are divided by 16 and standardised with the mean and standard
    deviation of the 1500 training images.

    Args:
      num_train: keep the first ``num_train`` training images (``None``: all).
      num_test: keep the first ``num_test`` test images (``None``: all).

    Returns:
      A :class:`Dataset`.

    Raises:
      InputError: scikit-learn is missing or a count is out of range.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise InputError(
            "The digits dataset comes with scikit-learn, which is not installed. "
            "Install the demo extras (pip install 'jaxattr[demo]') or pass --data."
        ) from None
    digits = sklearn_digits()
    x = digits.images.reshape(len(digits.images), -1) / 16.0
    y = digits.target
    mean, std = x[:DIGITS_TRAIN].mean(), x[:DIGITS_TRAIN].std()
    train = _first(x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], num_train, "train", "digits")
    test = _first(x[DIGITS_TRAIN:], y[DIGITS_TRAIN:], num_test, "test", "digits")
    norm = f"pixels/16, then (x - {mean:.4f}) / {std:.4f} (training-set statistics)"
    return _dataset(train, test, (8, 8), "scikit-learn digits", norm, mean, std)


def load_npz(
    path: str, num_train: int | None = None, num_test: int | None = None
) -> Dataset:
    """Images and labels from an .npz with ``x_train, y_train, x_test, y_test``.

    Images are ``(n, ...)`` numeric arrays, labels ``(n,)`` class indices.
    Integer pixels (0..255) are divided by 255, float pixels must already lie in
    [0, 1]; then ``(x - 0.1307) / 0.3081`` (MNIST's statistics, as in dattri).

    Args:
      path: the .npz file.
      num_train: keep the first ``num_train`` training examples (``None``: all).
      num_test: keep the first ``num_test`` test examples (``None``: all).

    Returns:
      A :class:`Dataset`.

    Raises:
      InputError: the file is missing, unreadable or malformed, or a count is out
        of range.
    """
    arrays = _read_npz(path)
    for split in ("train", "test"):
        _check_pair(arrays[f"x_{split}"], arrays[f"y_{split}"], split, path)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise InputError(
            f"{path}: x_train images have shape {arrays['x_train'].shape[1:]} but "
            f"x_test images have shape {arrays['x_test'].shape[1:]}; both splits "
            "must hold images of the same shape."
        )
    shape = _image_shape(arrays["x_train"].shape[1:])
    train = _first(arrays["x_train"], arrays["y_train"], num_train, "train", path)
    test = _first(arrays["x_test"], arrays["y_test"], num_test, "test", path)
    train, test = [(_unit_scale(x), y) for x, y in (train, test)]
    norm = f"pixels to [0, 1], then (x - {MNIST_MEAN}) / {MNIST_STD} (MNIST statistics)"
    name = os.path.basename(path)
    return _dataset(train, test, shape, name, norm, MNIST_MEAN, MNIST_STD)


def _dataset(train, test, shape, name, norm, mean, std) -> Dataset:
    flat = lambda x: ((x.reshape(len(x), -1) - mean) / std).astype(np.float32)
    labels = lambda y: np.asarray(y).astype(np.int32)
    num_classes = int(max(labels(train[1]).max(), labels(test[1]).max())) + 1
    x_tr, y_tr, x_te, y_te = (
        flat(train[0]),
        labels(train[1]),
        flat(test[0]),
        labels(test[1]),
    )
    return Dataset(x_tr, y_tr, x_te, y_te, shape, max(num_classes, 2), name, norm)


def _read_npz(path: str) -> dict:
    if not os.path.exists(path):
        raise InputError(
            f"Data file {path!r} does not exist. Pass an existing .npz file."
        )
    if os.path.isdir(path):
        raise InputError(f"Data path {path!r} is a directory; pass an .npz file.")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(
                f"{path!r} holds a single array, not an .npz archive. Save the data "
                "with numpy.savez(path, x_train=..., y_train=..., x_test=..., "
                "y_test=...)."
            )
        with loaded:
            return _arrays_of(loaded, path)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise InputError(
            f"Could not read {path!r} as a NumPy .npz archive ({err}). Save the data "
            "with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
        ) from None


def _arrays_of(archive, path: str) -> dict:
    missing = [k for k in NPZ_KEYS if k not in archive.files]
    if missing:
        raise InputError(
            f"{path!r} lacks the array(s) {', '.join(missing)}; it has "
            f"{', '.join(archive.files) or 'no arrays'}. The demo needs x_train, "
            "y_train, x_test and y_test."
        )
    return {k: archive[k] for k in NPZ_KEYS}


def _check_pair(x: np.ndarray, y: np.ndarray, split: str, path: str) -> None:
    """Checks one split's images and labels; raises InputError on the first problem."""
    where = f"{path}: x_{split}"
    if not _is_real(x):
        raise InputError(f"{where} has dtype {x.dtype}; images must be numbers.")
    if x.ndim < 2 or x.shape[0] < 1 or math.prod(x.shape[1:]) < 1:
        raise InputError(
            f"{where} has shape {x.shape}; expected (num_examples, ...) with at least "
            "one example of at least one pixel, e.g. (60000, 28, 28)."
        )
    if not np.all(np.isfinite(x)):
        raise InputError(f"{where} contains NaN or infinite values.")
    if np.issubdtype(x.dtype, np.integer) and (x.min() < 0 or x.max() > 255):
        raise InputError(
            f"{where} holds integer pixels in [{x.min()}, {x.max()}]; integer pixels "
            "must lie in 0..255 (or store floats in [0, 1])."
        )
    if np.issubdtype(x.dtype, np.floating) and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise InputError(
            f"{where} holds float pixels in [{x.min():g}, {x.max():g}]; float pixels "
            "must lie in [0, 1] (the demo then applies MNIST's normalisation). "
            "Divide them by 255, or store them as uint8 0..255."
        )
    _check_labels(y, len(x), f"{path}: y_{split}")


def _check_labels(y: np.ndarray, count: int, where: str) -> None:
    if not _is_real(y) or y.ndim != 1:
        raise InputError(
            f"{where} has dtype {y.dtype} and shape {y.shape}; labels must be a 1-D "
            "array of integer class indices."
        )
    if len(y) != count:
        raise InputError(
            f"{where} has {len(y)} labels but there are {count} images; every image "
            "needs exactly one label."
        )
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
        raise InputError(f"{where} holds non-integer labels; use class indices 0..K-1.")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise InputError(
            f"{where} holds labels in [{y.min()}, {y.max()}]; labels must be class "
            f"indices 0..K-1 with K <= {MAX_CLASSES}."
        )


def _is_real(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)


def _first(x, y, n: int | None, split: str, source: str) -> tuple:
    """The first ``n`` examples of a split; InputError if there are fewer."""
    if n is None:
        return x, y
    if n < 1 or n > len(x):
        raise InputError(
            f"--num-{split} {n} is out of range: {source} has {len(x)} {split} "
            f"examples. Pass --num-{split} between 1 and {len(x)}."
        )
    return x[:n], y[:n]


def _unit_scale(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32)


def _image_shape(shape: tuple) -> tuple:
    """How to draw one example: its own 2-D shape, a square, or a one-row strip."""
    if len(shape) == 2:
        return tuple(shape)
    if len(shape) == 3 and shape[-1] == 3:
        return tuple(shape)
    if len(shape) == 3 and shape[-1] == 1:
        return tuple(shape[:2])
    side = math.isqrt(math.prod(shape))
    if len(shape) == 1 and side * side == shape[0]:
        return (side, side)
    return (1, math.prod(shape))
