"""Sketch builders: stream per-example responses, chunk by chunk, into a sketch.

A builder never needs all responses at once, so :func:`jaxattr.simulate` can
produce a compact sketch for more examples than dense responses would fit in
memory, and :func:`compress` turns a dense sketch into any other kind. Each
builder is a small frozen value with four pure-ish steps: ``start``, ``add``
(one chunk of responses), ``end_pass`` and ``finish``; builders that need
several passes over the responses (the adaptive basis) say so in ``passes``.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxattr import _checks, _tree
from jaxattr._sketch import (
    DenseSketch,
    FactoredSketch,
    LayerLowRankSketch,
    RandomBasis,
    SketchInfo,
)
from jaxattr._types import Array, Params


def _with(info: SketchInfo, **settings) -> SketchInfo:
    merged = dict(info.settings)
    merged.update(settings)
    return dataclasses.replace(info, settings=tuple(sorted(merged.items())))


@dataclasses.dataclass(frozen=True)
class Dense:
    """Keep every response whole (exact), optionally in a smaller float dtype."""

    dtype: Any = None
    passes = 1

    def start(self, params, num_rows):
        return []

    def add(self, state, pass_index, responses, start):
        cast = (lambda a: a) if self.dtype is None else (lambda a: a.astype(self.dtype))
        return state + [jax.tree.map(cast, responses)]

    def end_pass(self, state, pass_index):
        return state

    def finish(self, state, ids, info):
        rows = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *state)
        return DenseSketch(rows, jnp.asarray(ids), info)


@dataclasses.dataclass(frozen=True)
class Grouped:
    """Sum responses over a grouping of examples (data sources, classes, shards).

    Attribution is linear in the response, so the score of a query against a
    group is exactly the sum of its members' scores, at the cost of one readout
    per group: ``2 * num_groups`` forward evaluations per query with
    :class:`jaxattr.CentralDifference`, independent of the number of examples.

    Attributes:
      groups: ``(num_train,)`` integer group label of each example, in the row
        order of the training data. The sketch's ids are the sorted labels.
    """

    groups: Any
    passes = 1

    def __post_init__(self):
        arr = np.asarray(self.groups)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                "groups must be a 1-D array of integer labels, one per training "
                f"example; got dtype {arr.dtype} and shape {arr.shape}."
            )

    def start(self, params, num_rows):
        arr = np.asarray(self.groups)
        if arr.shape[0] != num_rows:
            raise ValueError(
                f"groups has {arr.shape[0]} labels but there are {num_rows} training "
                "examples; give one label per example."
            )
        labels, index = np.unique(arr, return_inverse=True)
        return labels, jnp.asarray(index), _tree.zeros_stacked(params, len(labels))

    def add(self, state, pass_index, responses, start):
        labels, index, acc = state
        rows = index[start : start + _rows(responses)]
        return labels, index, _segment_add(acc, rows, responses)

    def end_pass(self, state, pass_index):
        return state

    def finish(self, state, ids, info):
        labels, _, acc = state
        return DenseSketch(acc, jnp.asarray(labels), _with(info, grouped=True))


@jax.jit
def _segment_add(acc, rows, responses):
    return jax.tree.map(lambda a, r: a.at[rows].add(r.astype(a.dtype)), acc, responses)


def _rows(responses) -> int:
    return jax.tree.leaves(responses)[0].shape[0]


@dataclasses.dataclass(frozen=True)
class Projected:
    """Random projection to ``dim`` coefficients per example.

    The directions are generated from ``key`` (see
    :class:`jaxattr.RandomBasis`), never stored: the query side regenerates
    them. Scores are unbiased estimates of the dense scores with variance
    falling as ``1 / dim``.

    Attributes:
      dim: number of random directions ``k``.
      key: ``jax.random`` key of the directions.
      block: directions generated at once (bounds memory).
    """

    dim: int
    key: Any
    block: int = 256
    passes = 1

    def __post_init__(self):
        _checks.positive_int("dim", self.dim)
        _checks.positive_int("block", self.block)

    @property
    def basis(self) -> RandomBasis:
        data = np.asarray(jax.random.key_data(self.key)).ravel()
        return RandomBasis(tuple(int(v) for v in data), self.dim)

    def start(self, params, num_rows):
        return params, []

    def add(self, state, pass_index, responses, start):
        params, parts = state
        coef = _project_random(params, responses, basis=self.basis, block=self.block)
        return params, parts + [coef]

    def end_pass(self, state, pass_index):
        return state

    def finish(self, state, ids, info):
        info = _with(info, sketch="projected", dim=self.dim)
        coef = jnp.concatenate(state[1], axis=0)
        return FactoredSketch(coef, None, jnp.asarray(ids), info, self.basis)


@functools.partial(jax.jit, static_argnames=("basis", "block"))
def _project_random(params, responses, *, basis, block):
    flat = jax.vmap(lambda r: ravel_pytree(r)[0])(responses)
    out = []
    for start in range(0, basis.dim, block):
        size = min(block, basis.dim - start)
        dirs = basis.directions(params, jnp.asarray(start), size)
        d = jax.vmap(lambda x: ravel_pytree(x)[0])(dirs)
        out.append(flat @ d.T.astype(flat.dtype))
    return jnp.concatenate(out, axis=1)


@dataclasses.dataclass(frozen=True)
class InBasis:
    """Coefficients in given orthonormal directions, e.g. curvature eigenvectors.

    Attributes:
      vectors: ``(dim, num_params)`` orthonormal rows in the flattened
        parameter order of ``jax.flatten_util.ravel_pytree`` (for example
        :func:`jaxattr.eigenbasis` ``.vectors``).
    """

    vectors: Any
    passes = 1

    def start(self, params, num_rows):
        flat, unravel = ravel_pytree(params)
        if self.vectors.shape[-1] != flat.size:
            raise ValueError(
                f"InBasis vectors have {self.vectors.shape[-1]} columns but the "
                f"model has {flat.size} parameters; give (dim, num_params) rows."
            )
        return unravel, []

    def add(self, state, pass_index, responses, start):
        unravel, parts = state
        return unravel, parts + [_project_stored(responses, self.vectors)]

    def end_pass(self, state, pass_index):
        return state

    def finish(self, state, ids, info):
        unravel, parts = state
        stored = jax.vmap(unravel)(self.vectors)
        info = _with(info, sketch="in_basis", dim=int(self.vectors.shape[0]))
        return FactoredSketch(jnp.concatenate(parts), stored, jnp.asarray(ids), info)


@jax.jit
def _project_stored(responses, vectors):
    flat = jax.vmap(lambda r: ravel_pytree(r)[0])(responses)
    return flat @ vectors.T.astype(flat.dtype)


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """The top-``rank`` right singular directions of the response matrix.

    Found by a randomised SVD that streams over examples: a first pass
    accumulates ``R^T Omega`` (``Omega`` Gaussian, ``rank + oversample``
    columns, generated per example from ``key``), each power iteration is one
    more pass accumulating ``R^T (R Q)``, and a last pass computes ``R Q``.
    Memory is ``(rank + oversample) * num_params`` plus one chunk.

    Attributes:
      rank: directions kept; the query side costs ``rank`` readouts.
      key: ``jax.random`` key of the sketching matrix.
      oversample: extra sketch columns for accuracy.
      power_iters: extra passes that sharpen the spectrum.
    """

    rank: int
    key: Any
    oversample: int = 10
    power_iters: int = 1

    def __post_init__(self):
        _checks.positive_int("rank", self.rank)
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError("oversample and power_iters must be >= 0.")

    @property
    def passes(self) -> int:
        return self.power_iters + 2

    def start(self, params, num_rows):
        flat, unravel = ravel_pytree(params)
        width = self.rank + self.oversample
        return dict(
            unravel=unravel, y=jnp.zeros((width, flat.size), flat.dtype), q=None, b=[]
        )

    def add(self, state, pass_index, responses, start):
        flat = jax.vmap(lambda r: ravel_pytree(r)[0])(responses)
        if pass_index == 0:
            omega = _gaussian_rows(self.key, start, flat.shape[0], state["y"].shape[0])
            return dict(state, y=state["y"] + omega.T.astype(flat.dtype) @ flat)
        z = flat @ state["q"].T
        if pass_index < self.passes - 1:
            return dict(state, y=state["y"] + z.T @ flat)
        return dict(state, b=state["b"] + [z])

    def end_pass(self, state, pass_index):
        if pass_index == self.passes - 1:
            return state
        q, _ = jnp.linalg.qr(state["y"].T)
        return dict(state, q=q.T, y=jnp.zeros_like(state["y"]))

    def finish(self, state, ids, info):
        b = jnp.concatenate(state["b"], axis=0)
        _, _, wt = jnp.linalg.svd(b, full_matrices=False)
        w = wt[: self.rank].T
        vectors = w.T @ state["q"]
        stored = jax.vmap(state["unravel"])(vectors)
        info = _with(info, sketch="adaptive", dim=self.rank)
        return FactoredSketch(b @ w, stored, jnp.asarray(ids), info)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _gaussian_rows(key, start, rows, width):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (width,)))(
        start + jnp.arange(rows)
    )


@dataclasses.dataclass(frozen=True)
class LayerLowRank:
    """Each response's weight matrices at rank ``rank`` (truncated SVD).

    Attributes:
      rank: rank kept per matrix, per example.
    """

    rank: int
    passes = 1

    def __post_init__(self):
        _checks.positive_int("rank", self.rank)

    def start(self, params, num_rows):
        return []

    def add(self, state, pass_index, responses, start):
        leaves = jax.tree.leaves(responses)
        return state + [
            [_factorise(a, self.rank) if a.ndim == 3 else a for a in leaves]
        ]

    def end_pass(self, state, pass_index):
        return state

    def finish(self, state, ids, info):
        cat = lambda *parts: jnp.concatenate(parts, axis=0)
        factors = [
            tuple(cat(*f) for f in zip(*col, strict=True))
            if isinstance(col[0], tuple)
            else cat(*col)
            for col in zip(*state, strict=True)
        ]
        info = _with(info, sketch="layer_lowrank", rank=self.rank)
        return LayerLowRankSketch(factors, jnp.asarray(ids), info)


@functools.partial(jax.jit, static_argnums=1)
def _factorise(rows: Array, rank: int) -> tuple:
    u, s, vt = jnp.linalg.svd(rows, full_matrices=False)
    r = min(rank, s.shape[-1])
    return u[..., :r] * s[..., None, :r], jnp.swapaxes(vt[..., :r, :], -1, -2)


def run(builder, chunks_fn, params: Params, num_rows: int, ids, info):
    """Streams the chunks that ``chunks_fn(pass_index)`` yields into a sketch."""
    state = builder.start(params, num_rows)
    for p in range(builder.passes):
        for start, responses in chunks_fn(p):
            state = builder.add(state, p, responses, start)
        state = builder.end_pass(state, p)
    return builder.finish(state, ids, info)


def compress(sketch: DenseSketch, builder, params: Params, chunk_size: int = 256):
    """Re-encodes a dense sketch with another builder (projected, adaptive, ...).

    Args:
      sketch: a :class:`jaxattr.DenseSketch`.
      builder: e.g. :class:`Projected`, :class:`Adaptive`, :class:`Grouped`.
      params: the parameters the sketch belongs to (checked against it).
      chunk_size: rows streamed at once.

    Returns:
      The new sketch, with the same ids (or group labels) and metadata.
    """
    if not isinstance(sketch, DenseSketch):
        raise TypeError(f"compress needs a DenseSketch, got {type(sketch).__name__}.")
    sketch.check_params(params)
    n, c = sketch.num_train, _checks.positive_int("chunk_size", chunk_size)

    def chunks(_):
        for start in range(0, n, c):
            stop = min(start + c, n)
            yield start, jax.tree.map(lambda a: a[start:stop], sketch.responses)

    return run(builder, chunks, params, n, np.asarray(sketch.ids), sketch.info)
