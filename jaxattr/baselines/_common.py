"""What every baseline shares: per-example gradients and a feature-product scorer.

Each baseline scores ``tau(b, q) = <query_features(q), train_features[b]> *
train_scale[b]``: the methods differ only in how the two sides are built.
"""

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxattr import _checks, _tree
from jaxattr._scoring import TopK
from jaxattr._task import Task
from jaxattr._types import Array, Batch, Params


def flat_grads(fn: Callable, params: Params, data: Batch, chunk: int) -> Array:
    """``(n, num_params)`` gradients of ``fn(params, example)``, flattened.

    Leaves are flattened in ``jax.tree`` order, as ``ravel_pytree`` does.
    """
    return _flat_grads(fn, params, data, min(chunk, _tree.leading_size(data)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _flat_grads(fn, params, data, chunk):
    one = lambda z: ravel_pytree(jax.grad(fn)(params, z))[0]
    return jax.lax.map(one, data, batch_size=chunk)


def flatten(params: Params) -> tuple[Array, Callable]:
    """``(flat (num_params,), unravel)`` of a parameter pytree."""
    return ravel_pytree(params)


class Timer:
    """Records wall-clock seconds of named build stages, blocking on results."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable, *args) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


class FeatureScorer:
    """Attribution scores as products of query and training features.

    ``scorer(queries)[q, i] = <query_features(q), train_features[i]> *
    train_scale[i]`` is jaxattr's ``tau(ids[i], q)``: positive when upweighting
    training example ``ids[i]`` pushes the query's measurement up. Every
    baseline in :mod:`jaxattr.baselines` returns one.

    Attributes:
      train_features: ``(num_train, num_features)``.
      train_scale: ``(num_train,)`` per-example factors.
      ids: ``(num_train,)`` integer ids of the training examples.
      build_seconds: wall-clock seconds of each build stage, e.g. training
        gradients or the kernel inverse, for cost comparisons.
      query_features: ``query_features(queries) -> (num_queries,
        num_features)``; time it to get the per-query cost of the method's
        backward passes and projections, and :meth:`scores_from_features` for
        the products.
    """

    def __init__(self, query_features, train_features, train_scale, ids, **info):
        self.query_features = query_features
        self.train_features = train_features
        self.train_scale = train_scale
        self.ids = jnp.asarray(ids)
        self.build_seconds = info.pop("build_seconds", {})
        self.query_chunk = info.pop("query_chunk", 64)
        self.info = info

    @property
    def num_train(self) -> int:
        return int(self.train_features.shape[0])

    def scores_from_features(self, features: Array) -> Array:
        """Scores from precomputed query features.

        Args:
          features: ``(num_queries, num_features)`` from ``query_features``.

        Returns:
          ``(num_queries, num_train)`` scores.
        """
        return _product(features, self.train_features, self.train_scale)

    def __call__(self, queries: Batch) -> Array:
        """Attribution scores of a query batch.

        Args:
          queries: query examples stacked on a leading ``num_queries`` axis.

        Returns:
          ``(num_queries, num_train)`` scores; positive means upweighting the
          training example raises the query's measurement.

        Raises:
          ValueError: an empty batch.
        """
        parts = [
            self.scores_from_features(self.query_features(chunk))[:real]
            for chunk, real in self._chunks(queries)
        ]
        return jnp.concatenate(parts, axis=0)

    def top_k(self, queries: Batch, k: int = 10) -> TopK:
        """Top-``k`` proponents (largest scores) and opponents (most negative).

        Args:
          queries: query examples stacked on a leading ``num_queries`` axis.
          k: how many of each.

        Returns:
          :class:`jaxattr.TopK` with ``(num_queries, k)`` ids and scores.

        Raises:
          ValueError: ``k`` not in ``[1, num_train]``.
        """
        k = _checks.positive_int("k", k)
        if k > self.num_train:
            raise ValueError(
                f"k={k} exceeds the {self.num_train} training examples; use "
                "k <= num_train."
            )
        scores = self(queries)
        hi, hi_idx = jax.lax.top_k(scores, k)
        lo, lo_idx = jax.lax.top_k(-scores, k)
        return TopK(self.ids[hi_idx], hi, self.ids[lo_idx], -lo)

    def self_influence(self, train_data: Batch) -> Array:
        """``(num_train,)`` score of each training example against itself.

        Args:
          train_data: the training examples, in the row order used to build
            this scorer.

        Returns:
          ``(num_train,)`` self-influence; high values flag examples the model
          fits by memorising them (often mislabeled).

        Raises:
          ValueError: a different number of examples.
        """
        n = _tree.leading_size(train_data)
        if n != self.num_train:
            raise ValueError(
                f"train_data has {n} examples but the scorer has {self.num_train}; "
                "pass the training examples in the order used to build it."
            )
        parts, start = [], 0
        for chunk, real in self._chunks(train_data):
            rows = slice(start, start + real)
            feats = self.query_features(chunk)[:real]
            parts.append(
                _diag(feats, self.train_features[rows], self.train_scale[rows])
            )
            start = rows.stop
        return jnp.concatenate(parts)

    def _chunks(self, batch: Batch):
        """Yields ``(chunk, real)``; every chunk has one size (the last is padded)."""
        q = _tree.leading_size(batch)
        if q == 0:
            raise ValueError("Got an empty batch of queries; pass at least one.")
        size = min(self.query_chunk, q)
        for start in range(0, q, size):
            stop = min(start + size, q)
            rows = _tree.slice_rows(batch, start, stop)
            yield _tree.pad_rows(rows, size), stop - start


@jax.jit
def _product(query_features, train_features, train_scale):
    return (query_features @ train_features.T) * train_scale


@jax.jit
def _diag(query_features, train_features, train_scale):
    return jnp.sum(query_features * train_features, axis=1) * train_scale


def default_ids(ids: Any, num_train: int) -> Array:
    """Checked ``(num_train,)`` integer ids, ``0..num_train-1`` by default."""
    if ids is None:
        return jnp.arange(num_train)
    ids = np.asarray(ids)
    if ids.shape != (num_train,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"ids must be ({num_train},) integers, got {ids.dtype} {ids.shape}."
        )
    if len(np.unique(ids)) != num_train:
        raise ValueError("ids must be distinct.")
    return jnp.asarray(ids)


def check_task(task: Any) -> Task:
    if not isinstance(task, Task):
        raise TypeError(
            "task must be a jaxattr.Task, e.g. jaxattr.classification(apply), got "
            f"{type(task).__name__}."
        )
    return task


def check_models(models: Any, name: str = "models") -> list:
    """A non-empty list of parameter pytrees with one structure and shapes."""
    if not isinstance(models, (list, tuple)) or not models:
        raise TypeError(
            f"{name} must be a non-empty list of parameter pytrees, got "
            f"{type(models).__name__}. Split stacked parameters with "
            "jaxattr.evaluate.unstack."
        )
    spec = _tree.param_spec(models[0])
    for i, params in enumerate(models[1:], 1):
        diff = _tree.spec_mismatch(spec, _tree.param_spec(params))
        if diff is not None:
            raise ValueError(f"{name}[{i}] differs from {name}[0]: {diff}.")
    return list(models)
