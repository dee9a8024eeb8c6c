"""Post-hoc simulation: each example's damped Gauss-Newton response at a checkpoint."""

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxattr import _builders, _checks, _io, _lowrank, _sharding, _tree
from jaxattr._curvature import GaussNewton, top_eigenvalue
from jaxattr._lowrank import Eigenbasis, LowRank
from jaxattr._progress import progress as _progress
from jaxattr._sketch import DenseSketch, SketchInfo, check_ids
from jaxattr._task import Task, measure_name
from jaxattr._types import Array, Batch, Example, Params


@dataclasses.dataclass(frozen=True)
class Relative:
    """A damping given as a fraction of the curvature's largest eigenvalue.

    ``damping=jaxattr.Relative(1e-3)`` means ``lam = 1e-3 * lambda_max``, which
    keeps the same meaning whatever the scale of the model and loss.
    """

    fraction: float

    def __post_init__(self):
        _checks.nonneg_float("Relative.fraction", self.fraction)


def top_curvature_eigenvalue(
    curvature: GaussNewton,
    params: Params,
    data: Batch,
    key: Array,
    num_probes: int = 4,
) -> float:
    """Largest curvature eigenvalue by power iteration, over minibatches.

    Takes the largest top eigenvalue over ``num_probes`` curvature minibatches
    drawn as the recursion draws them, so a minibatch whose curvature is larger
    than average does not make the recursion diverge.
    """
    n = _tree.leading_size(data)
    fixed = (
        curvature.batch_size is None
        or curvature.batch_size >= n
        or not curvature.resample
    )
    probes = 1 if fixed else num_probes
    lam_max = max(
        float(_probe(params, data, key, i, curvature=curvature)) for i in range(probes)
    )
    if not np.isfinite(lam_max) or lam_max < 0:
        raise ValueError(
            f"Power iteration gave curvature eigenvalue {lam_max}; the curvature is "
            "not finite at these parameters. Check the parameters and data for NaN/inf."
        )
    return lam_max


@functools.partial(jax.jit, static_argnames=("curvature",))
def _probe(params, data, key, i, *, curvature):
    n = _tree.leading_size(data)
    op = curvature.operator(params, curvature.sample(data, n, key, i))
    return top_eigenvalue(op, params, jax.random.fold_in(key, 10_000 + i))


@functools.partial(jax.jit, static_argnames=("loss", "curvature", "horizon", "split"))
def _respond_rows(
    rows, params, data, key, damping, step_size, *, loss, curvature, horizon, split
):
    def local(rows, params, data, key, damping, step_size):
        respond = response_fn(
            loss, curvature, params, data, key, horizon, damping, step_size
        )
        return jax.vmap(respond)(rows)

    run = _sharding.rows_map(local, split)
    return run(rows, params, data, key, damping, step_size)


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
    respond_to = gradient_response_fn(
        curvature, params, data, key, horizon, damping, step_size
    )
    return lambda example: respond_to(jax.grad(loss)(params, example))


def gradient_response_fn(
    curvature: GaussNewton,
    params: Params,
    data: Batch,
    key: Array,
    horizon: int,
    damping: float,
    step_size: float,
) -> Callable[[Params], Params]:
    """The recursion as a function of the loss gradient ``g`` it is driven by.

    Linear in ``g`` (the curvature minibatches do not depend on it), so the
    response to a sum of gradients is the sum of their responses: grouped
    sketches simulate one recursion per group, not per example.
    """
    n = _tree.leading_size(data)

    def respond_to(g):
        def step(r, k):
            batch = curvature.sample(data, n, key, k)
            gr = curvature.operator(params, batch)(r)
            r = jax.tree.map(
                lambda r_, gr_, g_: r_ - step_size * (gr_ + damping * r_ + g_), r, gr, g
            )
            return r, None

        zero = jax.tree.map(jnp.zeros_like, g)
        return jax.lax.scan(step, zero, jnp.arange(horizon))[0]

    return respond_to


