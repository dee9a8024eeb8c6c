"""Low-rank curvature: the exact eigen-structure of a fixed Gauss-Newton batch.

With a fixed curvature batch of ``m`` examples, ``G = A^T A`` where row block
``i`` of ``A`` is ``H_i^(1/2) J_i / sqrt(m)`` (``J_i`` the output Jacobian,
``H_i`` the output-loss Hessian). Its non-zero eigenpairs follow from the small
``(m * out_dim)`` square kernel ``A A^T``. In that eigenbasis the K-step
recursion of :func:`jaxattr.simulate` decouples into scalar recursions with a
closed form, so any horizon costs the same as one step.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxattr import _checks, _sharding, _tree
from jaxattr._curvature import GaussNewton
from jaxattr._types import Array, Batch, Params


@dataclasses.dataclass(frozen=True)
class LowRank:
    """Curvature ``G = V diag(s) V^T`` from a fixed Gauss-Newton batch.

    Passing it as ``curvature=`` to :func:`jaxattr.simulate` runs the same
    recursion as the matrix-free path with that fixed batch, evaluated in
    closed form: the cost no longer grows with the horizon.

    Attributes:
      curvature: a :class:`GaussNewton`; its ``batch_size`` examples (all when
        ``None``) are drawn once from the key and kept fixed.
      rank: keep the top ``rank`` eigenpairs (``None``: all non-zero ones).
        Directions beyond them are treated as zero curvature.
      chunk_size: examples differentiated at once while building the basis.
    """

    curvature: GaussNewton
    rank: int | None = None
    chunk_size: int = 256

    def __post_init__(self):
        if not isinstance(self.curvature, GaussNewton):
            raise TypeError(
                "LowRank needs a jaxattr.GaussNewton curvature, got "
                f"{self.curvature!r}."
            )
        if self.rank is not None:
            _checks.positive_int("rank", self.rank)
        _checks.positive_int("chunk_size", self.chunk_size)

    @property
    def name(self) -> str:
        return f"lowrank_{self.curvature.name}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eigenbasis:
    """Top eigenpairs of a curvature.

    Attributes:
      vectors: ``(rank, num_params)`` orthonormal rows.
      values: ``(rank,)`` eigenvalues, largest first.
    """

    vectors: Array
    values: Array


def _factor_rows(curvature: GaussNewton, params: Params, rows: Batch) -> Array:
    """``H_i^(1/2) J_i`` for each example, flattened: ``(n * out_dim, num_params)``."""

    flat, unravel = ravel_pytree(params)

    def one(example):
        out_fn = lambda f: jnp.ravel(curvature.outputs(unravel(f), example))
        out = curvature.outputs(params, example)
        jac = jax.jacrev(out_fn)(flat)  # (out_dim, num_params)
        loss_of = lambda o: curvature.output_loss(o.reshape(out.shape), example)
        evals, evecs = jnp.linalg.eigh(jax.hessian(loss_of)(jnp.ravel(out)))
        root = (evecs * jnp.sqrt(jnp.maximum(evals, 0.0))) @ evecs.T
        return root @ jac

    blocks = jax.vmap(one)(rows)
    return blocks.reshape((-1, blocks.shape[-1]))


_factor_rows_jit = jax.jit(_factor_rows, static_argnums=0)


def factor(lowrank: LowRank, params: Params, data: Batch, key: Array) -> Array:
    """``A`` with ``G = A^T A`` for the fixed curvature batch.

    Returns:
      ``(batch_size * out_dim, num_params)``.
    """
    n = _tree.leading_size(data)
    batch = lowrank.curvature.sample(data, n, key, 0)
    m = _tree.leading_size(batch)
    c = min(lowrank.chunk_size, m)
    parts = []
    for start in range(0, m, c):
        stop = min(start + c, m)
        rows = _tree.pad_rows(_tree.slice_rows(batch, start, stop), c)
        block = _factor_rows_jit(lowrank.curvature, params, rows)
        parts.append(block[: (stop - start) * (block.shape[0] // c)])
    return jnp.concatenate(parts, axis=0) / np.sqrt(m)


def eigenbasis(lowrank: LowRank, params: Params, data: Batch, key: Array) -> Eigenbasis:
    """Eigenpairs of ``G = A^T A`` through the kernel ``A A^T``, largest first."""
    a = factor(lowrank, params, data, key)
    kernel = _gram(a)
    values, u = jnp.linalg.eigh(kernel)
    values, u = values[::-1], u[:, ::-1]
    keep = (
        values
        > jnp.finfo(values.dtype).eps * jnp.maximum(values[0], 1e-30) * a.shape[0]
    )
    r = int(jnp.sum(keep))
    if lowrank.rank is not None:
        r = min(r, lowrank.rank)
    values, u = values[:r], u[:, :r]
    vectors = _project_back(a, u, values)
    return Eigenbasis(vectors, values)


@jax.jit
def _gram(a):
    return a @ a.T


@jax.jit
def _project_back(a, u, values):
    return (u / jnp.sqrt(values)).T @ a


def horizon_filter(
    values: Array, horizon: int | None, damping: float, step_size: float
) -> Array:
    """``phi_K(s) = eta * sum_{j<K} (1 - eta (s + lam))^j``, or ``1/(s+lam)`` if K=None.

    ``r_K = -phi_K(G) grad loss_b`` is the K-step recursion started at 0.
    """
    x = values + damping
    if horizon is None:
        return 1.0 / x
    ex = step_size * jnp.maximum(x, 0.0)
    # (1 - ex)^K - 1, accurate for small ex; a plain power when 1 - ex < 0.
    smooth = jnp.expm1(horizon * jnp.log1p(-jnp.minimum(ex, 1.0)))
    decay = jnp.where(ex <= 1.0, smooth, jnp.power(1.0 - ex, horizon) - 1.0)
    small = ex < 1e-12
    return jnp.where(small, step_size * horizon, -decay / jnp.where(small, 1.0, x))


def closed_form_fn(
    loss: Callable,
    params: Params,
    basis: Eigenbasis,
    horizon: int | None,
    damping: float,
    step_size: float,
) -> Callable:
    """Per-example response of the recursion on curvature ``basis``, in closed form."""
    respond_to = gradient_closed_form(params, basis, horizon, damping, step_size)
    return lambda example: respond_to(jax.grad(loss)(params, example))


def gradient_closed_form(
    params: Params,
    basis: Eigenbasis,
    horizon: int | None,
    damping: float,
    step_size: float,
) -> Callable:
    """``g -> -phi_K(G) g``: the closed-form response to a loss gradient ``g``."""
    _, unravel = ravel_pytree(params)
    phi = horizon_filter(basis.values, horizon, damping, step_size)
    phi0 = horizon_filter(jnp.zeros(()), horizon, damping, step_size)

    def respond_to(g):
        g = ravel_pytree(g)[0]
        coef = basis.vectors @ g
        r = -(phi0 * g + basis.vectors.T @ ((phi - phi0) * coef))
        # A float64 basis (x64 on, float64 data) must not promote float32 responses.
        return unravel(r.astype(g.dtype))

    return respond_to


def coefficient_fn(
    loss: Callable,
    params: Params,
    basis: Eigenbasis,
    horizon: int | None,
    damping: float,
    step_size: float,
) -> Callable:
    """Per-example coefficients ``V r_b = -phi_K(s) * (V grad loss_b)`` in the basis.

    The rows of ``V`` are eigenvectors, so the response's coordinates along
    them need one projection of the gradient and no dense response at all.
    """
    phi = horizon_filter(basis.values, horizon, damping, step_size)

    def coefficients(example):
        g = ravel_pytree(jax.grad(loss)(params, example))[0]
        return -phi * (basis.vectors @ g)

    return coefficients


@functools.partial(jax.jit, static_argnames=("loss", "horizon", "per_example", "split"))
def map_rows(
    rows, params, basis, damping, step_size, *, loss, horizon, per_example, split
):
    """``per_example`` (closed-form responses or coefficients) over a chunk.

    The chunk's rows are split over devices by ``split``.
    """

    def local(rows, params, basis, damping, step_size):
        fn = per_example(loss, params, basis, horizon, damping, step_size)
        return jax.vmap(fn)(rows)

    run = _sharding.rows_map(local, split)
    return run(rows, params, basis, damping, step_size)


@functools.partial(jax.jit, static_argnames="horizon")
def respond_gradients(gs, params, basis, damping, step_size, *, horizon):
    """Closed-form responses to a batch of loss gradients (leading axis)."""
    respond_to = gradient_closed_form(params, basis, horizon, damping, step_size)
    return jax.vmap(respond_to)(gs)
