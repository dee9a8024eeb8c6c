"""Training many models on weighted subsets at once, as pure vmapped functions.

A model is described by per-example weights ``w`` ``(num_train,)`` and a key.
The key is split into ``(init, order, dropout)``: ``init_fn(init)`` gives the
starting parameters, epoch ``e`` visits the examples in the order
``jax.random.permutation(fold_in(order, e), num_train)`` and step ``s`` of epoch
``e`` draws dropout from ``fold_in(fold_in(dropout, e), s)``. All models of one call
share the number of steps, so they can be vmapped and compiled once.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxattr import _tree
from jaxattr._task import classification
from jaxattr._types import Array, Batch, Params
from jaxattr.evaluate._setup import TrainSetup


def epoch_batches(
    setup: TrainSetup, weights: Array, key: Array, num_steps: int
) -> tuple[Array, Array]:
    """Row indices and weights of one epoch's minibatches, ``(num_steps, batch)``.

    Slots past the data (or past the members, in compact batching) get weight 0.
    """
    n = weights.shape[0]
    perm = jax.random.permutation(key, n)
    if setup.batching == "compact":
        perm = perm[jnp.argsort(weights[perm] == 0, stable=True)]
    size = num_steps * setup.batch_size
    idx = jnp.zeros((max(size, n),), perm.dtype).at[:n].set(perm)[:size]
    w = jnp.zeros((max(size, n),), weights.dtype).at[:n].set(weights[perm])[:size]
    shape = (num_steps, setup.batch_size)
    return idx.reshape(shape), w.reshape(shape)


def _weighted_loss(setup, params, batch, w, key):
    logits = setup.logits(params, batch[0], key)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
    total = jnp.sum(w)
    return jnp.sum(w * losses) / jnp.where(total > 0, total, 1)


def _step(setup, data, may_skip, carry, inputs):
    params, opt_state = carry
    idx, w, key = inputs
    batch = _tree.take(data, idx)
    grads = jax.grad(_weighted_loss, argnums=1)(setup, params, batch, w, key)
    updates, new_state = setup.optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if not may_skip:
        return (new_params, new_state), None

    active = jnp.sum(w) > 0
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
    return (keep(new_params, params), keep(new_state, opt_state)), None


def train_weighted(
    setup: TrainSetup,
    data: Batch,
    weights: Array,
    key: Array,
    num_steps: int,
    may_skip: bool = True,
) -> Params:
    """Trains one model; pure and traceable, so it can be vmapped over models.

    Args:
      setup: the training configuration.
      data: ``(x (num_train, ...), y (num_train,))``.
      weights: ``(num_train,)`` per-example loss weights.
      key: the model's key (init, data order, dropout).
      num_steps: minibatches per epoch (static).
      may_skip: whether a minibatch may have zero total weight (static). If
        False the check that leaves such a step out is not compiled (it costs a
        select over the parameters and optimizer state every step).

    Returns:
      The trained parameters.
    """
    init_key, order_key, drop_key = jax.random.split(key, 3)
    params = setup.init_fn(init_key)
    carry = (params, setup.optimizer.init(params))
    step = functools.partial(_step, setup, data, may_skip)

    def epoch(carry, e):
        idx, w = epoch_batches(
            setup, weights, jax.random.fold_in(order_key, e), num_steps
        )
        epoch_key = jax.random.fold_in(drop_key, e)
        keys = jax.vmap(lambda s: jax.random.fold_in(epoch_key, s))(
            jnp.arange(num_steps)
        )
        return jax.lax.scan(step, carry, (idx, w, keys))[0], None

    carry, _ = jax.lax.scan(epoch, carry, jnp.arange(setup.epochs))
    return carry[0]


def measure(setup: TrainSetup, params: Params, queries: Batch) -> tuple[Array, Array]:
    """Margins and negative cross-entropies ``(num_queries,)`` of the queries."""
    task = classification(setup.apply_fn)
    margin = jax.vmap(task.margin, (None, 0))(params, queries)
    neg_loss = jax.vmap(task.neg_loss, (None, 0))(params, queries)
    return margin, neg_loss


_STATIC = ("setup", "num_steps", "may_skip")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _train_chunk(data, weights, keys, *, setup, num_steps, may_skip):
    fn = lambda w, k: train_weighted(setup, data, w, k, num_steps, may_skip)
    return jax.vmap(fn)(weights, keys)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _measure_chunk(data, queries, weights, keys, *, setup, num_steps, may_skip):
    def one(w, k):
        params = train_weighted(setup, data, w, k, num_steps, may_skip)
        return measure(setup, params, queries)

    return jax.vmap(one)(weights, keys)


def schedule(setup: TrainSetup, weights: np.ndarray) -> dict:
    """Static loop sizes shared by every model with these weights.

    Returns:
      ``dict(num_steps=..., may_skip=...)``: minibatches per epoch, and whether
      some minibatch of some model can have zero total weight.
    """
    n = weights.shape[-1]
    members = np.sum(weights > 0, axis=-1)
    if setup.batching == "fixed":
        steps = setup.steps_per_epoch(n)
        smallest = n - (steps - 1) * setup.batch_size
        return dict(num_steps=steps, may_skip=bool(np.max(n - members) >= smallest))
    steps = max(setup.steps_per_epoch(int(np.max(members))), 1)
    short = np.any(-(-members // setup.batch_size) < steps)
    return dict(num_steps=steps, may_skip=bool(short))


def chunks(num: int, size: int):
    """Yields ``(rows, real)``: ``size`` row indices (padded by repeating) per chunk."""
    for start in range(0, num, size):
        real = min(size, num - start)
        rows = np.arange(start, start + size)
        yield np.where(rows < start + real, rows, start), real


def model_sharding(size: int) -> NamedSharding | None:
    """Splits a chunk of ``size`` models over the local devices, if there are several.

    On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (set before
    jax starts) gives one device per core; each device then trains its share of
    the chunk on its own thread. Returns None for one device, or when ``size``
    is not a multiple of the device count.
    """
    devices = jax.local_devices()
    if len(devices) == 1 or size % len(devices):
        return None
    return NamedSharding(Mesh(np.array(devices), ("models",)), PartitionSpec("models"))


def run_models(fn, weights: np.ndarray, keys: Array, size: int, progress) -> Any:
    """Applies a jitted chunk function to all models, ``size`` models per call.

    Every call sees the same shapes (the last chunk is padded), so it compiles once.
    The models of a chunk are split over the local devices (see
    :func:`model_sharding`).
    """
    outs, sharding = [], model_sharding(size)
    place = (
        (lambda a: a) if sharding is None else (lambda a: jax.device_put(a, sharding))
    )
    for rows, real in progress(chunks(len(weights), size)):
        out = fn(place(jnp.asarray(weights[rows])), place(keys[rows]))
        outs.append(jax.tree.map(lambda a, r=real: np.asarray(a[:r]), out))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)
