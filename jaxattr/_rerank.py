"""Shortlist re-ranking: a cheap sketch proposes, exact readouts decide."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _checks, _tree
from jaxattr._scoring import Scorer, TopK
from jaxattr._sketch import DenseSketch
from jaxattr._types import Batch


def rerank(
    coarse: Scorer,
    exact: DenseSketch,
    queries: Batch,
    *,
    k: int = 10,
    shortlist: int = 100,
    readout=None,
    query_chunk: int = 8,
) -> TopK:
    """Top-``k`` proponents and opponents by re-scoring a shortlist exactly.

    ``coarse`` (typically a scorer over a small factored sketch) proposes
    ``shortlist`` candidates on each side per query; each candidate is then
    scored from its full response in ``exact`` with ``readout``, and the best
    ``k`` of those are returned. Cost per query: the coarse scoring plus
    ``2 * shortlist`` readouts (one jvp each, or two forward evaluations each
    with :class:`CentralDifference`), instead of a readout per training example.

    Args:
      coarse: a :class:`Scorer`; its measurement and parameters are reused.
      exact: the dense sketch of the same training examples (its leaves may be
        host arrays, e.g. memory-mapped ``.npy`` files: only candidate rows
        are read).
      queries: the query batch.
      k: results per side.
      shortlist: candidates per side, ``>= k``.
      readout: readout of the exact scores; by default the coarse scorer's
        (:class:`JVP` unless it was given another), so that with a shortlist
        covering every example the result equals ``exact``'s own top-k. Pass
        :class:`CentralDifference` for models that only evaluate; on ReLU
        networks its finite step can cross kinks, so prefer :class:`JVP` there.
      query_chunk: queries re-scored at once (memory grows with
        ``query_chunk * 2 * shortlist`` responses).

    Returns:
      A :class:`TopK` with ids from ``exact``.
    """
    k = _checks.positive_int("k", k)
    shortlist = _checks.positive_int("shortlist", shortlist)
    if shortlist < k:
        raise ValueError(f"shortlist={shortlist} must be >= k={k}.")
    if shortlist > exact.num_train:
        raise ValueError(
            f"shortlist={shortlist} exceeds the {exact.num_train} training examples "
            "in the exact sketch; use shortlist <= num_train."
        )
    exact.check_params(coarse.params)
    readout = coarse.readout if readout is None else readout
    rows_of = _row_lookup(np.asarray(exact.ids))
    proposed = coarse.top_k(queries, shortlist)
    candidates = np.concatenate(
        [rows_of(proposed.proponents), rows_of(proposed.opponents)], axis=1
    )
    scores = _rescore(coarse, exact, queries, candidates, readout, query_chunk)
    return _best(scores, candidates, np.asarray(exact.ids), k)


def _row_lookup(ids: np.ndarray):
    order = np.argsort(ids)
    sorted_ids = ids[order]

    def rows(query_ids):
        query_ids = np.asarray(query_ids)
        pos = np.searchsorted(sorted_ids, query_ids)
        if np.any(sorted_ids[np.minimum(pos, len(ids) - 1)] != query_ids):
            raise ValueError(
                "The coarse scorer proposed ids that the exact sketch does not hold; "
                "both sketches must cover the same training examples."
            )
        return order[pos]

    return rows


def _rescore(coarse, exact, queries, candidates, readout, chunk):
    q = _tree.leading_size(queries)
    c = _checks.positive_int("query_chunk", chunk)
    out = []
    for start in range(0, q, c):
        stop = min(start + c, q)
        rows = candidates[start:stop]
        responses = jax.tree.map(lambda a, r=rows: jnp.asarray(a[r]), exact.responses)
        batch = _tree.slice_rows(queries, start, stop)
        out.append(
            _rescore_block(coarse.params, responses, batch, coarse.measure, readout)
        )
    return np.concatenate([np.asarray(o) for o in out], axis=0)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _rescore_block(params, responses, queries, measure, readout):
    def per_query(rows, example):
        f = lambda p: measure(p, example)[None]
        cast = lambda r: jax.tree.map(lambda a, p: a.astype(p.dtype), r, params)
        return jax.vmap(lambda r: readout(f, params, cast(r))[0])(rows)

    return jax.vmap(per_query)(responses, queries)


def _best(scores, candidates, ids, k):
    """Top-k on each side among the (deduplicated) candidates of each query."""
    hi, hi_s, lo, lo_s = [], [], [], []
    for row_scores, rows in zip(scores, candidates, strict=True):
        rows, first = np.unique(rows, return_index=True)
        s = row_scores[first]
        up, down = np.argsort(-s)[:k], np.argsort(s)[:k]
        hi.append(ids[rows[up]])
        hi_s.append(s[up])
        lo.append(ids[rows[down]])
        lo_s.append(s[down])
    return TopK(*(jnp.asarray(np.stack(a)) for a in (hi, hi_s, lo, lo_s)))
