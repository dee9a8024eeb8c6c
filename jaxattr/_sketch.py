"""Parameter sketches: the per-example responses that scorers read."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _tree
from jaxattr._types import Array, Params
from jaxattr._version import __version__


@dataclasses.dataclass(frozen=True)
class SketchInfo:
    """Static metadata a sketch carries to refuse misuse.

    Attributes:
      param_spec: ``((path, shape, dtype), ...)`` of the parameter tree the
        responses were computed for.
      measurement: name of the measurement the sketch is tied to, or ``None`` when
        it may be read with any measurement.
      method: how the responses were made, e.g. ``"posthoc"``, ``"in_training"``.
      settings: sorted ``(name, value)`` pairs of the hyperparameters used.
      version: jaxattr version that made the sketch.
    """

    param_spec: tuple
    measurement: str | None
    method: str
    settings: tuple = ()
    version: str = __version__


class _SketchBase:
    """Behaviour shared by every sketch: size, ids and the parameter check."""

    @property
    def num_train(self) -> int:
        """Rows of the sketch: training examples, or sources when grouped."""
        return int(np.shape(self.ids)[0])

    def check_params(self, params: Params) -> None:
        """Raises ValueError unless ``params`` match the sketch's parameter tree."""
        problem = _tree.spec_mismatch(self.info.param_spec, _tree.param_spec(params))
        if problem is not None:
            raise ValueError(
                "The parameters do not match the sketch: "
                f"{problem}. Score with the same model the sketch was simulated for "
                f"(sketch made by jaxattr {self.info.version}, method "
                f"{self.info.method!r})."
            )

    def bytes_per_example(self) -> int:
        """Bytes stored per row (the basis of a factored sketch not counted)."""
        return sum(
            int(np.prod(a.shape[1:])) * a.dtype.itemsize
            for a in jax.tree.leaves(self.rows)
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseSketch(_SketchBase):
    """Per-example parameter responses ``r_b ~= d theta / d eps_b``, stored densely.

    ``responses`` has the structure of the model parameters with a leading
    ``num_train`` axis on every leaf; row ``i`` belongs to training example
    ``ids[i]``. Units: ``eps_b`` upweights example ``b`` in the mean training
    loss, ``L = mean_i loss_i + eps_b * loss_b``, so removing ``b`` moves the
    parameters by about ``-r_b / num_train``.

    Attributes:
      responses: pytree, leaves ``(num_train, *leaf_shape)``.
      ids: ``(num_train,)`` integer ids of the training examples.
      info: :class:`SketchInfo` (static).
    """

    responses: Params
    ids: Array
    info: SketchInfo = dataclasses.field(metadata=dict(static=True))

    @property
    def rows(self) -> Params:
        """What scorers stream over: one stored row per training example."""
        return self.responses

    @staticmethod
    def decode_row(row: Params, like: Params) -> Params:
        """The parameter-shaped response of one stored row."""
        del like
        return row

    @property
    def dtype(self):
        return jax.tree.leaves(self.responses)[0].dtype

    def astype(self, dtype: Any) -> "DenseSketch":
        """The same sketch with responses stored in ``dtype`` (e.g. ``jnp.bfloat16``).

        Scorers compute in the parameters' dtype whatever the storage dtype;
        bfloat16 halves the bytes and keeps about three significant digits.
        """
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"Sketch storage dtype must be floating, got {dtype}.")
        responses = jax.tree.map(lambda a: a.astype(dtype), self.responses)
        return dataclasses.replace(self, responses=responses)


