"""Influence functions with a damped curvature: explicit inverse and conjugate gradient.

Both score ``tau(b, q) = -grad measure_q^T (C + lam I)^-1 grad loss_b`` with
``C`` the curvature of the mean training loss, the derivative of the query's
measurement for upweighting ``b`` in ``mean_i loss_i + eps * loss_b``.
"""

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxattr import _checks, _tree
from jaxattr._task import Task
from jaxattr._types import Array, Batch, Params
from jaxattr.baselines import _common

Curvature = Literal["ggn", "hessian"]


def _chunk_sum(fn: Callable, data: Batch, chunk: int, like: Array) -> Array:
    """Sum over chunks of ``fn(rows, mask)``; ``mask`` marks the real, unpadded rows."""
    n = _tree.leading_size(data)
    chunk = min(chunk, n)
    count = -(-n // chunk)
    padded = _tree.pad_rows(data, count * chunk)
    rows = jax.tree.map(lambda a: a.reshape((count, chunk) + a.shape[1:]), padded)
    masks = (jnp.arange(count * chunk) < n).reshape(count, chunk)

    def body(total, inputs):
        return total + fn(*inputs), None

    return jax.lax.scan(body, jnp.zeros_like(like), (rows, masks))[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def ggn_matrix(task, params: Params, data: Batch, chunk: int) -> Array:
    """``(num_params, num_params)`` Gauss-Newton matrix ``mean_i J_i^T H_i J_i``.

    ``J_i`` is the Jacobian of ``task.outputs`` and ``H_i`` the Hessian of
    ``task.output_loss`` in the outputs; flattened as ``ravel_pytree`` does.

    Args:
      task: a :class:`jaxattr.Task`.
      params: parameters.
      data: examples stacked on a leading ``num_train`` axis.
      chunk: examples per vectorised step (static); bounds memory.

    Returns:
      The symmetric positive semi-definite matrix.
    """
    flat, unravel = ravel_pytree(params)
    p, n = flat.size, _tree.leading_size(data)

    def one(z):
        jac = jax.jacrev(lambda w: task.outputs(unravel(w), z))(flat).reshape(-1, p)
        h_out = jax.hessian(task.output_loss)(task.outputs(params, z), z)
        return jac, h_out.reshape(jac.shape[0], jac.shape[0])

    def chunk_sum(rows, mask):
        jac, h_out = jax.vmap(one)(rows)
        h_jac = jnp.einsum("coq,cqp->cop", h_out * mask[:, None, None], jac)
        return jnp.einsum("cop,cor->pr", jac, h_jac)

    return _chunk_sum(chunk_sum, data, chunk, jnp.zeros((p, p), flat.dtype)) / n


@functools.partial(jax.jit, static_argnums=(0, 3))
def hessian_matrix(task, params: Params, data: Batch, chunk: int) -> Array:
    """``(num_params, num_params)`` exact Hessian of the mean training loss.

    Args:
      task: a :class:`jaxattr.Task`.
      params: parameters.
      data: examples stacked on a leading ``num_train`` axis.
      chunk: examples per vectorised step (static); bounds memory.

    Returns:
      The symmetric (possibly indefinite) Hessian.
    """
    flat, unravel = ravel_pytree(params)
    n = _tree.leading_size(data)

    def chunk_sum(rows, mask):
        total = lambda w: jnp.sum(
            jax.vmap(task.loss, (None, 0))(unravel(w), rows) * mask
        )
        return jax.hessian(total)(flat)

    return (
        _chunk_sum(chunk_sum, data, chunk, jnp.zeros((flat.size,) * 2, flat.dtype)) / n
    )


def _damped_solve(matrix: Array, rhs: Array, damping: float) -> Array:
    """``(matrix + damping I)^-1 rhs``; a pseudo-inverse when ``damping`` is 0."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    if damping == 0:
        return jnp.linalg.pinv(matrix, hermitian=True) @ rhs
    return jnp.linalg.solve(matrix + damping * eye, rhs)


def influence_explicit(
    task: Task,
    params: Params,
    train_data: Batch,
    *,
    damping: float,
    curvature: Curvature = "ggn",
    measure: Callable | None = None,
    chunk_size: int = 256,
    query_chunk: int = 64,
    ids=None,
    max_params: int = 20_000,
) -> _common.FeatureScorer:
    """Influence by an explicit, damped inverse of the full curvature matrix.

    ``tau(b, q) = -grad measure_q^T (C + damping I)^-1 grad loss_b``, with ``C``
    the Gauss-Newton matrix (``"ggn"``, positive semi-definite) or the exact
    Hessian (``"hessian"``) of the mean training loss, built as a
    ``(num_params, num_params)`` matrix: for small models only. ``damping=0``
    uses the pseudo-inverse.

    Args:
      task: a :class:`jaxattr.Task`.
      params: the trained parameters.
      train_data: training examples stacked on a leading ``num_train`` axis.
      damping: ``lam >= 0`` added to the curvature's diagonal.
      curvature: ``"ggn"`` or ``"hessian"``.
      measure: query measurement; defaults to ``task.measure``.
      chunk_size: training examples per vectorised call.
      query_chunk: queries per scoring call.
      ids: ``(num_train,)`` integer ids; defaults to ``0..num_train-1``.
      max_params: refuse models with more parameters than this (the matrix has
        ``num_params ** 2`` entries); use :func:`influence_cg` for larger ones.

    Returns:
      A :class:`FeatureScorer`.

    Raises:
      ValueError: a bad ``curvature`` or ``damping``, or too many parameters.
    """
    task = _common.check_task(task)
    damping = _checks.nonneg_float("damping", damping)
    if curvature not in ("ggn", "hessian"):
        raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}.")
    num_params = ravel_pytree(params)[0].size
    if num_params > max_params:
        raise ValueError(
            f"The model has {num_params} parameters, more than max_params="
            f"{max_params}; an explicit {num_params}^2 matrix is too large. Use "
            "influence_cg, or raise max_params if the memory is there."
        )
    chunk = _checks.positive_int("chunk_size", chunk_size)
    build = ggn_matrix if curvature == "ggn" else hessian_matrix
    timer = _common.Timer()
    matrix = timer("curvature", build, task, params, train_data, chunk)
    grads = timer(
        "train_gradients", _common.flat_grads, task.loss, params, train_data, chunk
    )
    solved = timer("inverse", lambda: _damped_solve(matrix, grads.T, damping).T)
    return _gradient_scorer(
        task, params, train_data, measure, solved, timer, query_chunk, ids
    )


def _gradient_scorer(task, params, train_data, measure, train, timer, query_chunk, ids):
    measure = task.measure if measure is None else measure
    n = _tree.leading_size(train_data)
    query = lambda queries: -_common.flat_grads(measure, params, queries, query_chunk)
    return _common.FeatureScorer(
        query,
        train,
        jnp.ones(n, train.dtype),
        _common.default_ids(ids, n),
        build_seconds=timer.seconds,
        query_chunk=_checks.positive_int("query_chunk", query_chunk),
    )


def _batched_cg(matvec: Callable, b: Array, tol: float, max_iters: int) -> Array:
    """Solves ``A x_i = b_i`` for each row of ``b`` by conjugate gradient.

    Rows stop when ``||r_i|| <= tol * ||b_i||``; the loop ends when every row
    has, or after ``max_iters`` iterations.
    """
    b_norm = jnp.linalg.norm(b, axis=1)
    rs = jnp.sum(b * b, axis=1)

    def active(rs):
        return jnp.sqrt(rs) > tol * b_norm

    def cond(state):
        return (state[0] < max_iters) & jnp.any(active(state[4]))

    def body(state):
        i, x, r, p, rs = state
        ap = matvec(p)
        p_ap = jnp.sum(p * ap, axis=1)
        go = active(rs) & (p_ap > 0)
        alpha = jnp.where(go, rs / jnp.where(go, p_ap, 1), 0)[:, None]
        x, r = x + alpha * p, r - alpha * ap
        rs_new = jnp.sum(r * r, axis=1)
        beta = jnp.where(go, rs_new / jnp.where(go, rs, 1), 0)[:, None]
        return i + 1, x, r, jnp.where(go[:, None], r + beta * p, p), rs_new

    state = (0, jnp.zeros_like(b), b, b, rs)
    return jax.lax.while_loop(cond, body, state)[1]


@functools.partial(jax.jit, static_argnames=("task", "max_iters"))
def _cg_solve(task, params, data, rhs, damping, tol, *, max_iters):
    flat, unravel = ravel_pytree(params)
    op = task.ggn(batch_size=None).operator(params, data)
    one = lambda v: ravel_pytree(op(unravel(v)))[0] + damping * v
    return _batched_cg(jax.vmap(one), rhs, tol, max_iters)


def influence_cg(
    task: Task,
    params: Params,
    train_data: Batch,
    *,
    damping: float,
    max_iters: int = 100,
    tol: float = 1e-6,
    measure: Callable | None = None,
    chunk_size: int = 256,
    query_chunk: int = 64,
    ids=None,
) -> _common.FeatureScorer:
    """Influence by conjugate gradient on the damped Gauss-Newton matrix.

    For each query batch solves ``(G + damping I) x_q = grad measure_q`` with
    matrix-free products ``G v`` over the whole training set (``G`` the mean
    Gauss-Newton matrix, as :meth:`jaxattr.Task.ggn` with ``batch_size=None``),
    then scores ``tau(b, q) = -x_q . grad loss_b``. Stores the
    ``(num_train, num_params)`` training gradients.

    Args:
      task: a :class:`jaxattr.Task`.
      params: the trained parameters.
      train_data: training examples stacked on a leading ``num_train`` axis.
      damping: ``lam > 0`` added to the curvature's diagonal (CG needs a
        positive definite system).
      max_iters: conjugate-gradient iterations at most.
      tol: stop a query when its residual norm is below ``tol`` times the norm
        of its right-hand side.
      measure: query measurement; defaults to ``task.measure``.
      chunk_size: training examples per vectorised gradient call.
      query_chunk: queries solved together.
      ids: ``(num_train,)`` integer ids; defaults to ``0..num_train-1``.

    Returns:
      A :class:`FeatureScorer`.

    Raises:
      ValueError: ``damping`` not positive, or bad iteration settings.
    """
    task = _common.check_task(task)
    damping = _checks.positive_float("damping", damping)
    max_iters = _checks.positive_int("max_iters", max_iters)
    tol = _checks.nonneg_float("tol", tol)
    chunk = _checks.positive_int("chunk_size", chunk_size)
    measure = task.measure if measure is None else measure
    timer = _common.Timer()
    grads = timer(
        "train_gradients", _common.flat_grads, task.loss, params, train_data, chunk
    )

    def query(queries):
        rhs = _common.flat_grads(measure, params, queries, chunk)
        solve = _cg_solve(
            task, params, train_data, rhs, damping, tol, max_iters=max_iters
        )
        return -solve

    n = _tree.leading_size(train_data)
    return _common.FeatureScorer(
        query,
        grads,
        jnp.ones(n, grads.dtype),
        _common.default_ids(ids, n),
        build_seconds=timer.seconds,
        query_chunk=_checks.positive_int("query_chunk", query_chunk),
    )
