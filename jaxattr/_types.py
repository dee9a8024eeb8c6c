"""Type aliases shared across jaxattr.

Named dimensions used in docstrings:

* ``num_train``: training examples held by a sketch.
* ``num_queries``: query examples scored in one call.
* ``num_params``: scalar parameters of the model, summed over leaves.
"""

from typing import Any, Callable

import jax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Params = Any
"""A pytree of arrays: the model parameters."""
Example = Any
"""One example as a pytree of arrays, e.g. ``(x, y)`` without a batch axis."""
Batch = Any
"""Examples stacked along a leading axis, e.g. ``(x[n, ...], y[n])``."""
OptState = Any
"""An optax optimizer state."""
LossFn = Callable[[Params, Example], Array]
"""``loss(params, example) -> scalar`` for one example."""
MeasureFn = Callable[[Params, Example], Array]
"""``measure(params, example) -> scalar`` for one query example."""
