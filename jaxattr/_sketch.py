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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseSketch:
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
    def num_train(self) -> int:
        return int(np.shape(self.ids)[0])

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

    def bytes_per_example(self) -> int:
        return sum(
            int(np.prod(a.shape[1:])) * a.dtype.itemsize
            for a in jax.tree.leaves(self.responses)
        )

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
