"""Ground truth for attribution: retraining on subsets, LDS, leave-one-out, AUC.

Retraining runs as vmapped models inside ``jit``; a subset is a vector of 0/1
per-example loss weights, so every model has the same shapes. Results can be
cached on disk, keyed by a hash of the whole configuration.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from jaxattr import evaluate
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (40, 3))
  >>> y = (x[:, 0] > 0).astype(jnp.int32)
  >>> setup = evaluate.TrainSetup(
  ...     init_fn=lambda key: jnp.zeros((3, 2)),
  ...     apply_fn=lambda w, x: x @ w,
  ...     optimizer=optax.sgd(0.5),
  ...     epochs=3,
  ...     batch_size=8,
  ...     description="linear 3-2; sgd .5",
  ... )
  >>> subsets = evaluate.random_subsets(jax.random.PRNGKey(1), 6, 40)
  >>> m = evaluate.retrain(setup, (x, y), (x[:4], y[:4]), subsets,
  ...                      jax.random.PRNGKey(2), num_seeds=2)
  >>> m.margin.shape
  (6, 2, 4)
"""

from jaxattr.evaluate._metrics import Correlation, auc, lds, loo, rankdata
from jaxattr.evaluate._retrain import (
    Measurements,
    retrain,
    train_model,
    train_models,
    unstack,
)
from jaxattr.evaluate._setup import TrainSetup
from jaxattr.evaluate._subsets import flip_labels, loo_weights, random_subsets

__all__ = [
    "Correlation",
    "Measurements",
    "TrainSetup",
    "auc",
    "flip_labels",
    "lds",
    "loo",
    "loo_weights",
    "rankdata",
    "random_subsets",
    "retrain",
    "train_model",
    "train_models",
    "unstack",
]
