"""Gradient dot product and TracIn: first-order, curvature-free baselines."""

from typing import Callable, Sequence

import jax.numpy as jnp

from jaxattr import _checks, _tree
from jaxattr._task import Task
from jaxattr._types import Batch, Params
from jaxattr.baselines import _common


def grad_dot(
    task: Task,
    params: Params,
    train_data: Batch,
    *,
    measure: Callable | None = None,
    chunk_size: int = 256,
    query_chunk: int = 64,
    ids=None,
) -> _common.FeatureScorer:
    """Gradient dot product: ``tau(b, q) = -grad measure_q . grad loss_b``.

    The first-order change of the query's measurement after one gradient step of
    unit size on ``b``'s loss: positive when that step raises the measurement.
    Stores the ``(num_train, num_params)`` training gradients.

    Args:
      task: a :class:`jaxattr.Task`, e.g. ``jaxattr.classification(apply)``.
      params: the trained parameters.
      train_data: training examples stacked on a leading ``num_train`` axis.
      measure: ``measure(params, example) -> scalar`` for queries; defaults to
        ``task.measure`` (the margin for classification).
      chunk_size: training examples per vectorised gradient call.
      query_chunk: queries per scoring call.
      ids: ``(num_train,)`` integer ids; defaults to ``0..num_train-1``.

    Returns:
      A :class:`FeatureScorer`; ``scorer(queries)`` is ``(num_queries, num_train)``.

    Raises:
      TypeError, ValueError: malformed arguments.
    """
    return tracin(
        task,
        [params],
        [1.0],
        train_data,
        measure=measure,
        chunk_size=chunk_size,
        query_chunk=query_chunk,
        ids=ids,
    )


def tracin(
    task: Task,
    checkpoints: Sequence[Params],
    learning_rates: Sequence[float],
    train_data: Batch,
    *,
    measure: Callable | None = None,
    chunk_size: int = 256,
    query_chunk: int = 64,
    ids=None,
) -> _common.FeatureScorer:
    """TracIn: learning-rate-weighted gradient dot products over checkpoints.

    ``tau(b, q) = -sum_c lr_c grad measure_q(theta_c) . grad loss_b(theta_c)``.

    Each checkpoint ``c`` contributes the gradient dot product at its
    parameters, weighted by the learning rate in force there. Stores
    ``(num_train, num_checkpoints * num_params)`` training gradients.

    Args:
      task: a :class:`jaxattr.Task`.
      checkpoints: list of parameter pytrees saved during training.
      learning_rates: one learning rate per checkpoint.
      train_data: training examples stacked on a leading ``num_train`` axis.
      measure: query measurement; defaults to ``task.measure``.
      chunk_size: training examples per vectorised gradient call.
      query_chunk: queries per scoring call.
      ids: ``(num_train,)`` integer ids; defaults to ``0..num_train-1``.

    Returns:
      A :class:`FeatureScorer`.

    Raises:
      TypeError, ValueError: malformed arguments, e.g. one learning rate per
        checkpoint missing.
    """
    task = _common.check_task(task)
    checkpoints = _common.check_models(checkpoints, "checkpoints")
    lrs = [_checks.nonneg_float("learning rate", lr) for lr in learning_rates]
    if len(lrs) != len(checkpoints):
        raise ValueError(
            f"Got {len(checkpoints)} checkpoints but {len(lrs)} learning rates; "
            "pass one learning rate per checkpoint."
        )
    measure = task.measure if measure is None else measure
    chunk = _checks.positive_int("chunk_size", chunk_size)
    n = _tree.leading_size(train_data)
    timer = _common.Timer()

    def grads_at(params):
        return _common.flat_grads(task.loss, params, train_data, chunk)

    train = timer("train_gradients", lambda: [grads_at(p) for p in checkpoints])

    def query_features(queries):
        parts = [
            -lr * _common.flat_grads(measure, p, queries, chunk)
            for p, lr in zip(checkpoints, lrs, strict=True)
        ]
        return jnp.concatenate(parts, axis=1)

    return _common.FeatureScorer(
        query_features,
        jnp.concatenate(train, axis=1),
        jnp.ones(n, train[0].dtype),
        _common.default_ids(ids, n),
        build_seconds=timer.seconds,
        query_chunk=_checks.positive_int("query_chunk", query_chunk),
    )