def check_ids(ids: Any, num_train: int | None = None, what: str = "ids") -> np.ndarray:
    """Validates concrete example ids: 1-D integers, unique, in range if given."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{what} must be a 1-D array of integers, got dtype {arr.dtype} and shape "
            f"{arr.shape}."
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"{what} must be unique; duplicated: {uniq[counts > 1][:5].tolist()}. "
            "Each training example needs one stable id."
        )
    if num_train is not None:
        bad = arr[(arr < 0) | (arr >= num_train)]
        if bad.size:
            raise ValueError(
                f"{what} must lie in [0, num_train={num_train}); "
                f"got {bad[:5].tolist()}. "
                "Use ids 0..num_train-1, or raise num_train."
            )
    elif (arr < 0).any():
        raise ValueError(
            f"{what} must be non-negative, got {arr[arr < 0][:5].tolist()}."
        )
    return arr


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerLowRankSketch(_SketchBase):
    """Responses with every weight matrix stored as a rank-``r`` factorisation.

    A 2-D leaf ``W`` of each response is kept as ``U @ V.T`` with ``U (a, r)``
    and ``V (b, r)`` (the best rank-``r`` approximation, by SVD); other leaves
    are kept whole. Bytes per example drop from ``a * b`` to ``r * (a + b)``.

    Attributes:
      factors: one entry per parameter leaf, in leaf order: ``(U, V)`` with
        leading ``num_train`` axes for matrices, the dense rows otherwise.
      ids: ``(num_train,)`` ids.
      info: :class:`SketchInfo` (static).
    """

    factors: list
    ids: Array
    info: SketchInfo = dataclasses.field(metadata=dict(static=True))

    @property
    def rows(self) -> list:
        return self.factors

    @staticmethod
    def decode_row(row: list, like: Params) -> Params:
        """The parameter-shaped response of one stored row."""
        leaves = [f[0] @ f[1].T if isinstance(f, tuple) else f for f in row]
        return jax.tree.unflatten(jax.tree.structure(like), leaves)


@dataclasses.dataclass(frozen=True)
class RandomBasis:
    """Random directions generated from a key, never stored.

    Direction ``i`` has independent entries ``+-1/sqrt(dim)`` drawn from
    ``fold_in(key, i)``, so ``sum_i <d_i, u> <d_i, v>`` is an unbiased
    estimate of ``<u, v>``.

    Attributes:
      key_data: raw data of the ``jax.random`` key (hashable, storable).
      dim: number of directions ``k``.
    """

    key_data: tuple
    dim: int

    def directions(self, like: Params, start: Array, size: int) -> Params:
        """Directions ``start .. start+size-1``, leaves ``(size, *leaf_shape)``."""
        key = jax.random.wrap_key_data(jnp.asarray(self.key_data, jnp.uint32))
        leaves, treedef = jax.tree.flatten(like)
        scale = 1.0 / np.sqrt(self.dim)

        def one(i):
            keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
            return [
                jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x)) * scale
                for k, x in zip(keys, leaves, strict=True)
            ]

        out = jax.vmap(one)(start + jnp.arange(size))
        return jax.tree.unflatten(treedef, out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredSketch(_SketchBase):
    """Responses as coefficients in a shared basis: ``r_b ~= sum_i c_bi d_i``.

    The score of a query is ``sum_i c_bi * D_i m(q)``, with ``D_i m(q)`` the
    derivative of the measurement along direction ``d_i``: ``dim`` forward-mode
    derivatives (or ``2 * dim`` forward evaluations) per query, whatever the
    number of training examples. The basis is either a :class:`RandomBasis`
    (generated from a key) or stored directions (a data-adaptive basis).

    Attributes:
      coefficients: ``(num_train, dim)``.
      stored: stored directions, leaves ``(dim, *leaf_shape)``, or ``None``.
      ids: ``(num_train,)`` ids.
      info: :class:`SketchInfo` (static).
      random: the :class:`RandomBasis` when ``stored`` is ``None`` (static).
    """

    coefficients: Array
    stored: Any
    ids: Array
    info: SketchInfo = dataclasses.field(metadata=dict(static=True))
    random: RandomBasis | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )

    @property
    def rows(self) -> Array:
        return self.coefficients

    @property
    def dim(self) -> int:
        return int(self.coefficients.shape[1])

    def directions(self, like: Params, start: Array, size: int) -> Params:
        """Basis directions ``start .. start+size-1`` (leading axis ``size``)."""
        if self.stored is None:
            return self.random.directions(like, start, size)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)
        return jax.tree.map(take, self.stored)

    def decode_row(self, row: Array, like: Params) -> Params:
        """The parameter-shaped response ``sum_i c_i d_i`` of one row."""
        dirs = self.directions(like, jnp.asarray(0), self.dim)
        return jax.tree.map(lambda d: jnp.tensordot(row.astype(d.dtype), d, 1), dirs)
