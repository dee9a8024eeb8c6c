"""Post-hoc simulation: each example's damped Gauss-Newton response from a checkpoint."""

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _checks, _tree
from jaxattr._curvature import GaussNewton, top_eigenvalue
from jaxattr._progress import progress as _progress
from jaxattr._sketch import DenseSketch, SketchInfo, check_ids
from jaxattr._task import Task, measure_name
from jaxattr._types import Array, Batch, Example, Params


def auto_step_size(
    curvature: GaussNewton,
    params: Params,
    data: Batch,
    key: Array,
    damping: float,
    num_probes: int = 4,
) -> tuple[float, float]:
    """Step size ``1 / (lambda_max + damping)`` from power iteration.

    ``lambda_max`` is the largest top eigenvalue over ``num_probes`` curvature
    minibatches drawn as the recursion draws them, so a minibatch whose curvature
    is larger than average does not make the recursion diverge.

    Returns:
      ``(step_size, lambda_max)``.
    """
    n = _tree.leading_size(data)
    probes = (
        1
        if (
            curvature.batch_size is None
            or curvature.batch_size >= n
            or not curvature.resample
        )
        else num_probes
    )

    lam_max = max(
        float(_probe(params, data, key, i, curvature=curvature)) for i in range(probes)
    )
    if not np.isfinite(lam_max) or lam_max < 0:
        raise ValueError(
            f"Power iteration gave curvature eigenvalue {lam_max}; the curvature is "
            "not finite at these parameters. Check the parameters and data for NaN/inf."
        )
    return 1.0 / (lam_max + damping + 1e-30), lam_max


@functools.partial(jax.jit, static_argnames=("curvature",))
def _probe(params, data, key, i, *, curvature):
    n = _tree.leading_size(data)
    op = curvature.operator(params, curvature.sample(data, n, key, i))
    return top_eigenvalue(op, params, jax.random.fold_in(key, 10_000 + i))


@functools.partial(jax.jit, static_argnames=("loss", "curvature", "horizon"))
def _respond_rows(
    rows, params, data, key, damping, step_size, *, loss, curvature, horizon
):
    respond = response_fn(
        loss, curvature, params, data, key, horizon, damping, step_size
    )
    return jax.vmap(respond)(rows)


def response_fn(
    loss: Callable,
    curvature: GaussNewton,
    params: Params,
    data: Batch,
    key: Array,
    horizon: int,
    damping: float,
    step_size: float,
) -> Callable[[Example], Params]:
    """The pure per-example recursion ``r <- r - eta((G + lam I) r + grad loss_b)``.

    Returns a function of one training example giving its response after
    ``horizon`` steps, starting from ``r = 0``. Step ``k`` uses the curvature
    minibatch drawn from ``fold_in(key, k)``, the same for every example, so
    ``jax.vmap`` of the returned function shares one linearisation per step and
    any chunking of examples gives the same responses.
    """
    n = _tree.leading_size(data)

    def respond(example):
        g = jax.grad(loss)(params, example)

        def step(r, k):
            batch = curvature.sample(data, n, key, k)
            gr = curvature.operator(params, batch)(r)
            r = jax.tree.map(
                lambda r_, gr_, g_: r_ - step_size * (gr_ + damping * r_ + g_), r, gr, g
            )
            return r, None

        zero = jax.tree.map(jnp.zeros_like, g)
        r, _ = jax.lax.scan(step, zero, jnp.arange(horizon))
        return r

    return respond


