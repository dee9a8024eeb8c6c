"""TRAK: projected margin gradients, a kernel inverse and an ensemble of models.

For model ``m`` with projected margin gradients ``Phi_m`` ``(num_train, k)``
and ``1 - p`` reweighting ``Q_m = diag(1 - p_b)``, TRAK scores

    tau(b, q) = num_train / M * sum_m phi_m(q)^T (Phi_m^T Phi_m + lam I)^-1
                phi_m(b) * mean_m (1 - p_b)

with ``phi_m(q)`` the projected gradient of the query's measurement. The
factor ``num_train`` puts the scores in jaxattr's units (upweighting ``b`` in
the mean loss); correlations and rankings do not depend on it.
"""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxattr import _checks, _tree
from jaxattr._task import Task
from jaxattr._types import Array, Batch, Params
from jaxattr.baselines import _common

BLOCK_ROWS = 1024
"""Parameter rows per generated block of a projection; fixes its values."""


def _block(key: Array, j: Array, dim: int, dtype) -> Array:
    scale = 1.0 / math.sqrt(dim)
    return (
        jax.random.normal(jax.random.fold_in(key, j), (BLOCK_ROWS, dim), dtype) * scale
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def projection_matrix(key: Array, num_params: int, dim: int, dtype) -> Array:
    """The ``(num_params, dim)`` Gaussian projection drawn from ``key``.

    Entries are ``N(0, 1 / dim)``, drawn in blocks of :data:`BLOCK_ROWS` rows,
    block ``j`` from ``fold_in(key, j)``; :func:`project_streaming` gives the
    same product without holding the matrix.

    Args:
      key: ``jax.random`` key.
      num_params: rows (flattened parameters, in ``ravel_pytree`` order).
      dim: columns, the projected dimension.
      dtype: entry dtype.

    Returns:
      ``(num_params, dim)`` array.
    """
    count = -(-num_params // BLOCK_ROWS)
    blocks = jax.vmap(lambda j: _block(key, j, dim, dtype))(jnp.arange(count))
    return blocks.reshape(count * BLOCK_ROWS, dim)[:num_params]


def project_streaming(grads: Array, key: Array, dim: int) -> Array:
    """``grads @ projection_matrix(key, num_params, dim)``, one block at a time.

    Never holds more than :data:`BLOCK_ROWS` rows of the projection.

    Args:
      grads: ``(num_rows, num_params)`` flat gradients.
      key: the projection's key.
      dim: projected dimension.

    Returns:
      ``(num_rows, dim)`` projected gradients.
    """
    rows, num_params = grads.shape
    count = -(-num_params // BLOCK_ROWS)
    padded = jnp.pad(grads, ((0, 0), (0, count * BLOCK_ROWS - num_params)))
    blocks = padded.reshape(rows, count, BLOCK_ROWS).transpose(1, 0, 2)

    def body(total, inputs):
        j, g = inputs
        return total + g @ _block(key, j, dim, grads.dtype), None

    start = jnp.zeros((rows, dim), grads.dtype)
    return jax.lax.scan(body, start, (jnp.arange(count), blocks))[0]


def _projected_grads(fn, params, data, proj, dim, chunk):
    """Per-example gradients of ``fn`` projected by ``proj`` (a matrix or a key).

    ``dim`` None means no projection.
    """
    held = dim is not None and proj.ndim == 2
    return _projected_grads_jit(fn, params, data, proj, dim, chunk, held)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _projected_grads_jit(fn, params, data, proj, dim, chunk, held):
    def one_chunk(rows):
        g = jax.vmap(lambda z: ravel_pytree(jax.grad(fn)(params, z))[0])(rows)
        if dim is None:
            return g
        return g @ proj if held else project_streaming(g, proj, dim)

    n = _tree.leading_size(data)
    count = -(-n // chunk)
    padded = _tree.pad_rows(data, count * chunk)
    rows = jax.tree.map(lambda a: a.reshape((count, chunk) + a.shape[1:]), padded)
    out = jax.lax.map(one_chunk, rows)
    return out.reshape(count * chunk, -1)[:n]


@functools.partial(jax.jit, static_argnums=(2,))
def trak_features(phi: Array, damping: float, use_pinv: bool) -> Array:
    """``Phi (Phi^T Phi + lam I)^-1`` ``(num_train, dim)``, in the cheaper form.

    With more features than examples it uses the equal ``(Phi Phi^T + lam I)^-1
    Phi`` (an ``num_train x num_train`` system); ``use_pinv`` replaces the
    inverse by the pseudo-inverse (for ``lam = 0``).
    """
    n, d = phi.shape
    if d <= n:
        matrix, rhs = phi.T @ phi, phi.T
    else:
        matrix, rhs = phi @ phi.T, phi
    if use_pinv:
        solved = jnp.linalg.pinv(matrix, hermitian=True) @ rhs
    else:
        eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
        solved = jnp.linalg.solve(matrix + damping * eye, rhs)
    return solved.T if d <= n else solved


@functools.partial(jax.jit, static_argnums=(0,))
def _one_minus_p(task, params, data):
    link = task.margin_view[1]
    margins = jax.vmap(task.margin, (None, 0))(params, data)
    return -jax.vmap(jax.grad(link))(margins, data)


def _projections(key, models, num_params, dim, dtype, budget):
    """Per model: the held matrix when all fit in ``budget`` bytes, else its key."""
    if dim is None:
        return [None] * len(models)
    keys = [jax.random.fold_in(key, m) for m in range(len(models))]
    itemsize = jnp.dtype(dtype).itemsize
    if len(models) * num_params * dim * itemsize > budget:
        return keys
    return [projection_matrix(k, num_params, dim, dtype) for k in keys]


def trak(
    task: Task,
    models: Sequence[Params],
    train_data: Batch,
    *,
    key: Array,
    proj_dim: int | None = 2048,
    damping: float = 0.0,
    measure: Callable | None = None,
    chunk_size: int = 256,
    query_chunk: int = 64,
    ids=None,
    projection_bytes: int = 2**30,
) -> _common.FeatureScorer:
    """TRAK over an ensemble of ``M`` models, optionally damped and unprojected.

    Training side, per model: the margin gradient of each example projected to
    ``proj_dim`` dimensions by a Gaussian matrix from ``fold_in(key, m)``, the
    kernel features ``Phi (Phi^T Phi + damping I)^-1`` and TRAK's ``1 - p``
    reweighting. Query side: the projected gradient of ``measure`` at each
    model. See the module docstring for the formula and units.

    Args:
      task: a classification :class:`jaxattr.Task` (it needs a margin).
      models: list of ``M`` parameter pytrees (an ensemble; split stacked
        parameters with ``jaxattr.evaluate.unstack``).
      train_data: training examples stacked on a leading ``num_train`` axis.
      key: ``jax.random`` key of the projections (``None`` allowed when
        ``proj_dim`` is ``None``).
      proj_dim: projected dimension ``k``; ``None`` keeps the full gradients
        (then the ``num_train x num_train`` form of the inverse is used when it
        is smaller).
      damping: ``lam >= 0`` added to ``Phi^T Phi`` (a sum over examples, not a
        mean); 0 uses the pseudo-inverse.
      measure: query measurement; defaults to ``task.margin``.
      chunk_size: training examples per vectorised gradient call.
      query_chunk: queries per scoring call.
      ids: ``(num_train,)`` integer ids; defaults to ``0..num_train-1``.
      projection_bytes: the projection matrices are held in memory when all
        ``M`` of them fit in this many bytes, and otherwise regenerated block
        by block whenever gradients are projected.

    Returns:
      A :class:`FeatureScorer`; ``build_seconds`` has ``train_gradients`` and
      ``kernel_inverse``, and timing ``query_features`` gives the per-query
      cost of the ``M`` backward passes and projections.

    Raises:
      TypeError, ValueError: malformed arguments or a task without a margin.
    """
    task, models, dim, damping, chunk = _check_args(
        task, models, train_data, key, proj_dim, damping, chunk_size
    )
    measure = task.margin if measure is None else measure
    flat = ravel_pytree(models[0])[0]
    projs = _projections(key, models, flat.size, dim, flat.dtype, projection_bytes)
    timer = _common.Timer()

    def features(params, proj):
        args = (task.margin, params, train_data, proj, dim, chunk)
        phi = timer("train_gradients", _projected_grads, *args)
        return timer("kernel_inverse", trak_features, phi, damping, damping == 0)

    train = [features(p, proj) for p, proj in zip(models, projs, strict=True)]
    reweight = jnp.mean(
        jnp.stack([_one_minus_p(task, p, train_data) for p in models]), 0
    )

    def query(queries):
        q_chunk = min(chunk, _tree.leading_size(queries))
        parts = [
            _projected_grads(measure, p, queries, proj, dim, q_chunk)
            for p, proj in zip(models, projs, strict=True)
        ]
        return jnp.concatenate(parts, axis=1)

    n = _tree.leading_size(train_data)
    return _common.FeatureScorer(
        query,
        jnp.concatenate(train, axis=1),
        reweight * (n / len(models)),
        _common.default_ids(ids, n),
        build_seconds=timer.seconds,
        query_chunk=_checks.positive_int("query_chunk", query_chunk),
        proj_dim=dim,
        num_models=len(models),
    )


def _check_args(task, models, train_data, key, proj_dim, damping, chunk_size):
    task = _common.check_task(task)
    if task.margin_view is None:
        raise ValueError(
            "TRAK needs a margin; build the task with jaxattr.classification(apply)."
        )
    dim = None if proj_dim is None else _checks.positive_int("proj_dim", proj_dim)
    if dim is not None and key is None:
        raise ValueError(
            f"proj_dim={dim} needs a jax.random key for the projection; pass key=, "
            "or proj_dim=None for unprojected gradients."
        )
    damping = _checks.nonneg_float("damping", damping)
    chunk = _checks.positive_int("chunk_size", chunk_size)
    chunk = min(chunk, _tree.leading_size(train_data))
    return task, _common.check_models(models), dim, damping, chunk
