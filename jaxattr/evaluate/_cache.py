"""A thin on-disk cache of arrays keyed by a hash of everything that made them.

Nothing here knows what the arrays mean: callers pass the parts of their
configuration and a function that computes the arrays when the cache misses.
"""

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = "jaxattr-cache-v1"


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, (list, tuple)):
        h.update(f"seq{len(obj)}(".encode())
        for item in obj:
            _feed(h, item)
        h.update(b")")
    elif isinstance(obj, dict):
        _feed(h, sorted(obj.items()))
    elif isinstance(obj, (str, int, float, bool, type(None))):
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text}".encode())
    else:
        a = np.ascontiguousarray(np.asarray(obj))
        h.update(f"array{a.dtype.str}{a.shape}:".encode())
        h.update(a.tobytes())


def digest(parts: Any) -> str:
    """Hex SHA-256 of nested lists, tuples, dicts, scalars, strings and arrays.

    Arrays contribute their dtype, shape and bytes, so equal values of another
    dtype or shape give another digest.
    """
    h = hashlib.sha256()
    _feed(h, (FORMAT, parts))
    return h.hexdigest()


def load_or_compute(
    cache_dir: str | os.PathLike,
    name: str,
    compute: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Arrays stored as ``cache_dir/name.npz``, computed and stored on a miss.

    The file is written to a temporary name and renamed, so a crash never leaves
    a truncated entry behind.
    """
    folder = Path(cache_dir)
    path = folder / f"{name}.npz"
    if path.exists():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    arrays = compute()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path)
    return arrays
