"""Sketch builders: stream per-example responses, chunk by chunk, into a sketch.

A builder never needs all responses at once, so :func:`jaxattr.simulate` can
produce a compact sketch for more examples than dense responses would fit in
memory, and :func:`compress` turns a dense sketch into any other kind.

Each builder is a small frozen value with five steps:

* ``context(params, num_rows)``: what the builder derives from its inputs
  (never saved: it is recomputed when a run resumes);
* ``start(ctx) -> BuildState`` with ``acc`` (a dict of arrays, overwritten as
  it changes) and ``parts`` (a list that only grows, one entry per chunk);
* ``add(ctx, state, pass_index, responses, start)`` for one chunk;
* ``end_pass(ctx, state, pass_index)`` and ``finish(ctx, state, ids, info)``.

Builders that need several passes over the responses (the adaptive basis)
say so in ``passes``. The split into ``acc`` and ``parts`` lets a checkpoint
store each chunk's part once and rewrite only the accumulators.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

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


class BuildState(NamedTuple):
    """A builder's progress: accumulators (rewritten) and parts (appended)."""

    acc: dict
    parts: list


def _with(info: SketchInfo, **settings) -> SketchInfo:
    merged = dict(info.settings)
    merged.update(settings)
    return dataclasses.replace(info, settings=tuple(sorted(merged.items())))


