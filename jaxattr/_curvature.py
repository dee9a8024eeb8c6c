"""Gauss-Newton curvature on minibatches, as matrix-free operators."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxattr import _tree
from jaxattr._types import Array, Batch, Example, Params


@dataclasses.dataclass(frozen=True)
class GaussNewton:
    """Generalized Gauss-Newton curvature ``G = mean_i J_i^T H_i J_i``.

    ``J_i`` is the Jacobian of ``outputs(params, z_i)`` in the parameters and
    ``H_i`` the Hessian of ``output_loss(outputs, z_i)`` in the outputs. Products
    ``G v`` cost one linearisation of the minibatch (shared by every vector) plus
    one forward-mode and one reverse-mode product per vector.

    Attributes:
      outputs: ``outputs(params, example) -> array`` for one example.
      output_loss: ``output_loss(outputs, example) -> scalar``.
      batch_size: examples per curvature minibatch; ``None`` uses the whole
        training set every step (noise-free, slower).
      resample: draw a fresh minibatch for every step of a recursion (``True``)
        or one fixed minibatch for all steps (``False``).
      name: short label recorded in sketch metadata.
    """

    outputs: Callable[[Params, Example], Array]
    output_loss: Callable[[Array, Example], Array]
    batch_size: int | None = 64
    resample: bool = True
    name: str = "ggn"

    def __post_init__(self):
        b = self.batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(
                f"curvature batch_size must be a positive int or None (whole data), "
                f"got {b!r}."
            )

    def operator(self, params: Params, batch: Batch) -> Callable[[Params], Params]:
        """Returns ``v -> G v`` for the curvature of ``batch`` at ``params``."""
        n = _tree.leading_size(batch)
        f = lambda p: jax.vmap(self.outputs, (None, 0))(p, batch)
        out, jvp_fn = jax.linearize(f, params)
        vjp_fn = jax.linear_transpose(jvp_fn, params)

        def out_hvp(o, example, u):
            grad_fn = lambda o_: jax.grad(self.output_loss)(o_, example)
            return jax.jvp(grad_fn, (o,), (u,))[1]

        def matvec(v):
            u = jvp_fn(v)
            hu = jax.vmap(out_hvp)(out, batch, u)
            return vjp_fn(jax.tree.map(lambda a: a / n, hu))[0]

        return matvec

    def sample(self, data: Batch, num_data: int, key: Array, step: Array) -> Batch:
        """The curvature minibatch for recursion step ``step``."""
        if self.batch_size is None or self.batch_size >= num_data:
            return data
        step_key = jax.random.fold_in(key, step) if self.resample else key
        idx = jax.random.choice(step_key, num_data, (self.batch_size,), replace=False)
        return _tree.take(data, idx)


def top_eigenvalue(
    matvec: Callable[[Params], Params], like: Params, key: Array, num_iters: int = 30
) -> Array:
    """Largest eigenvalue of a symmetric PSD operator by power iteration."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=False)
        ],
    )

    def body(_, carry):
        v, _ = carry
        v = _tree.scale(1.0 / jnp.sqrt(_tree.sq_norm(v) + 1e-30), v)
        gv = matvec(v)
        return gv, _tree.dot(v, gv)

    _, lam = jax.lax.fori_loop(
        0, num_iters, body, (v, jnp.zeros((), jnp.result_type(leaves[0])))
    )
    return lam
