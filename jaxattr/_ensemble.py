"""Scores combined over several scorers, e.g. checkpoints of one training run."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _checks, _tree
from jaxattr._scoring import Scorer, TopK
from jaxattr._types import Array, Batch


class Ensemble:
    """A weighted sum of scorers over the same training examples.

    Typical use: sketches simulated at several checkpoints of *one* training
    run, each read with its own parameters. Early checkpoints see examples the
    final model has memorised (mislabeled ones in particular), so their
    self-influence separates noisy labels better than the final model alone.

    Scores are ``sum_j weights[j] * scorers[j](queries)``; the weights default
    to ``1 / len(scorers)``.
    """

    def __init__(
        self, scorers: Sequence[Scorer], weights: Sequence[float] | None = None
    ):
        scorers = list(scorers)
        if not scorers or not all(isinstance(s, Scorer) for s in scorers):
            raise TypeError(
                "Ensemble needs a non-empty list of jaxattr.Scorer objects, got "
                f"{[type(s).__name__ for s in scorers]}."
            )
        ids = np.asarray(scorers[0].sketch.ids)
        for j, s in enumerate(scorers[1:], start=1):
            if not np.array_equal(np.asarray(s.sketch.ids), ids):
                raise ValueError(
                    f"Scorer {j} covers other training ids than scorer 0; an "
                    "ensemble needs sketches of the same examples in the same order."
                )
        if weights is None:
            weights = [1.0 / len(scorers)] * len(scorers)
        if len(weights) != len(scorers):
            raise ValueError(
                f"Got {len(weights)} weights for {len(scorers)} scorers; give one each."
            )
        self.scorers = scorers
        self.weights = [float(w) for w in weights]
        self.ids = jnp.asarray(ids)

    def __call__(self, queries: Batch) -> Array:
        """``(num_queries, num_train)`` combined scores."""
        return sum(
            w * s(queries) for w, s in zip(self.weights, self.scorers, strict=True)
        )

    def top_k(self, queries: Batch, k: int = 10, query_chunk: int = 64) -> TopK:
        """Top-``k`` proponents and opponents of the combined scores."""
        k = _checks.positive_int("k", k)
        n, c = len(self.ids), _checks.positive_int("query_chunk", query_chunk)
        if k > n:
            raise ValueError(f"k={k} exceeds the {n} training examples; use k <= {n}.")
        parts = []
        for start in range(0, _tree.leading_size(queries), c):
            stop = min(start + c, _tree.leading_size(queries))
            scores = self(_tree.slice_rows(queries, start, stop))
            parts.append((jax.lax.top_k(scores, k), jax.lax.top_k(-scores, k)))
        (hi, hi_i), (lo, lo_i) = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
        return TopK(self.ids[hi_i], hi, self.ids[lo_i], -lo)

    def self_influence(self, train_data: Batch) -> Array:
        """``(num_train,)`` combined self-influence."""
        return sum(
            w * s.self_influence(train_data)
            for w, s in zip(self.weights, self.scorers, strict=True)
        )
