"""Baselines for attribution, with the interface of jaxattr's own scorer.

Every builder returns a :class:`FeatureScorer`: ``scorer(queries)`` gives
``(num_queries, num_train)`` scores, ``scorer.top_k(queries, k)`` a
:class:`jaxattr.TopK` and ``scorer.self_influence(train_data)`` a
``(num_train,)`` vector. Scores follow jaxattr's sign convention: positive when
upweighting the training example pushes the query's measurement up.

* :func:`trak`: TRAK over an ensemble, projected or not, with damping.
* :func:`grad_dot` and :func:`tracin`: gradient dot products.
* :func:`influence_explicit` and :func:`influence_cg`: damped influence
  functions by an explicit inverse or by conjugate gradient.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxattr
  >>> from jaxattr import baselines
  >>> task = jaxattr.classification(lambda w, x: x @ w)
  >>> w = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
  >>> x = jax.random.normal(jax.random.PRNGKey(1), (10, 3))
  >>> y = (x[:, 0] > 0).astype(jnp.int32)
  >>> scorer = baselines.grad_dot(task, w, (x, y))
  >>> scorer((x[:2], y[:2])).shape
  (2, 10)
"""

from jaxattr.baselines._common import FeatureScorer
from jaxattr.baselines._gradients import grad_dot, tracin
from jaxattr.baselines._influence import (
    ggn_matrix,
    hessian_matrix,
    influence_cg,
    influence_explicit,
)
from jaxattr.baselines._trak import project_streaming, projection_matrix, trak

__all__ = [
    "FeatureScorer",
    "ggn_matrix",
    "grad_dot",
    "hessian_matrix",
    "influence_cg",
    "influence_explicit",
    "project_streaming",
    "projection_matrix",
    "tracin",
    "trak",
]