def simulate(
    task: Task,
    params: Params,
    train_data: Batch,
    *,
    key: Array,
    horizon: int | None = 300,
    damping: "float | Relative" = Relative(1e-3),
    step_size: float | Literal["auto"] = "auto",
    curvature: GaussNewton | LowRank | None = None,
    chunk_size: int = 128,
    ids: Any = None,
    measurement: Callable | None = None,
    sketch: Any = None,
    progress: bool = False,
    checkpoint_dir: _io.PathLike | None = None,
    checkpoint_every: int = 1,
    mesh: Mesh | None = None,
    mesh_axis: str | None = None,
) -> Any:
    """Per-example responses from a trained checkpoint, by short-horizon recursion.

    For each training example ``b`` runs ``horizon`` steps of

    ``r <- r - eta * ((G_k + damping * I) r + grad loss_b(params))``, ``r_0 = 0``,

    with ``G_k`` the Gauss-Newton curvature of step ``k``. This is a truncated
    Neumann series: as ``horizon`` grows, ``r`` tends to ``-(G + damping
    I)^-1 grad loss_b``, the influence-function response, when ``eta < 1 /
    (||G|| + damping)``; a finite horizon damps the directions of small
    curvature further, which is often better than the full inverse. No Hessian
    is formed or inverted.

    Two ways to run it, chosen by ``curvature``:

    * :class:`GaussNewton`: matrix-free, a fresh curvature minibatch every step
      (``resample=True``) or one fixed batch; cost grows with the horizon.
    * :class:`LowRank`: one fixed curvature batch whose eigenpairs are computed
      once; the recursion then decouples per eigen-direction and is evaluated
      in closed form, identical to running it, at a cost independent of the
      horizon. The default for classification (the margin Gauss-Newton
      curvature of up to 8192 training examples), because long horizons on a
      noise-free curvature attribute best.

    Args:
      task: the model and loss, e.g. ``jaxattr.classification(apply)``.
      params: the trained parameters.
      train_data: training examples stacked on a leading ``num_train`` axis.
      key: ``jax.random`` key for the curvature minibatches and power iteration.
      horizon: recursion steps ``K``; ``None`` (only with :class:`LowRank`) for
        the infinite-horizon limit, the damped inverse.
      damping: ``lam >= 0`` in the units of the curvature's eigenvalues, or
        :class:`Relative` for a fraction of the largest eigenvalue.
      step_size: ``eta``, or ``"auto"`` for ``1 / (lambda_max + lam)`` with
        ``lambda_max`` from power iteration or the eigenbasis.
      curvature: a :class:`GaussNewton` or :class:`LowRank`; ``None`` picks
        :func:`default_curvature`. An :class:`Eigenbasis` from
        :func:`eigenbasis` is reused as is, so several horizons and dampings
        can be simulated from one decomposition.
      chunk_size: examples simulated at once; bounds memory.
      ids: ``(num_train,)`` unique integer ids; defaults to ``0..num_train-1``.
      measurement: if given, the sketch records it (scorers then refuse other
        measurements); by default the sketch may be read with any measurement.
      sketch: how responses are stored, a sketch builder:
        ``Dense()`` (default), ``Grouped(groups)``, ``Projected(dim, key)``,
        ``Adaptive(rank, key)``, ``InBasis(vectors)``, ``LayerLowRank(rank)``.
        Responses stream into it chunk by chunk, so compact sketches never
        hold all dense responses in memory.
      progress: draw a progress bar on stderr.
      checkpoint_dir: a directory in which to save progress after every
        ``checkpoint_every`` chunks (see ``jaxattr._io`` for the format). A
        later call with the same arguments and directory resumes after the
        last saved chunk, and returns a sketch bitwise equal to an
        uninterrupted run; the directory is kept, so calling again returns
        the finished sketch. ``None`` (default) saves nothing.
      checkpoint_every: chunks simulated between saves.
      mesh: a ``jax.sharding.Mesh``: each chunk's examples are split over its
        devices along ``mesh_axis`` (``jax.shard_map``; the chunk is padded to
        a multiple of them), parameters and curvature data are copied to every
        device. ``None`` (default) simulates on the default device. The
        sketch comes back with its rows split over the mesh when their number
        is a multiple of the devices (see :func:`jaxattr.shard_sketch`).
      mesh_axis: the mesh axis that splits examples; may be omitted when the
        mesh has one axis.

    Returns:
      The sketch, by default a :class:`DenseSketch` with one response per
      training example.

    Raises:
      ValueError: bad hyperparameters, duplicated ids, a training example whose
        loss or response is NaN/inf (the message names its id), or a
        ``mesh_axis`` that is not an axis of ``mesh``.

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
    task.check_examples(params, train_data, "train_data")
    _check_builder(sketch)
    n = _tree.leading_size(train_data)
    curvature = default_curvature(task, n) if curvature is None else curvature
    horizon, chunk_size = _check_settings(curvature, horizon, damping, chunk_size)
    every = _checks.positive_int("checkpoint_every", checkpoint_every)
    split = _sharding.layout(mesh, mesh_axis)
    ids = check_ids(np.arange(n) if ids is None else ids, what="ids")
    if ids.shape[0] != n:
        raise ValueError(
            f"ids has {ids.shape[0]} entries but train_data has {n} examples."
        )
    _checks.finite_params(params)
    losses = _checks.losses_in_chunks(task.loss, params, train_data, chunk_size)
    _checks.finite_per_example(losses, ids, "The training loss")

    plan = _plan(
        task,
        params,
        train_data,
        key,
        curvature,
        horizon,
        damping,
        step_size,
        sketch,
        split,
    )
    sketch = plan.sketch
    info = _posthoc_info(
        params,
        measurement,
        curvature,
        horizon,
        plan.damping,
        plan.step_size,
        plan.lam_max,
    )
    if isinstance(sketch, _builders.Grouped) and checkpoint_dir is None and not split:
        sums = _group_gradients(task.loss, params, train_data, sketch, ids, chunk_size)
        return _grouped_sketch(plan.respond_to, sums, sketch, info, chunk_size)
    devices = 1 if split is None else split.size
    chunks = _chunks(plan.rows, train_data, n, chunk_size, progress, ids, devices)
    builder = sketch or _builders.Dense()
    # What a checkpoint must match, besides the builder, params, ids and info.
    run = dict(
        task=task,
        key=key,
        train_data=train_data,
        curvature=curvature,
        chunk_size=chunk_size,
    )
    out = _io.run(builder, chunks, params, n, ids, info, checkpoint_dir, run, every)
    return _sharding.place_if_even(out, split)


class _Plan(NamedTuple):
    """How simulate turns examples into sketch rows, once settings are resolved.

    Attributes:
      rows: ``rows(chunk of examples) -> chunk of responses`` (or coefficients).
      respond_to: ``respond_to(gradients) -> responses`` (linear in them).
      sketch: the builder the rows stream into.
      damping, step_size, lam_max: the resolved settings.
    """

    rows: Callable
    respond_to: Callable
    sketch: Any
    damping: float
    step_size: float
    lam_max: float | None


def _plan(
    task, params, data, key, curvature, horizon, damping, step_size, sketch, split
) -> _Plan:
    if isinstance(curvature, GaussNewton):
        return _recursion_plan(
            task,
            params,
            data,
            key,
            curvature,
            horizon,
            damping,
            step_size,
            sketch,
            split,
        )
    basis = curvature
    if isinstance(curvature, LowRank):
        basis = _lowrank.eigenbasis(curvature, params, data, key)
    lam_max = float(basis.values[0]) if basis.values.size else 0.0
    damping, step_size = _resolve(damping, step_size, lam_max, horizon)
    per_example = _lowrank.closed_form_fn
    if isinstance(sketch, _builders.CurvatureBasis):
        basis = _lowrank.Eigenbasis(
            basis.vectors[: sketch.rank], basis.values[: sketch.rank]
        )
        sketch = _builders._Coefficients(basis.vectors, "curvature_basis")
        per_example = _lowrank.coefficient_fn
    settings = dict(
        params=params,
        basis=basis,
        damping=damping,
        step_size=step_size,
        horizon=horizon,
    )
    rows = functools.partial(
        _lowrank.map_rows,
        **settings,
        loss=task.loss,
        per_example=per_example,
        split=split,
    )
    respond_to = functools.partial(_lowrank.respond_gradients, **settings)
    return _Plan(rows, respond_to, sketch, damping, step_size, lam_max)


def _recursion_plan(
    task, params, data, key, curvature, horizon, damping, step_size, sketch, split
) -> _Plan:
    if isinstance(sketch, _builders.CurvatureBasis):
        raise TypeError(
            "sketch=CurvatureBasis needs curvature=jaxattr.LowRank(...) or an "
            "Eigenbasis; a GaussNewton curvature has no eigenbasis."
        )
    needs_top = isinstance(damping, Relative) or step_size == "auto"
    lam_max = (
        top_curvature_eigenvalue(curvature, params, data, key) if needs_top else None
    )
    damping, step_size = _resolve(damping, step_size, lam_max, horizon)
    settings = dict(
        params=params,
        data=data,
        key=key,
        damping=damping,
        step_size=step_size,
        curvature=curvature,
        horizon=horizon,
    )
    rows = functools.partial(_respond_rows, **settings, loss=task.loss, split=split)
    respond_to = functools.partial(_respond_gradients, **settings)
    return _Plan(rows, respond_to, sketch, damping, step_size, lam_max)


def _posthoc_info(
    params, measurement, curvature, horizon, damping, step_size, lam_max
) -> SketchInfo:
    base = curvature.curvature if isinstance(curvature, LowRank) else curvature
    settings = dict(
        horizon=horizon,
        damping=damping,
        step_size=step_size,
        curvature=getattr(curvature, "name", "eigenbasis"),
        curvature_batch_size=getattr(base, "batch_size", None),
        lambda_max=lam_max,
    )
    return SketchInfo(
        _tree.param_spec(params),
        None if measurement is None else measure_name(measurement),
        "posthoc",
        tuple(sorted(settings.items())),
    )


@functools.partial(jax.jit, static_argnames=("curvature", "horizon"))
def _respond_gradients(
    gs, params, data, key, damping, step_size, *, curvature, horizon
):
    respond_to = gradient_response_fn(
        curvature, params, data, key, horizon, damping, step_size
    )
    return jax.vmap(respond_to)(gs)


def _group_gradients(loss, params, data, grouped, ids, chunk):
    """Loss gradients summed per group, streaming over examples.

    Returns:
      ``(labels, sums)``: sorted group labels and a pytree with a leading
      ``num_groups`` axis.
    """
    n = _tree.leading_size(data)
    ctx = grouped.context(params, n)
    sums = _tree.zeros_stacked(params, len(ctx["labels"]))
    size = min(chunk, n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = _tree.pad_rows(_tree.slice_rows(data, start, stop), size)
        index = jnp.full(size, -1).at[: stop - start].set(ctx["index"][start:stop])
        sums, finite = _add_gradients(loss, params, rows, index, sums)
        ok = np.asarray(finite)[: stop - start]
        _checks.finite_per_example(
            np.where(ok, 0.0, np.nan), ids[start:stop], "The loss gradient"
        )
    return ctx["labels"], sums


@functools.partial(jax.jit, static_argnums=0)
def _add_gradients(loss, params, rows, index, sums):
    grads = jax.vmap(jax.grad(loss), (None, 0))(params, rows)
    flat = jax.vmap(lambda g: jax.flatten_util.ravel_pytree(g)[0])(grads)
    finite = jnp.all(jnp.isfinite(flat), axis=1)
    keep = index >= 0
    add = lambda s, g: s.at[jnp.where(keep, index, 0)].add(
        g * keep.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    )
    return jax.tree.map(add, sums, grads), finite


def _grouped_sketch(respond_to, group_sums, grouped, info, chunk):
    """Responses to the per-group gradient sums, ``chunk`` groups at a time."""
    labels, sums = group_sums
    s = len(labels)
    parts = []
    for start in range(0, s, chunk):
        stop = min(start + chunk, s)
        rows = _tree.pad_rows(_tree.slice_rows(sums, start, stop), min(chunk, s))
        out = respond_to(rows)
        parts.append(jax.tree.map(lambda a, k=stop - start: a[:k], out))
    responses = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
    info = _builders._with(info, grouped=True)
    return DenseSketch(responses, jnp.asarray(labels), info)


def default_curvature(task: Task, num_train: int) -> GaussNewton | LowRank:
    """The curvature :func:`simulate` uses when none is given.

    For tasks with a margin (classification): the exact low-rank margin
    Gauss-Newton curvature of up to ``MAX_DEFAULT_CURVATURE_BATCH`` training
    examples, fixed (noise-free), in closed form. Otherwise the minibatch
    Gauss-Newton recursion with 64 examples per step.
    """
    if task.margin_view is None:
        return task.ggn(batch_size=64)
    size = min(num_train, MAX_DEFAULT_CURVATURE_BATCH)
    return LowRank(task.margin_ggn(batch_size=size, resample=False))


MAX_DEFAULT_CURVATURE_BATCH = 8192


def _check_builder(sketch) -> None:
    if sketch is not None and not hasattr(sketch, "context"):
        raise TypeError(
            f"sketch must be a sketch builder such as jaxattr.Dense(), "
            "jaxattr.Grouped(groups), jaxattr.Projected(dim, key), "
            "jaxattr.Adaptive(rank, key), jaxattr.LayerLowRank(rank) or "
            f"jaxattr.CurvatureBasis(rank); got {sketch!r}."
        )


def _check_settings(curvature, horizon, damping, chunk_size):
    if not isinstance(curvature, (GaussNewton, LowRank, Eigenbasis)):
        raise TypeError(
            "curvature must be a jaxattr.GaussNewton, LowRank or Eigenbasis, got "
            f"{type(curvature).__name__}."
        )
    if horizon is None and isinstance(curvature, GaussNewton):
        raise ValueError(
            "horizon=None (the infinite-horizon limit) needs curvature=jaxattr.LowRank"
            "(...); with a GaussNewton curvature give a positive integer horizon."
        )
    if horizon is not None:
        horizon = _checks.positive_int("horizon", horizon)
    if not isinstance(damping, Relative):
        _checks.nonneg_float(
            "damping",
            damping,
            " Use damping >= 0 (e.g. 1e-3, or jaxattr.Relative(1e-3) for a fraction "
            "of the top curvature eigenvalue); it regularises the curvature inverse.",
        )
    fraction = damping.fraction if isinstance(damping, Relative) else damping
    if horizon is None and float(fraction) == 0:
        raise ValueError(
            "horizon=None needs damping > 0: the undamped inverse of a "
            "low-rank curvature is infinite off its range."
        )
    return horizon, _checks.positive_int("chunk_size", chunk_size)


def _resolve(damping, step_size, lam_max, horizon):
    """Absolute damping and step size, given the top curvature eigenvalue."""
    if isinstance(damping, Relative):
        damping = damping.fraction * lam_max
    damping = float(damping)
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(
                f"step_size must be a positive number or 'auto', got {step_size!r}."
            )
        return damping, 1.0 / (lam_max + damping + 1e-30)
    return damping, _checks.positive_float("step_size", step_size)


def _chunks(
    fn: Callable,
    data: Batch,
    n: int,
    chunk: int,
    show: bool,
    ids: np.ndarray,
    devices: int = 1,
) -> Callable:
    """A generator factory of ``(start, responses)``, one pass over the examples.

    Every chunk is padded to the same size, ``chunk`` rows rounded up to a
    multiple of ``devices``, so ``fn`` compiles once and can split it evenly;
    each chunk's responses are checked for NaN/inf, naming the offending
    example.
    """
    size = -(-min(chunk, n) // devices) * devices

    def one_pass(pass_index, first=0):
        starts = range(first, n, chunk)
        desc = "simulate" if pass_index == 0 else f"simulate (pass {pass_index + 1})"
        for start in _progress(starts, len(starts), desc, show):
            stop = min(start + chunk, n)
            out = fn(_tree.pad_rows(_tree.slice_rows(data, start, stop), size))
            out = jax.tree.map(lambda a, k=stop - start: a[:k], out)
            if pass_index == 0:
                _check_finite_rows(out, ids[start:stop])
            yield start, out

    return one_pass


def _check_finite_rows(responses: Params, ids: np.ndarray) -> None:
    ok = None
    for leaf in jax.tree.leaves(responses):
        rows = jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        ok = rows if ok is None else ok & rows
    ok = np.asarray(ok)
    values = np.where(ok, 0.0, np.nan)
    _checks.finite_per_example(values, ids, "The simulated response")
