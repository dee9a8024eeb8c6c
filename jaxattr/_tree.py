"""Small pytree helpers used throughout the library."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr._types import Array, Batch, Params


def dot(a: Params, b: Params) -> Array:
    """Inner product of two pytrees of the same structure."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves)


def sq_norm(a: Params) -> Array:
    """Squared Euclidean norm of a pytree."""
    return dot(a, a)


def scale(alpha: Any, x: Params) -> Params:
    return jax.tree.map(lambda u: alpha * u, x)


def zeros_stacked(tree: Any, n: int, dtype=None) -> Any:
    """Zeros shaped like ``tree`` with a new leading axis of length ``n``."""
    return jax.tree.map(
        lambda a: jnp.zeros((n,) + jnp.shape(a), dtype or jnp.result_type(a)), tree
    )


def leading_size(batch: Batch) -> int:
    """Length of the shared leading axis of a batch; ValueError if leaves differ."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(
            "Expected a batch with at least one array, got an empty pytree."
        )
    sizes = {
        jax.tree_util.keystr(p): (np.shape(x)[0] if np.ndim(x) else None)
        for p, x in leaves
    }
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            "Every array of a batch must share its leading (example) axis; got leading "
            f"sizes {sizes}. Stack examples along axis 0 of every leaf."
        )
    return next(iter(sizes.values()))


def take(batch: Batch, idx: Array) -> Batch:
    """Rows ``idx`` of every leaf of a batch."""
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), batch)


def slice_rows(batch: Batch, start: int, stop: int) -> Batch:
    return jax.tree.map(lambda a: a[start:stop], batch)


def pad_rows(batch: Batch, size: int) -> Batch:
    """Pads the leading axis of every leaf to ``size`` by repeating row 0."""

    def pad(a):
        n = a.shape[0]
        if n == size:
            return a
        fill = jnp.broadcast_to(a[:1], (size - n,) + a.shape[1:])
        return jnp.concatenate([a, fill], axis=0)

    return jax.tree.map(pad, batch)


def param_spec(params: Params) -> tuple:
    """Hashable description of a parameter tree: ``((path, shape, dtype), ...)``."""
    return tuple(
        (jax.tree_util.keystr(path), tuple(np.shape(leaf)), str(jnp.result_type(leaf)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    )


def spec_mismatch(expected: tuple, got: tuple) -> str | None:
    """A sentence describing the first difference between two param specs."""
    if expected == got:
        return None
    exp = {p: (s, d) for p, s, d in expected}
    new = {p: (s, d) for p, s, d in got}
    missing = [p for p in exp if p not in new]
    extra = [p for p in new if p not in exp]
    if missing or extra:
        return f"leaves missing {missing[:3]}, unexpected leaves {extra[:3]}"
    for p in exp:
        if exp[p][0] != new[p][0]:
            return f"leaf {p} has shape {new[p][0]}, expected {exp[p][0]}"
    for p in exp:
        if exp[p][1] != new[p][1]:
            return f"leaf {p} has dtype {new[p][1]}, expected {exp[p][1]}"
    return "leaf order differs"
