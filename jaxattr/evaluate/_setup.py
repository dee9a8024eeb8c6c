"""The training configuration that ground-truth retraining runs."""

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattr import _checks
from jaxattr._types import Array, Params

Batching = Literal["compact", "fixed"]
_BATCHINGS = ("compact", "fixed")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """How to train one softmax classifier from scratch, as pure functions.

    The training loss is softmax cross-entropy. One epoch visits the training
    examples in a random order; each minibatch minimises the weighted mean
    ``sum_i w_i loss_i / sum_i w_i`` over its examples, and a minibatch whose
    weights sum to 0 leaves the parameters and the optimizer state unchanged.

    ``batching`` says how examples with weight 0 are left out:

    * ``"compact"``: they are dropped from the epoch's order and the others close
      up, so a model with weights ``1[b in S]`` is trained exactly like a model
      trained on ``S`` alone, visiting ``S`` in the order that the full set's
      permutation puts it (``ceil(|S| / batch_size)`` steps per epoch).
    * ``"fixed"``: every example keeps its slot in the full set's batches, and a
      removed example only leaves a hole in its own batch. Removing one example
      then changes a single batch per epoch (a low-noise leave-one-out).

    Attributes:
      init_fn: ``init_fn(key) -> params``.
      apply_fn: ``apply_fn(params, x) -> logits`` for one input (no batch axis).
      optimizer: any ``optax.GradientTransformation``.
      epochs: passes over the training set.
      batch_size: examples per minibatch.
      description: names the architecture and optimizer hyperparameters, e.g.
        ``"mlp 784-128-64-10 relu; sgd lr .01 momentum .9"``. It is part of the
        cache key, next to a fingerprint computed from the functions' outputs.
      batching: ``"compact"`` (default) or ``"fixed"``, see above.
      train_apply_fn: optional ``train_apply_fn(params, x, key) -> logits`` used
        in training instead of ``apply_fn`` (e.g. with dropout); ``key`` is a
        fresh key per example and step. Queries are always measured with
        ``apply_fn``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> setup = TrainSetup(
      ...     init_fn=lambda key: jax.random.normal(key, (4, 3)),
      ...     apply_fn=lambda w, x: x @ w,
      ...     optimizer=optax.sgd(0.1),
      ...     epochs=2,
      ...     batch_size=8,
      ...     description="linear 4-3; sgd .1",
      ... )
      >>> setup.steps_per_epoch(20)
      3
    """

    init_fn: Callable[[Array], Params]
    apply_fn: Callable[[Params, Any], Array]
    optimizer: optax.GradientTransformation
    epochs: int
    batch_size: int
    description: str = ""
    batching: Batching = "compact"
    train_apply_fn: Callable[[Params, Any, Array], Array] | None = None

    def __post_init__(self):
        for name in ("init_fn", "apply_fn"):
            if not callable(getattr(self, name)):
                raise TypeError(f"TrainSetup.{name} must be callable, got {name!r}.")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                "TrainSetup.optimizer must be an optax.GradientTransformation such as "
                f"optax.sgd(0.01), got {type(self.optimizer).__name__}."
            )
        _checks.positive_int("TrainSetup.epochs", self.epochs)
        _checks.positive_int("TrainSetup.batch_size", self.batch_size)
        if not isinstance(self.description, str):
            raise TypeError(
                f"TrainSetup.description must be a str, got {self.description!r}."
            )
        if self.batching not in _BATCHINGS:
            raise ValueError(
                f"TrainSetup.batching must be one of {_BATCHINGS}, got "
                f"{self.batching!r}."
            )

    def steps_per_epoch(self, num_members: int) -> int:
        """Minibatches per epoch when ``num_members`` examples have weight > 0."""
        return -(-int(num_members) // self.batch_size)

    def logits(self, params: Params, x: Array, key: Array | None) -> Array:
        """Training logits of a batch ``x`` ``(batch, ...)``; ``key`` may be None."""
        if self.train_apply_fn is None or key is None:
            return jax.vmap(self.apply_fn, (None, 0))(params, x)
        keys = jax.random.split(key, x.shape[0])
        return jax.vmap(self.train_apply_fn, (None, 0, 0))(params, x, keys)


def fingerprint(setup: TrainSetup, x0: Array) -> list:
    """Arrays that identify what ``setup`` computes, for cache keys.

    They are the initial parameters from a fixed key, the logits of ``x0`` and
    three optimizer updates on fixed pseudo-gradients, so a changed
    architecture, initialiser or optimizer hyperparameter changes them even when
    ``description`` does not.
    """
    leaves = jax.tree.leaves(_probe(setup, x0))
    return [np.asarray(leaf) for leaf in leaves]


@functools.partial(jax.jit, static_argnums=0)
def _probe(setup: TrainSetup, x0: Array) -> tuple:
    params = setup.init_fn(jax.random.PRNGKey(0))
    logits = setup.apply_fn(params, x0)
    state = setup.optimizer.init(params)
    updates = []
    for i in range(3):
        fake = jax.tree.map(lambda p, i=i: jnp.cos(p + i) + 0.5, params)
        u, state = setup.optimizer.update(fake, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return params, logits, updates