@dataclasses.dataclass(frozen=True)
class Dense:
    """Keep every response whole (exact), optionally in a smaller float dtype."""

    dtype: Any = None
    passes = 1

    def context(self, params, num_rows):
        return None

    def start(self, ctx):
        return BuildState({}, [])

    def add(self, ctx, state, pass_index, responses, start):
        cast = (lambda a: a) if self.dtype is None else (lambda a: a.astype(self.dtype))
        return BuildState(state.acc, state.parts + [jax.tree.map(cast, responses)])

    def end_pass(self, ctx, state, pass_index):
        return state

    def finish(self, ctx, state, ids, info):
        rows = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *state.parts)
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

    def context(self, params, num_rows):
        arr = np.asarray(self.groups)
        if arr.shape[0] != num_rows:
            raise ValueError(
                f"groups has {arr.shape[0]} labels but there are {num_rows} training "
                "examples; give one label per example."
            )
        labels, index = np.unique(arr, return_inverse=True)
        return dict(params=params, labels=labels, index=jnp.asarray(index))

    def start(self, ctx):
        sums = _tree.zeros_stacked(ctx["params"], len(ctx["labels"]))
        return BuildState(dict(sums=sums), [])

    def add(self, ctx, state, pass_index, responses, start):
        rows = ctx["index"][start : start + _rows(responses)]
        return BuildState(
            dict(sums=_segment_add(state.acc["sums"], rows, responses)), []
        )

    def end_pass(self, ctx, state, pass_index):
        return state

    def finish(self, ctx, state, ids, info):
        labels = jnp.asarray(ctx["labels"])
        return DenseSketch(state.acc["sums"], labels, _with(info, grouped=True))


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
      block: directions generated at once when they are not cached.
      cache_bytes: keep all directions in memory during the run when they
        take at most this many bytes (they are still never stored in the
        sketch); otherwise regenerate them block by block for every chunk.
    """

    dim: int
    key: Any
    block: int = 256
    cache_bytes: int = 1 << 30
    passes = 1

    def __post_init__(self):
        _checks.positive_int("dim", self.dim)
        _checks.positive_int("block", self.block)

    @property
    def basis(self) -> RandomBasis:
        data = np.asarray(jax.random.key_data(self.key)).ravel()
        return RandomBasis(tuple(int(v) for v in data), self.dim)

    def context(self, params, num_rows):
        flat = ravel_pytree(params)[0]
        if self.dim * flat.size * flat.dtype.itemsize > self.cache_bytes:
            return dict(params=params, matrix=None)
        matrix = _random_matrix(params, basis=self.basis, block=self.block)
        return dict(params=params, matrix=matrix)

    def start(self, ctx):
        return BuildState({}, [])

    def add(self, ctx, state, pass_index, responses, start):
        if ctx["matrix"] is not None:
            coef = _project_stored(responses, ctx["matrix"])
        else:
            coef = _project_random(
                ctx["params"], responses, basis=self.basis, block=self.block
            )
        return BuildState(state.acc, state.parts + [coef])

    def end_pass(self, ctx, state, pass_index):
        return state

    def finish(self, ctx, state, ids, info):
        info = _with(info, sketch="projected", dim=self.dim)
        coef = jnp.concatenate(state.parts, axis=0)
        return FactoredSketch(coef, None, jnp.asarray(ids), info, self.basis)


@functools.partial(jax.jit, static_argnames=("basis", "block"))
def _random_matrix(params, *, basis, block):
    """All directions of ``basis`` as a ``(dim, num_params)`` matrix."""
    rows = []
    for start in range(0, basis.dim, block):
        size = min(block, basis.dim - start)
        dirs = basis.directions(params, jnp.asarray(start), size)
        rows.append(jax.vmap(lambda x: ravel_pytree(x)[0])(dirs))
    return jnp.concatenate(rows, axis=0)


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

    def context(self, params, num_rows):
        flat, unravel = ravel_pytree(params)
        if self.vectors.shape[-1] != flat.size:
            raise ValueError(
                f"InBasis vectors have {self.vectors.shape[-1]} columns but the "
                f"model has {flat.size} parameters; give (dim, num_params) rows."
            )
        return unravel

    def start(self, ctx):
        return BuildState({}, [])

    def add(self, ctx, state, pass_index, responses, start):
        coef = _project_stored(responses, self.vectors)
        return BuildState(state.acc, state.parts + [coef])

    def end_pass(self, ctx, state, pass_index):
        return state

    def finish(self, ctx, state, ids, info):
        stored = jax.vmap(ctx)(self.vectors)
        info = _with(info, sketch="in_basis", dim=int(self.vectors.shape[0]))
        coef = jnp.concatenate(state.parts)
        return FactoredSketch(coef, stored, jnp.asarray(ids), info)


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

    def context(self, params, num_rows):
        flat, unravel = ravel_pytree(params)
        most = min(flat.size, num_rows)
        if self.rank > most:
            raise ValueError(
                f"Adaptive(rank={self.rank}) asks for more directions than the "
                f"{num_rows} x {flat.size} response matrix (examples x parameters) "
                f"has; use rank <= {most}."
            )
        # Oversampling past the number of parameters adds nothing.
        width = min(self.rank + self.oversample, flat.size)
        return dict(unravel=unravel, size=flat.size, dtype=flat.dtype, width=width)

    def start(self, ctx):
        y = jnp.zeros((ctx["width"], ctx["size"]), ctx["dtype"])
        return BuildState(dict(y=y), [])

    def add(self, ctx, state, pass_index, responses, start):
        flat = jax.vmap(lambda r: ravel_pytree(r)[0])(responses)
        y = state.acc["y"]
        if pass_index == 0:
            omega = _gaussian_rows(self.key, start, flat.shape[0], y.shape[0])
            return BuildState(dict(y=y + omega.T.astype(flat.dtype) @ flat), [])
        z = flat @ state.acc["q"].T
        if pass_index < self.passes - 1:
            return BuildState(dict(state.acc, y=y + z.T @ flat), [])
        return BuildState(state.acc, state.parts + [z])

    def end_pass(self, ctx, state, pass_index):
        if pass_index == self.passes - 1:
            return state
        q, _ = jnp.linalg.qr(state.acc["y"].T)
        return BuildState(dict(y=jnp.zeros_like(state.acc["y"]), q=q.T), [])

    def finish(self, ctx, state, ids, info):
        b = jnp.concatenate(state.parts, axis=0)
        _, _, wt = jnp.linalg.svd(b, full_matrices=False)
        w = wt[: self.rank].T
        stored = jax.vmap(ctx["unravel"])(w.T @ state.acc["q"])
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

    def context(self, params, num_rows):
        return None

    def start(self, ctx):
        return BuildState({}, [])

    def add(self, ctx, state, pass_index, responses, start):
        leaves = jax.tree.leaves(responses)
        part = [_factorise(a, self.rank) if a.ndim == 3 else a for a in leaves]
        return BuildState(state.acc, state.parts + [part])

    def end_pass(self, ctx, state, pass_index):
        return state

    def finish(self, ctx, state, ids, info):
        cat = lambda *parts: jnp.concatenate(parts, axis=0)
        factors = [
            tuple(cat(*f) for f in zip(*col, strict=True))
            if isinstance(col[0], tuple)
            else cat(*col)
            for col in zip(*state.parts, strict=True)
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
    ctx = builder.context(params, num_rows)
    state = builder.start(ctx)
    for p in range(builder.passes):
        for start, responses in chunks_fn(p):
            state = builder.add(ctx, state, p, responses, start)
        state = builder.end_pass(ctx, state, p)
    return builder.finish(ctx, state, ids, info)


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


@dataclasses.dataclass(frozen=True)
class CurvatureBasis:
    """Coefficients in the top-``rank`` eigendirections of a LowRank curvature.

    Only for :func:`jaxattr.simulate` with a :class:`jaxattr.LowRank` (or
    :class:`jaxattr.Eigenbasis`) curvature. There the response's coordinate
    along eigenvector ``v_i`` is ``-phi_K(s_i) <v_i, grad loss_b>``, so each
    example costs one projection of its gradient and the dense response is
    never formed; the part of the response outside the basis is dropped. The
    query side costs ``rank`` readouts along the eigenvectors.

    Attributes:
      rank: eigendirections kept, largest eigenvalues first (``None``: all).
    """

    rank: int | None = None
    passes = 1

    def __post_init__(self):
        if self.rank is not None:
            _checks.positive_int("rank", self.rank)

    def context(self, params, num_rows):
        raise TypeError(
            "CurvatureBasis is computed by jaxattr.simulate with a LowRank or "
            "Eigenbasis curvature; it cannot re-encode stored responses. Use "
            "InBasis(jaxattr.eigenbasis(...).vectors) with compress instead."
        )


@dataclasses.dataclass(frozen=True)
class _Coefficients:
    """Collects coefficient rows computed by simulate into a FactoredSketch."""

    vectors: Any
    label: str
    passes = 1

    def context(self, params, num_rows):
        return ravel_pytree(params)[1]

    def start(self, ctx):
        return BuildState({}, [])

    def add(self, ctx, state, pass_index, rows, start):
        return BuildState(state.acc, state.parts + [rows])

    def end_pass(self, ctx, state, pass_index):
        return state

    def finish(self, ctx, state, ids, info):
        stored = jax.vmap(ctx)(self.vectors)
        info = _with(info, sketch=self.label, dim=int(self.vectors.shape[0]))
        coef = jnp.concatenate(state.parts)
        return FactoredSketch(coef, stored, jnp.asarray(ids), info)
