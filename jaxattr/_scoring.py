"""Forward-only scoring of queries against a parameter sketch."""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxattr import _checks, _tree
from jaxattr._readout import JVP, CentralDifference, ForwardDifference
from jaxattr._sketch import DenseSketch, FactoredSketch, LayerLowRankSketch
from jaxattr._task import measure_name
from jaxattr._types import Array, Batch, Params

SKETCHES = (DenseSketch, LayerLowRankSketch, FactoredSketch)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Top proponents and opponents of each query.

    Attributes:
      proponents: ``(num_queries, k)`` ids of the examples with the largest
        (most helpful) scores, best first.
      proponent_scores: their scores.
      opponents: ``(num_queries, k)`` ids with the most negative scores, most
        harmful first.
      opponent_scores: their scores (negative unless fewer than ``k`` harm).
    """

    proponents: Array
    proponent_scores: Array
    opponents: Array
    opponent_scores: Array


class Scorer:
    """Attribution scores of query examples, read out with forward evaluations.

    ``scorer(queries)[q, i]`` is ``tau(ids[i], q) = d measure(theta_eps, q) /
    d eps`` for upweighting training example ``ids[i]`` (see
    :class:`DenseSketch` for units): positive when the example pushes the
    query's measurement up. Removing the example changes the measurement by
    about ``-score / num_train``. For a grouped sketch, row ``i`` is the sum
    over the examples of source ``ids[i]``.

    Cost per query: one readout per sketch row for dense and per-layer
    low-rank sketches; one readout per basis direction for factored sketches
    (projected or adaptive), whatever the number of training examples.

    Built by :func:`scorer`; all methods are jitted and chunked, so peak memory
    is set by ``query_chunk`` and ``train_chunk``.
    """

    def __init__(self, measure, params, sketch, readout, query_chunk, train_chunk):
        self.measure = measure
        self.params = params
        self.sketch = sketch
        self.readout = readout
        self.query_chunk = query_chunk
        rows = sketch.dim if isinstance(sketch, FactoredSketch) else sketch.num_train
        decode = None if isinstance(sketch, FactoredSketch) else type(sketch).decode_row
        self._how = _How(measure, readout, min(train_chunk, rows), decode)

    def __call__(self, queries: Batch) -> Array:
        """Scores ``(num_queries, num_train)`` for a batch of query examples."""
        kernel = _factored_scores if self._factored else _scores_block
        out = [self._run(kernel, chunk)[:m] for chunk, m in self._query_chunks(queries)]
        return jnp.concatenate(out, axis=0)

    def top_k(self, queries: Batch, k: int = 10) -> TopK:
        """Top-``k`` proponents and opponents per query, never holding all scores."""
        k = _checks.positive_int("k", k)
        if k > self.sketch.num_train:
            raise ValueError(
                f"k={k} exceeds the {self.sketch.num_train} training examples "
                "in the sketch; use k <= num_train."
            )
        kernel = _factored_topk if self._factored else _topk_block
        parts = [
            jax.tree.map(lambda a, m=m: a[:m], self._run(kernel, chunk, k=k))
            for chunk, m in self._query_chunks(queries)
        ]
        (hi, hi_i), (lo, lo_i) = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
        ids = self.sketch.ids
        return TopK(ids[hi_i], hi, ids[lo_i], -lo)

    def self_influence(self, train_data: Batch) -> Array:
        """``(num_train,)`` score of each training example against itself.

        ``train_data`` rows must be in the sketch's row order. High values flag
        examples the model fits only by memorising them (often mislabeled).
        """
        n = _tree.leading_size(train_data)
        if n != self.sketch.num_train:
            raise ValueError(
                f"train_data has {n} examples but the sketch has "
                f"{self.sketch.num_train}; pass the training examples in the "
                "sketch's row order."
            )
        kernel = _factored_self if self._factored else _self_block
        return self._run(kernel, train_data)

    @property
    def _factored(self) -> bool:
        return isinstance(self.sketch, FactoredSketch)

    def _run(self, kernel, examples, **kwargs):
        """Calls a kernel, turning autodiff failures of the measure into advice."""
        try:
            return kernel(self.params, self.sketch, examples, how=self._how, **kwargs)
        except (ValueError, TypeError, NotImplementedError) as err:
            text = str(err).lower()
            if isinstance(self.readout, JVP) and (
                "jvp" in text or "differentiat" in text
            ):
                raise TypeError(
                    "The measurement cannot be differentiated by jax.jvp "
                    f"({str(err).splitlines()[0]}). Use readout="
                    "jaxattr.CentralDifference() or jaxattr.ForwardDifference(), "
                    "which only evaluate the measurement."
                ) from err
            raise

    def _query_chunks(self, queries):
        q = _tree.leading_size(queries)
        if q == 0:
            raise ValueError("Got an empty query batch; pass at least one query.")
        c = min(self.query_chunk, q)
        for start in range(0, q, c):
            stop = min(start + c, q)
            rows = _tree.pad_rows(_tree.slice_rows(queries, start, stop), c)
            yield rows, stop - start


@dataclasses.dataclass(frozen=True)
class _How:
    """Static configuration of the scoring kernels (hashable, for the jit cache)."""

    measure: Callable
    readout: Any
    chunk: int
    decode: Callable | None

    def derivative(self, params, r, queries, base):
        """Readout of the measurements of ``queries`` along direction ``r``."""
        f = lambda p: jax.vmap(self.measure, (None, 0))(p, queries)
        r = jax.tree.map(lambda a, p: a.astype(p.dtype), r, params)
        return self.readout(f, params, r, base)

    def base(self, params, queries):
        """Unshifted measurements, shared by every direction (one-sided only)."""
        if isinstance(self.readout, ForwardDifference):
            return jax.vmap(self.measure, (None, 0))(params, queries)
        return None

    def per_row(self, params, queries):
        """``row -> (num_queries,)`` readouts along a stored sketch row."""
        base = self.base(params, queries)
        return lambda row: self.derivative(
            params, self.decode(row, params), queries, base
        )


# Rows are parameter directions (dense, per-layer low rank, grouped) ----------


@functools.partial(jax.jit, static_argnames="how")
def _scores_block(params, sketch, queries, *, how):
    per = how.per_row(params, queries)
    return jax.lax.map(per, sketch.rows, batch_size=how.chunk).T


@functools.partial(jax.jit, static_argnames=("how", "k"))
def _topk_block(params, sketch, queries, *, how, k):
    n, c = sketch.num_train, how.chunk
    per = how.per_row(params, queries)

    def body(i, carry):
        start = jnp.minimum(i * c, n - c)
        rows = jax.tree.map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, start, c), sketch.rows
        )
        s = jax.vmap(per)(rows).T  # (queries, c)
        idx = (start + jnp.arange(c)).astype(jnp.int32)
        fresh = idx >= i * c  # the clamped last chunk repeats earlier rows
        hi = _merge(carry[0], jnp.where(fresh, s, -jnp.inf), idx, k)
        lo = _merge(carry[1], jnp.where(fresh, -s, -jnp.inf), idx, k)
        return hi, lo

    q = _tree.leading_size(queries)
    empty = (jnp.full((q, k), -jnp.inf, _dtype(params)), jnp.zeros((q, k), jnp.int32))
    return jax.lax.fori_loop(0, -(-n // c), body, (empty, empty))


@functools.partial(jax.jit, static_argnames="how")
def _self_block(params, sketch, examples, *, how):
    def one(args):
        row, example = args
        f = lambda p: how.measure(p, example)[None]
        r = jax.tree.map(
            lambda a, p: a.astype(p.dtype), how.decode(row, params), params
        )
        return how.readout(f, params, r)[0]

    return jax.lax.map(one, (sketch.rows, examples), batch_size=how.chunk)


# Rows are coefficients in a shared basis (projected, adaptive) ---------------


def _query_coefficients(params, sketch, queries, how):
    """``(num_queries, dim)`` readouts of the queries along each basis direction."""
    base = how.base(params, queries)

    def one(i):
        d = jax.tree.map(lambda a: a[0], sketch.directions(params, i, 1))
        return how.derivative(params, d, queries, base)

    return jax.lax.map(one, jnp.arange(sketch.dim), batch_size=how.chunk).T


@functools.partial(jax.jit, static_argnames="how")
def _factored_scores(params, sketch, queries, *, how):
    coef = _query_coefficients(params, sketch, queries, how)
    return coef @ sketch.coefficients.T.astype(coef.dtype)


@functools.partial(jax.jit, static_argnames=("how", "k"))
def _factored_topk(params, sketch, queries, *, how, k):
    scores = _factored_scores(params, sketch, queries, how=how)
    hi, hi_i = jax.lax.top_k(scores, k)
    lo, lo_i = jax.lax.top_k(-scores, k)
    return (hi, hi_i), (lo, lo_i)


@functools.partial(jax.jit, static_argnames="how")
def _factored_self(params, sketch, examples, *, how):
    coef = _query_coefficients(params, sketch, examples, how)
    return jnp.sum(coef * sketch.coefficients.astype(coef.dtype), axis=1)


def _dtype(params):
    return jnp.result_type(*jax.tree.leaves(params))


def _merge(carry, scores, idx, k):
    vals = jnp.concatenate([carry[0], scores], axis=1)
    inds = jnp.concatenate([carry[1], jnp.broadcast_to(idx, scores.shape)], axis=1)
    top, pos = jax.lax.top_k(vals, k)
    return top, jnp.take_along_axis(inds, pos, axis=1)


def scorer(
    measure: Callable,
    params: Params,
    sketch: Any,
    *,
    readout=None,
    query_chunk: int = 64,
    train_chunk: int = 256,
) -> Scorer:
    """A forward-only scorer of query batches against ``sketch``.

    Args:
      measure: ``measure(params, example) -> scalar`` for one query, e.g.
        ``task.margin``. With a difference readout it is only ever evaluated,
        never differentiated.
      params: the parameters the sketch was simulated at.
      sketch: a :class:`DenseSketch` (also grouped), :class:`LayerLowRankSketch`
        or :class:`FactoredSketch`.
      readout: :class:`JVP` (default), :class:`CentralDifference` or
        :class:`ForwardDifference`.
      query_chunk: queries per kernel call.
      train_chunk: sketch rows (or basis directions) per vectorised step;
        bounds memory.

    Returns:
      A :class:`Scorer`; ``scorer(queries)`` gives ``(num_queries, num_train)``.

    Raises:
      ValueError: ``params`` do not match the sketch, or the sketch is tied to a
        different measurement.
    """
    if not isinstance(sketch, SKETCHES):
        raise TypeError(
            "sketch must be a jaxattr.DenseSketch, LayerLowRankSketch or "
            f"FactoredSketch, got {type(sketch).__name__}."
        )
    readout = JVP() if readout is None else readout
    if not isinstance(readout, (JVP, CentralDifference, ForwardDifference)):
        raise TypeError(
            "readout must be jaxattr.JVP(), jaxattr.CentralDifference() or "
            f"jaxattr.ForwardDifference(), got {readout!r}."
        )
    sketch.check_params(params)
    tied = sketch.info.measurement
    if tied is not None and tied != measure_name(measure):
        raise ValueError(
            f"This sketch was built for measurement {tied!r} but the scorer got "
            f"{measure_name(measure)!r}. Score with {tied!r}, or simulate again "
            "without measurement= to get a sketch any measurement can read."
        )
    return Scorer(
        measure,
        params,
        sketch,
        readout,
        _checks.positive_int("query_chunk", query_chunk),
        _checks.positive_int("train_chunk", train_chunk),
    )
