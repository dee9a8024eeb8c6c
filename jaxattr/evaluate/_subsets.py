"""Subsets, leave-one-out weights and label noise, all drawn from explicit keys."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _checks
from jaxattr._types import Array, ArrayLike


def random_subsets(
    key: Array, num_subsets: int, num_train: int, fraction: float = 0.5
) -> np.ndarray:
    """Random subsets of equal size, as 0/1 weights for :func:`retrain`.

    Args:
      key: ``jax.random`` key; subset ``s`` is drawn from ``fold_in(key, s)``.
      num_subsets: subsets to draw.
      num_train: training set size.
      fraction: each subset holds ``round(fraction * num_train)`` examples.

    Returns:
      ``(num_subsets, num_train)`` float32 array of 0/1 weights.

    Raises:
      ValueError: sizes not positive, or ``fraction`` not in ``(0, 1]``.
    """
    num_subsets = _checks.positive_int("num_subsets", num_subsets)
    num_train = _checks.positive_int("num_train", num_train)
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    size = max(1, round(float(fraction) * num_train))

    def draw(s):
        perm = jax.random.permutation(jax.random.fold_in(key, s), num_train)
        return jnp.zeros(num_train, jnp.float32).at[perm[:size]].set(1.0)

    return np.array(jax.vmap(draw)(jnp.arange(num_subsets)))


def loo_weights(num_train: int, removed: ArrayLike) -> np.ndarray:
    """Weights of the full set followed by one leave-one-out set per removed example.

    Args:
      num_train: training set size.
      removed: ``(num_removed,)`` distinct row indices to leave out.

    Returns:
      ``(1 + num_removed, num_train)`` float32: row 0 all ones, row ``1 + r``
      zero at ``removed[r]``. This is the layout :func:`loo` expects.

    Raises:
      ValueError: indices out of range or repeated.
    """
    num_train = _checks.positive_int("num_train", num_train)
    removed = np.asarray(removed)
    if removed.ndim != 1 or not np.issubdtype(removed.dtype, np.integer):
        raise ValueError(f"removed must be a 1-D integer array, got {removed!r}.")
    if np.any((removed < 0) | (removed >= num_train)):
        raise ValueError(f"removed indices must lie in [0, {num_train}).")
    if len(np.unique(removed)) != len(removed):
        raise ValueError("removed indices must be distinct.")
    w = np.ones((1 + len(removed), num_train), np.float32)
    w[1 + np.arange(len(removed)), removed] = 0.0
    return w


def flip_labels(
    key: Array, labels: ArrayLike, fraction: float, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces a fraction of the labels by a different class, chosen at random.

    Args:
      key: ``jax.random`` key.
      labels: ``(num_train,)`` integer labels in ``[0, num_classes)``.
      fraction: share of examples to flip; exactly ``round(fraction * n)``.
      num_classes: number of classes (at least 2).

    Returns:
      ``(noisy_labels, flipped)``: ``(num_train,)`` int32 labels and a
      ``(num_train,)`` bool mask of the flipped examples.

    Raises:
      ValueError: labels out of range, ``fraction`` not in ``[0, 1]``, or fewer
        than 2 classes.
    """
    y = np.asarray(labels)
    c = _checks.positive_int("num_classes", num_classes)
    if c < 2 or y.ndim != 1 or np.any((y < 0) | (y >= c)):
        raise ValueError(
            f"labels must be a 1-D array in [0, num_classes={c}) with "
            f"num_classes >= 2; got shape {y.shape}, range "
            f"[{y.min(initial=0)}, {y.max(initial=0)}]."
        )
    if not 0 <= float(fraction) <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
    pick_key, shift_key = jax.random.split(key)
    count = round(float(fraction) * len(y))
    chosen = np.asarray(jax.random.permutation(pick_key, len(y)))[:count]
    shift = np.asarray(jax.random.randint(shift_key, (count,), 1, c))
    noisy = y.astype(np.int32).copy()
    noisy[chosen] = (noisy[chosen] + shift) % c
    return noisy, noisy != y
