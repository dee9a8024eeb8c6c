"""Ground truth by retraining: public entry points, argument checks and caching."""

import dataclasses
import functools
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _checks, _tree
from jaxattr._progress import progress as _progress
from jaxattr._types import Array, ArrayLike, Batch, Params
from jaxattr.evaluate import _cache, _train
from jaxattr.evaluate._setup import TrainSetup, fingerprint

Target = Literal["margin", "neg_loss"]
TARGETS = ("margin", "neg_loss")


@dataclasses.dataclass(frozen=True)
class Measurements:
    """Query measurements of retrained models.

    Attributes:
      margin: ``(num_subsets, num_seeds, num_queries)`` margins
        ``logit_y - logsumexp(other logits)``.
      neg_loss: ``(num_subsets, num_seeds, num_queries)`` negative
        cross-entropies.
    """

    margin: np.ndarray
    neg_loss: np.ndarray

    def target(self, name: Target) -> np.ndarray:
        """The measurements of target ``"margin"`` or ``"neg_loss"``.

        Returns:
          ``(num_subsets, num_seeds, num_queries)``.

        Raises:
          ValueError: an unknown target name.
        """
        if name not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {name!r}.")
        return getattr(self, name)


def _check_setup(setup: Any) -> TrainSetup:
    if not isinstance(setup, TrainSetup):
        raise TypeError(
            f"setup must be a jaxattr.evaluate.TrainSetup, got {type(setup).__name__}."
        )
    return setup


def _check_data(name: str, data: Any) -> tuple[Array, Array]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            f"{name} must be a pair (x, y) of arrays with a shared leading axis, "
            f"got {type(data).__name__}."
        )
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    _tree.leading_size((x, y))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name}[0] must hold floating-point inputs, got {x.dtype}. Normalise "
            "the inputs first, e.g. (x / 255.0 - mean) / std as float32."
        )
    if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim != 1:
        raise ValueError(
            f"{name}[1] must be integer class labels of shape (n,), got dtype "
            f"{y.dtype} and shape {y.shape}. Cast labels with .astype(int)."
        )
    return x, y.astype(jnp.int32)


def _check_weights(weights: Any, num_train: int) -> np.ndarray:
    w = np.asarray(weights)
    if w.dtype == bool:
        w = w.astype(np.float32)
    if w.ndim != 2 or w.shape[1] != num_train or w.shape[0] == 0:
        raise ValueError(
            f"weights must have shape (num_subsets, num_train={num_train}), got "
            f"{w.shape}. Build them with random_subsets or loo_weights."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0 (use 0/1 for subsets).")
    return w


def _model_keys(key: Array, num_subsets: int, num_seeds: int) -> Array:
    seeds = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_seeds))
    return jnp.tile(seeds, (num_subsets,) + (1,) * (seeds.ndim - 1))


_train_one = jax.jit(_train.train_weighted, static_argnums=(0, 4, 5))


def train_model(
    setup: TrainSetup, train_data: Batch, key: Array, weights: ArrayLike | None = None
) -> Params:
    """Trains one model, the reference that :func:`retrain` vmaps.

    Args:
      setup: a :class:`TrainSetup`.
      train_data: ``(x (num_train, ...), y (num_train,))`` with integer labels.
      key: fixes the initialisation, the data order and any dropout.
      weights: ``(num_train,)`` per-example loss weights; all ones by default.

    Returns:
      The trained parameters.

    Raises:
      TypeError, ValueError: malformed setup, data or weights.
    """
    data = _check_data("train_data", train_data)
    n = data[1].shape[0]
    w = _check_weights(np.ones((1, n)) if weights is None else [weights], n)
    sizes = _train.schedule(_check_setup(setup), w)
    w = jnp.asarray(w[0], data[0].dtype)
    return _train_one(setup, data, w, key, sizes["num_steps"], sizes["may_skip"])