def simulate(
    task: Task,
    params: Params,
    train_data: Batch,
    *,
    key: Array,
    horizon: int = 50,
    damping: float = 1e-3,
    step_size: float | Literal["auto"] = "auto",
    curvature: GaussNewton | None = None,
    chunk_size: int = 128,
    ids: Any = None,
    measurement: Callable | None = None,
    progress: bool = False,
) -> DenseSketch:
    """Per-example responses from a trained checkpoint, by short-horizon recursion.

    For each training example ``b`` runs ``horizon`` steps of

    ``r <- r - eta * ((G_k + damping * I) r + grad loss_b(params))``, ``r_0 = 0``,

    with ``G_k`` the Gauss-Newton curvature of minibatch ``k``. This is a
    truncated Neumann series: as ``horizon`` grows, ``r`` tends to
    ``-(G + damping I)^-1 grad loss_b``, the influence-function response, when
    ``eta < 1 / (||G|| + damping)``. No Hessian is formed or inverted.

    Args:
      task: the model and loss, e.g. ``jaxattr.classification(apply)``.
      params: the trained parameters.
      train_data: training examples stacked on a leading ``num_train`` axis.
      key: ``jax.random`` key for the curvature minibatches and power iteration.
      horizon: recursion steps ``K``.
      damping: ``lam >= 0``, in the units of the curvature's eigenvalues.
      step_size: ``eta``, or ``"auto"`` for ``1 / (lambda_max + damping)`` with
        ``lambda_max`` from power iteration.
      curvature: a :class:`GaussNewton`; defaults to ``task.ggn(batch_size=64)``.
      chunk_size: examples simulated at once; bounds memory.
      ids: ``(num_train,)`` unique integer ids; defaults to ``0..num_train-1``.
      measurement: if given, the sketch records it (scorers then refuse other
        measurements); by default the sketch may be read with any measurement.
      progress: draw a progress bar on stderr.

    Returns:
      A :class:`DenseSketch` with one response per training example.

    Raises:
      ValueError: bad hyperparameters, duplicated ids, or a training example whose
        loss or response is NaN/inf (the message names its id).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> task = jaxattr.classification(lambda w, x: x @ w)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> data = (x, jnp.arange(8) % 2)
      >>> sketch = jaxattr.simulate(task, jnp.zeros((3, 2)), data,
      ...                           key=jax.random.key(1), horizon=5)
      >>> sketch.num_train
      8
    """
    horizon = _checks.positive_int("horizon", horizon)
    chunk_size = _checks.positive_int("chunk_size", chunk_size)
    damping = _checks.nonneg_float(
        "damping",
        damping,
        " Use damping >= 0 (e.g. 1e-3); it regularises the curvature inverse.",
    )
    curvature = task.ggn() if curvature is None else curvature
    if not isinstance(curvature, GaussNewton):
        raise TypeError(
            f"curvature must be a jaxattr.GaussNewton, got {type(curvature)}."
        )
    n = _tree.leading_size(train_data)
    ids = check_ids(np.arange(n) if ids is None else ids, what="ids")
    if ids.shape[0] != n:
        raise ValueError(
            f"ids has {ids.shape[0]} entries but train_data has {n} examples."
        )
    _checks.finite_params(params)
    losses = _checks.losses_in_chunks(task.loss, params, train_data, chunk_size)
    _checks.finite_per_example(losses, ids, "The training loss")

    lam_max = None
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(
                f"step_size must be a positive number or 'auto', got {step_size!r}."
            )
        step_size, lam_max = auto_step_size(curvature, params, train_data, key, damping)
    else:
        step_size = _checks.positive_float("step_size", step_size)

    fn = functools.partial(
        _respond_rows,
        params=params,
        data=train_data,
        key=key,
        damping=damping,
        step_size=step_size,
        loss=task.loss,
        curvature=curvature,
        horizon=horizon,
    )
    responses = _map_chunks(fn, train_data, n, chunk_size, progress, "simulate")
    _check_finite_rows(responses, ids)
    settings = dict(
        horizon=horizon,
        damping=damping,
        step_size=step_size,
        curvature=curvature.name,
        curvature_batch_size=curvature.batch_size,
        lambda_max=lam_max,
    )
    info = SketchInfo(
        _tree.param_spec(params),
        None if measurement is None else measure_name(measurement),
        "posthoc",
        tuple(sorted(settings.items())),
    )
    return DenseSketch(responses, jnp.asarray(ids), info)


def _map_chunks(
    fn: Callable, data: Batch, n: int, chunk: int, show: bool, desc: str
) -> Any:
    """Applies a vmapped ``fn`` to rows of ``data`` ``chunk`` at a time.

    The last chunk is padded to ``chunk`` rows so ``fn`` compiles once.
    """
    starts = range(0, n, chunk)
    parts = []
    for start in _progress(starts, len(starts), desc, show):
        stop = min(start + chunk, n)
        rows = _tree.pad_rows(_tree.slice_rows(data, start, stop), min(chunk, n))
        out = fn(rows)
        parts.append(jax.tree.map(lambda a: a[: stop - start], out))
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def _check_finite_rows(responses: Params, ids: np.ndarray) -> None:
    ok = None
    for leaf in jax.tree.leaves(responses):
        rows = jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        ok = rows if ok is None else ok & rows
    ok = np.asarray(ok)
    values = np.where(ok, 0.0, np.nan)
    _checks.finite_per_example(values, ids, "The simulated response")
