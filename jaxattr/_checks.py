"""Eager checks of user input, raising errors that say how to fix them."""

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _tree


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def nonneg_float(name: str, value: Any, hint: str = "") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.{hint}")
    return v


def positive_float(name: str, value: Any) -> float:
    v = nonneg_float(name, value)
    if v == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return v


def finite_params(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(
                f"Parameter leaf {jax.tree_util.keystr(path)} contains NaN or inf; "
                "attribution needs finite parameters."
            )


def finite_per_example(values: np.ndarray, ids: np.ndarray, what: str) -> None:
    """Raises ValueError naming the first example whose value is not finite."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what} is {values[i]} for training example id {int(ids[i])} (row {i})"
            + (f" and {bad.size - 1} more" if bad.size > 1 else "")
            + ". Fix or drop that example; nothing was computed for the others yet."
        )


@functools.partial(jax.jit, static_argnums=0)
def _losses(loss, params, rows):
    return jax.vmap(loss, (None, 0))(params, rows)


def losses_in_chunks(loss: Callable, params: Any, data: Any, chunk: int) -> np.ndarray:
    """Per-example losses, computed ``chunk`` rows at a time."""
    n = _tree.leading_size(data)
    out = []
    for start in range(0, n, chunk):
        rows = _tree.pad_rows(
            _tree.slice_rows(data, start, min(start + chunk, n)), min(chunk, n)
        )
        out.append(np.asarray(_losses(loss, params, rows))[: min(chunk, n - start)])
    return np.concatenate(out)


def finite_examples(examples: Any, what: str) -> None:
    """Raises ValueError naming the first example with a NaN or infinite entry.

    Checks concrete floating-point leaves only (traced or integer leaves pass).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(examples):
        if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(
            jnp.result_type(leaf), jnp.inexact
        ):
            continue
        arr = np.asarray(leaf)
        if arr.ndim == 0 or arr.size == 0:
            continue
        ok = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise ValueError(
                f"{what} example {int(bad[0])} has a NaN or infinite entry in "
                f"leaf {jax.tree_util.keystr(path) or '(root)'}"
                + (f" ({bad.size - 1} more examples too)" if bad.size > 1 else "")
                + "; its scores would be NaN. Fix or drop it."
            )