def train_models(
    setup: TrainSetup,
    train_data: Batch,
    weights: ArrayLike,
    keys: Array,
    *,
    models_per_chunk: int = 16,
    progress: bool = False,
) -> Params:
    """Trains one model per row of ``weights``, vmapped ``models_per_chunk`` at a time.

    Args:
      setup: a :class:`TrainSetup`.
      train_data: ``(x (num_train, ...), y (num_train,))``.
      weights: ``(num_models, num_train)`` per-example loss weights.
      keys: ``(num_models,)`` keys, one per model.
      models_per_chunk: models trained by one compiled call; bounds memory.
        Split over the local devices as in :func:`retrain`.
      progress: draw a progress bar on stderr.

    Returns:
      The parameters stacked on a leading ``num_models`` axis (numpy leaves).
      :func:`unstack` turns them into a list.
    """
    data = _check_data("train_data", train_data)
    w = _check_weights(weights, data[1].shape[0]).astype(data[0].dtype)
    if jnp.shape(keys)[0] != len(w):
        raise ValueError(
            f"Got {len(w)} rows of weights but {jnp.shape(keys)[0]} keys; pass one "
            "key per model, e.g. jax.random.split(key, num_models)."
        )
    size = _checks.positive_int("models_per_chunk", models_per_chunk)
    sizes = _train.schedule(_check_setup(setup), w)
    fn = functools.partial(_train._train_chunk, data, setup=setup, **sizes)
    bar = lambda it: _progress(it, -(-len(w) // size), "train", progress)
    return _train.run_models(fn, w, keys, size, bar)


def unstack(stacked: Params) -> list:
    """Splits parameters stacked on a leading axis into a list of pytrees.

    Args:
      stacked: pytree whose leaves share a leading ``num_models`` axis, as
        returned by :func:`train_models`.

    Returns:
      A list of ``num_models`` parameter pytrees, e.g. for
      ``jaxattr.baselines.trak``.
    """
    num = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda a, m=m: a[m], stacked) for m in range(num)]


def retrain(
    setup: TrainSetup,
    train_data: Batch,
    queries: Batch,
    weights: ArrayLike,
    key: Array,
    *,
    num_seeds: int = 1,
    models_per_chunk: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Measurements:
    """Retrains on every weighted subset with several seeds and measures the queries.

    Model ``(s, j)`` trains with ``weights[s]`` and key ``fold_in(key, j)``: seed
    ``j`` fixes the initialisation and the data order and is shared by every
    subset, so differences between subsets are not confounded by the seed
    (with ``num_seeds=1`` and :func:`loo_weights` this is leave-one-out with a
    fixed seed and data order). See :class:`TrainSetup` for how weights enter
    the minibatch loss.

    Args:
      setup: a :class:`TrainSetup`.
      train_data: ``(x (num_train, ...), y (num_train,))`` with integer labels.
      queries: ``(x (num_queries, ...), y (num_queries,))``.
      weights: ``(num_subsets, num_train)`` loss weights, 0/1 for subsets.
      key: ``jax.random`` key of the seeds.
      num_seeds: models per subset.
      models_per_chunk: models trained by one vmapped, compiled call. When it
        is a multiple of the number of local devices, each chunk is split over
        them; on a CPU, start jax with
        ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`` to train
        on every core (XLA's own threading gains little on these models).
      cache_dir: if given, results are stored in and loaded from this folder,
        keyed by a hash of the data, weights, key, seeds and a fingerprint of
        ``setup`` (its description, initial parameters, logits and optimizer
        updates on probes, epochs, batch size and batching).
      progress: draw a progress bar on stderr.

    Returns:
      :class:`Measurements`, arrays ``(num_subsets, num_seeds, num_queries)``.

    Raises:
      TypeError, ValueError: malformed setup, data, weights or sizes.
    """
    setup = _check_setup(setup)
    data = _check_data("train_data", train_data)
    qs = _check_data("queries", queries)
    w = _check_weights(weights, data[1].shape[0]).astype(data[0].dtype)
    seeds = _checks.positive_int("num_seeds", num_seeds)
    size = _checks.positive_int("models_per_chunk", models_per_chunk)
    compute = lambda: _measure_all(setup, data, qs, w, key, seeds, size, progress)
    if cache_dir is None:
        return Measurements(**compute())
    name = "retrain-" + _cache.digest(_config(setup, data, qs, w, key, seeds))
    return Measurements(**_cache.load_or_compute(cache_dir, name, compute))


def _measure_all(setup, data, queries, w, key, num_seeds, size, progress):
    keys = _model_keys(key, len(w), num_seeds)
    rows = np.repeat(w, num_seeds, axis=0)
    sizes = _train.schedule(setup, w)
    fn = functools.partial(_train._measure_chunk, data, queries, setup=setup, **sizes)
    bar = lambda it: _progress(it, -(-len(rows) // size), "retrain", progress)
    margin, neg_loss = _train.run_models(fn, rows, keys, size, bar)
    shape = (len(w), num_seeds, -1)
    return dict(margin=margin.reshape(shape), neg_loss=neg_loss.reshape(shape))


def _key_bytes(key: Array) -> np.ndarray:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def _config(setup, data, queries, w, key, num_seeds) -> tuple:
    sizes = (setup.epochs, setup.batch_size, setup.batching)
    setup_parts = (setup.description, sizes, fingerprint(setup, data[0][0]))
    has_dropout = setup.train_apply_fn is not None
    return (setup_parts, has_dropout, data, queries, w, _key_bytes(key), num_seeds)
