"""Tasks: how a model, its training loss and its measurements fit together."""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattr._curvature import GaussNewton
from jaxattr._types import Array, Example, Params


@dataclasses.dataclass(frozen=True)
class Task:
    """A model with its per-example training loss, split for Gauss-Newton curvature.

    The training loss of one example is ``output_loss(outputs(params, z), z)``.
    Splitting it this way lets jaxattr build Gauss-Newton curvature
    ``J^T H_out J`` (``J`` the Jacobian of ``outputs``, ``H_out`` the Hessian of
    ``output_loss`` in the outputs), which is positive semi-definite whenever
    ``output_loss`` is convex in the outputs.

    Attributes:
      outputs: ``outputs(params, example) -> array``, the model output for one
        example (no batch axis).
      output_loss: ``output_loss(outputs, example) -> scalar``.
      measurements: named query measurements ``measure(params, example) ->
        scalar``; the first is the default.
      margin_view: optional ``(margin, link_loss)`` pair with
        ``loss == link_loss(margin(params, z))``; enables the margin curvature
        (one output per example) for classification.
      check: optional ``check(params, examples, what)`` that raises a
        ``ValueError``/``TypeError`` for a batch of examples this task cannot
        take (``what`` names the batch in the message); measurements carry it
        too (``measure.check_examples``) so that scorers can check queries.
    """

    outputs: Callable[[Params, Example], Array]
    output_loss: Callable[[Array, Example], Array]
    measurements: tuple = ()
    margin_view: tuple | None = None
    check: Callable[[Params, Any, str], None] | None = None

    def check_examples(self, params: Params, examples: Any, what: str) -> None:
        """Raises a clear error if a batch of ``examples`` cannot be this task's.

        Does nothing for tasks without a ``check`` or for traced examples.
        """
        if self.check is not None:
            self.check(params, examples, what)

    def loss(self, params: Params, example: Example) -> Array:
        """Training loss of one example."""
        return self.output_loss(self.outputs(params, example), example)

    @property
    def measure(self) -> Callable[[Params, Example], Array]:
        """The default measurement (the first of ``measurements``)."""
        if not self.measurements:
            return self.neg_loss
        return self.measurements[0]

    def neg_loss(self, params: Params, example: Example) -> Array:
        """Negative training loss of one example, a measurement for any task."""
        return -self.loss(params, example)

    @property
    def margin(self) -> Callable[[Params, Example], Array]:
        """The margin measurement; only for tasks built with a margin view."""
        if self.margin_view is None:
            raise AttributeError(
                "This task has no margin; build it with jaxattr.classification(apply) "
                "or pass margin_view=(margin, link_loss) to Task."
            )
        return self.margin_view[0]

    def ggn(self, batch_size: int | None = 64, resample: bool = True) -> GaussNewton:
        """Gauss-Newton curvature of the training loss through the model outputs."""
        return GaussNewton(self.outputs, self.output_loss, batch_size, resample, "ggn")

    def margin_ggn(
        self, batch_size: int | None = 64, resample: bool = True
    ) -> GaussNewton:
        """Gauss-Newton curvature through the margin: ``mean p(1-p) grad m grad m^T``.

        One output per example, so it is cheaper than :meth:`ggn` and, with a large
        ``batch_size``, nearly noise-free.
        """
        margin = self.margin  # raises a clear AttributeError when absent
        return GaussNewton(
            margin, self.margin_view[1], batch_size, resample, "margin_ggn"
        )


def _name(fn: Callable, name: str) -> Callable:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def classification(apply: Callable[[Params, Any], Array]) -> Task:
    """A softmax classification task over examples ``(x, label)``.

    Args:
      apply: ``apply(params, x) -> logits`` for one input ``x`` (no batch axis),
        e.g. ``model.apply`` of a Flax linen module, or a function that merges an
        NNX graph with its state.

    Returns:
      A :class:`Task` whose loss is softmax cross-entropy and whose measurements
      are ``margin`` (the default) and ``neg_loss``.

    The margin of example ``(x, y)`` is ``logit_y - logsumexp(logits without y)``.
    Cross-entropy equals ``softplus(-margin)``, so the training gradient is
    ``-(1 - p_y)`` times the margin gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> task = classification(lambda w, x: x @ w)
      >>> w = jnp.eye(2)
      >>> float(task.margin(w, (jnp.array([2.0, 0.0]), 0)))
      2.0
    """

    def outputs(params, example):
        return apply(params, example[0])

    def output_loss(logits, example):
        return optax.softmax_cross_entropy_with_integer_labels(logits, example[1])

    def margin(params, example):
        return _margin_of(outputs(params, example), example[1])

    def neg_loss(params, example):
        return -output_loss(outputs(params, example), example)

    def check(params, examples, what):
        _check_labeled(apply, params, examples, what)

    margin = _name(margin, "margin")
    neg_loss = _name(neg_loss, "neg_loss")
    margin.check_examples = neg_loss.check_examples = check
    link = lambda m, example: jax.nn.softplus(-m)
    return Task(outputs, output_loss, (margin, neg_loss), (margin, link), check)


def _check_labeled(apply, params, examples, what):
    """Examples of :func:`classification`: ``(inputs, labels)``, labels in range."""
    if not isinstance(examples, (tuple, list)) or len(examples) != 2:
        got = (
            f"a {type(examples).__name__} of {len(examples)}"
            if isinstance(examples, (tuple, list))
            else f"a {type(examples).__name__}"
        )
        raise TypeError(
            f"{what} must be a pair (inputs, labels), each with a leading example "
            f"axis; got {got}. Pass e.g. (x, y) with x of shape (n, ...) and y "
            "of shape (n,)."
        )
    x, y = examples
    leaves = jax.tree.leaves(x) + [y]
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        return  # traced: checked where the values are concrete
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"{what} labels must be class indices of shape (n,), got shape "
            f"{y.shape}. For one-hot labels pass y.argmax(-1)."
        )
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(x)}
    if sizes != {len(y)}:
        raise ValueError(
            f"{what} has {len(y)} labels but inputs with leading sizes "
            f"{sorted(sizes, key=str)}; give one label per input."
        )
    if y.dtype.kind not in "iu" and not (
        y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))
    ):
        raise TypeError(
            f"{what} labels must be integer class indices, got dtype {y.dtype}. "
            "Cast them with y.astype(np.int32)."
        )
    if not len(y):
        return
    first = jax.tree.map(lambda a: a[0], x)
    try:
        logits = jax.eval_shape(apply, params, first)
    except Exception as err:
        shapes = jax.tree.map(lambda a: tuple(np.shape(a)[1:]), x)
        raise ValueError(
            f"The model cannot take one {what} input of shape {shapes} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). Give inputs "
            "shaped like the training inputs, with a leading example axis."
        ) from err
    classes = logits.shape[-1] if logits.shape else 1
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what} label {y[i].item()!r} at position {i} is outside "
            f"0..{classes - 1} "
            f"(the model has {classes} outputs); {bad.size} label(s) are out of "
            "range. Labels must be class indices; drop or remap the others."
        )


def _margin_of(logits: Array, label: Array) -> Array:
    label = jnp.asarray(label, jnp.int32)
    correct = jnp.take(logits, label, axis=-1)
    others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
    return correct - jax.nn.logsumexp(others, axis=-1)


def measure_name(measure: Callable) -> str:
    """A stable name for a measurement function."""
    return getattr(measure, "__name__", type(measure).__name__)
