"""Readouts: directional derivatives of a measurement along a parameter response.

Every readout answers one question: given ``f(params) -> (num_queries,)`` and a
direction ``r`` in parameter space, what is ``d/dt f(params + t r)`` at 0? The
two difference readouts only ever call ``f``, so they work for models that
cannot be differentiated (exported, quantised, or behind ``jax.pure_callback``).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxattr import _tree
from jaxattr._types import Array, Params


def _step(rel: float | None, order: int, params: Params, r: Params) -> tuple:
    """Scale-aware step ``h`` such that ``||h r|| = rel * max(||params||, 1)``.

    Returns ``(h, nonzero)``; ``nonzero`` is False for an all-zero direction.
    """
    dtype = jnp.result_type(*jax.tree.leaves(params))
    eps = jnp.finfo(dtype).eps
    if rel is None:
        rel = eps ** (1.0 / 3.0) if order == 2 else eps**0.5
    scale = jnp.maximum(jnp.sqrt(_tree.sq_norm(params)), 1.0)
    r_norm = jnp.sqrt(_tree.sq_norm(r))
    nonzero = r_norm > 0
    h = rel * scale / jnp.where(nonzero, r_norm, 1.0)
    return h.astype(dtype), nonzero


def _shift(params: Params, r: Params, t) -> Params:
    return jax.tree.map(lambda p, d: p + (t * d).astype(p.dtype), params, r)


@dataclasses.dataclass(frozen=True)
class JVP:
    """Exact directional derivative by forward-mode autodiff (``jax.jvp``)."""

    name = "jvp"

    def __call__(
        self,
        f: Callable[[Params], Array],
        params: Params,
        r: Params,
        base: Array | None = None,
    ) -> Array:
        del base
        return jax.jvp(f, (params,), (r,))[1]


@dataclasses.dataclass(frozen=True)
class CentralDifference:
    """Two-sided difference ``[f(p + h r) - f(p - h r)] / 2h``; error ``O(h^2)``.

    Attributes:
      rel_step: size of the shift ``h r`` relative to ``max(||params||, 1)``;
        ``None`` picks ``eps^(1/3)`` of the parameter dtype (about 5e-3 in
        float32, 6e-6 in float64), which balances truncation and rounding.
    """

    rel_step: float | None = None
    name = "central_difference"

    def __call__(self, f, params, r, base=None):
        del base
        h, nonzero = _step(self.rel_step, 2, params, r)
        diff = (f(_shift(params, r, h)) - f(_shift(params, r, -h))) / (2 * h)
        return jnp.where(nonzero, diff, jnp.zeros_like(diff))


@dataclasses.dataclass(frozen=True)
class ForwardDifference:
    """One-sided difference ``[f(p + h r) - f(p)] / h``; error ``O(h)``.

    Costs one forward evaluation per direction when ``f(p)`` is shared.

    Attributes:
      rel_step: as for :class:`CentralDifference`; ``None`` picks ``sqrt(eps)``
        of the parameter dtype (about 3e-4 in float32).
    """

    rel_step: float | None = None
    name = "forward_difference"

    def __call__(self, f, params, r, base=None):
        h, nonzero = _step(self.rel_step, 1, params, r)
        base = f(params) if base is None else base
        diff = (f(_shift(params, r, h)) - base) / h
        return jnp.where(nonzero, diff, jnp.zeros_like(diff))


Readout = JVP | CentralDifference | ForwardDifference
