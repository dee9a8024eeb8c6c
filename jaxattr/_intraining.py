"""In-training simulation: carry each example's upweighting through real optax steps."""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattr import _checks, _tree
from jaxattr._sketch import DenseSketch, SketchInfo, check_ids
from jaxattr._task import Task
from jaxattr._types import Array, OptState, Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InTrainingState:
    """Explicit state of the in-training simulation (a pytree; safe under ``jit``).

    Attributes:
      responses: accumulated responses, leaves ``(num_train, *leaf_shape)``.
      tangent_params: live perturbations, leaves ``(horizon * batch_size, ...)``.
      tangent_opt: live optimizer-state perturbations (float leaves of the
        optimizer state), same leading axis.
      slot_ids: ``(horizon * batch_size,)`` example id of each live slot, -1 free.
      step: number of ``update`` calls so far.
      nonfinite_id: first example id whose loss was NaN/inf, else -1.
      nonfinite_step: the update at which it was seen, else -1.
      bad_id: first id out of range or duplicated within a batch, else -1.
    """

    responses: Any
    tangent_params: Any
    tangent_opt: Any
    slot_ids: Array
    step: Array
    nonfinite_id: Array
    nonfinite_step: Array
    bad_id: Array


class InTraining(NamedTuple):
    """The functions returned by :func:`in_training`."""

    init: Callable[..., InTrainingState]
    update: Callable[..., InTrainingState]
    step: Callable[..., tuple]
    finalize: Callable[[InTrainingState], DenseSketch]


def _split_opt(opt_state):
    leaves, treedef = jax.tree.flatten(opt_state)
    is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    floats = [x for x, f in zip(leaves, is_float, strict=False) if f]
    rest = [x for x, f in zip(leaves, is_float, strict=False) if not f]
    return floats, rest, treedef, is_float


def _join_opt(floats, rest, treedef, is_float):
    fi, ri = iter(floats), iter(rest)
    return jax.tree.unflatten(treedef, [next(fi) if f else next(ri) for f in is_float])


def in_training(
    task: Task | Callable,
    optimizer: optax.GradientTransformation,
    *,
    horizon: int = 50,
    batch_size: int,
    chunk_size: int | None = None,
) -> InTraining:
    """Builds the in-training simulation for a Flax/optax training loop.

    When example ``b`` appears in a batch, jaxattr starts its perturbation there:
    the derivative of that training step with respect to ``b``'s loss weight,
    ``w_b = 1 + num_train * eps`` (so ``eps`` upweights ``b`` in the mean
    training loss, the units of :class:`DenseSketch`). The perturbation of the
    parameters *and of the optimizer state* is then carried through the next
    ``horizon - 1`` real optax updates by ``jax.jvp`` of the train step, exactly
    the linearised effect of upweighting ``b`` as ``eps -> 0``. After
    ``horizon`` steps the parameter perturbation is added to ``b``'s response;
    responses accumulate over an example's appearances.

    Args:
      task: a :class:`Task` or a per-example ``loss(params, example)``. The
        train step is ``mean_i loss(params, z_i)`` over the batch followed by
        ``optimizer``; it must be the step the training loop really takes (use
        the returned ``step`` to be sure).
      optimizer: any optax gradient transformation.
      horizon: steps ``K`` each perturbation is carried.
      batch_size: rows of every batch passed to ``update`` (pad a short final
        batch with id -1 rows, which get loss weight 0).
      chunk_size: live perturbations propagated at once; ``None`` propagates all
        ``horizon * batch_size`` together. Bounds the working memory.

    Returns:
      ``InTraining(init, update, step, finalize)``:

      * ``init(params, opt_state, num_train) -> state``
      * ``update(state, params, opt_state, batch, ids) -> state``: call with the
        parameters and optimizer state *before* the step on ``batch``. The
        input ``state`` is consumed (its buffers are donated to the output),
        so always continue with the returned state.
      * ``step(state, params, opt_state, batch, ids) -> (params, opt_state,
        state, loss)``: the train step and ``update`` in one, sharing its
        linearisation.
      * ``finalize(state) -> DenseSketch``: adds the perturbations still in
        flight (shorter horizon) and checks for NaN/inf.

      All are pure; ``update`` and ``step`` are jitted.
    """
    loss = task.loss if isinstance(task, Task) else task
    if not callable(loss):
        raise TypeError(
            f"task must be a jaxattr.Task or a loss function, got {task!r}."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation, got {optimizer!r}."
        )
    horizon = _checks.positive_int("horizon", horizon)
    batch_size = _checks.positive_int("batch_size", batch_size)
    slots = horizon * batch_size
    chunk = (
        slots
        if chunk_size is None
        else min(_checks.positive_int("chunk_size", chunk_size), slots)
    )

    def train_step(params, floats, rest, structure, batch, weights):
        opt_state = _join_opt(floats, rest, *structure)
        count = jnp.maximum(jnp.sum(weights != 0), 1)

        def total(p):
            losses = jax.vmap(loss, (None, 0))(p, batch)
            return jnp.sum(
                weights * jnp.where(weights != 0, losses, 0.0)
            ) / count, losses

        grads, losses = jax.grad(total, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_floats, new_rest, _, _ = _split_opt(opt_state)
        return (optax.apply_updates(params, updates), new_floats), (losses, new_rest)

    def init(params: Params, opt_state: OptState, num_train: int) -> InTrainingState:
        num_train = _checks.positive_int("num_train", num_train)
        floats, _, _, _ = _split_opt(opt_state)
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        return InTrainingState(
            responses=_tree.zeros_stacked(params, num_train),
            tangent_params=_tree.zeros_stacked(params, slots),
            tangent_opt=_tree.zeros_stacked(floats, slots),
            slot_ids=jnp.full((slots,), -1, jnp.int32),
            step=i32(0),
            nonfinite_id=i32(-1),
            nonfinite_step=i32(-1),
            bad_id=i32(-1),
        )

    def _core(state, params, opt_state, batch, ids):
        num_train = jax.tree.leaves(state.responses)[0].shape[0]
        floats, rest, treedef, is_float = _split_opt(opt_state)
        structure = (treedef, is_float)
        ids = jnp.asarray(ids, jnp.int32)
        valid = (ids >= 0) & (ids < num_train)
        mask = valid.astype(_dtype(params))
        fn = lambda p, f, w: train_step(p, f, rest, structure, batch, w)
        (new_params, new_floats), (losses, new_rest) = fn(params, floats, mask)
        tangent = lambda p, f, w: fn(p, f, w)[0]

        start = (state.step % horizon) * batch_size
        responses, tp, to = _retire_block(state, start, batch_size)
        # Seed the block with this batch: a weight tangent, zero state tangent.
        seed = jnp.where(valid, jnp.asarray(num_train, mask.dtype), 0.0)
        dw = jnp.zeros((slots, batch_size), mask.dtype)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, jnp.diag(seed), start, axis=0)
        # TODO: split the live slots over a jax.sharding mesh, as simulate(mesh=)
        # splits examples. Each slot propagates on its own (this map), but the
        # slots form a ring written at a step-dependent offset and retired by
        # a scatter into the responses; splitting only this map would gather
        # the whole slot state every step, so the ring needs a per-device
        # layout first.
        prop = lambda x: jax.jvp(tangent, (params, floats, mask), x)[1]
        tp, to = jax.lax.map(prop, (tp, to, dw), batch_size=chunk)
        slot_ids = jax.lax.dynamic_update_slice_in_dim(
            state.slot_ids, jnp.where(valid, ids, -1), start, 0
        )

        state = _flag_errors(state, ids, valid, losses, num_train)
        state = dataclasses.replace(
            state,
            responses=responses,
            tangent_params=tp,
            tangent_opt=to,
            slot_ids=slot_ids,
            step=state.step + 1,
        )
        new_opt = _join_opt(new_floats, new_rest, treedef, is_float)
        mean_loss = jnp.sum(mask * jnp.where(valid, losses, 0.0)) / jnp.maximum(
            mask.sum(), 1
        )
        return new_params, new_opt, state, mean_loss

    core = jax.jit(_core, donate_argnums=0)

    def _check_concrete(state, batch, ids):
        n = _tree.leading_size(batch)
        if n != batch_size:
            raise ValueError(
                f"in_training was built with batch_size={batch_size} but got a batch "
                f"of {n} rows. Pad short batches to batch_size with rows of id -1."
            )
        # Shape and dtype are known even under jit; values only when concrete
        # (under jit bad values are flagged and raised by finalize).
        shape, dtype = np.shape(ids), jnp.result_type(ids)
        if shape != (batch_size,):
            raise ValueError(
                f"ids must have shape ({batch_size},), one per batch row; got {shape}."
            )
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"ids must be integers (row of each example in the training set, "
                f"-1 for padding), got dtype {dtype}; cast with ids.astype(np.int32)."
            )
        if isinstance(ids, jax.core.Tracer):
            return
        arr = np.asarray(ids)
        real = arr[arr != -1]
        num_train = jax.tree.leaves(state.responses)[0].shape[0]
        check_ids(real, num_train, what="ids (use -1 for padding rows)")

    def update(state, params, opt_state, batch, ids):
        _check_concrete(state, batch, ids)
        return core(state, params, opt_state, batch, ids)[2]

    def step(state, params, opt_state, batch, ids):
        _check_concrete(state, batch, ids)
        params, opt_state, state, loss_value = core(
            state, params, opt_state, batch, ids
        )
        return params, opt_state, state, loss_value

    def finalize(state: InTrainingState) -> DenseSketch:
        _raise_flags(state)
        responses = _scatter_add(state.responses, state.slot_ids, state.tangent_params)
        num_train = jax.tree.leaves(responses)[0].shape[0]
        ids = np.arange(num_train)
        bad = _nonfinite_rows(responses)
        if bad.size:
            _checks.finite_per_example(
                np.where(np.isin(ids, bad), np.nan, 0.0),
                ids,
                "The accumulated response",
            )
        spec = _tree.param_spec(jax.tree.map(lambda a: a[0], responses))
        settings = (
            ("batch_size", batch_size),
            ("horizon", horizon),
            ("steps", int(state.step)),
        )
        return DenseSketch(
            responses, jnp.asarray(ids), SketchInfo(spec, None, "in_training", settings)
        )

    return InTraining(init, update, step, finalize)


def _dtype(params):
    return jnp.result_type(*jax.tree.leaves(params))


def _retire_block(state, start, size):
    """Adds the block of slots at ``start`` to the responses and zeroes it."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)
    retiring = take(state.slot_ids)
    responses = _scatter_add(
        state.responses, retiring, jax.tree.map(take, state.tangent_params)
    )
    clear = lambda a: jax.lax.dynamic_update_slice_in_dim(
        a, jnp.zeros((size,) + a.shape[1:], a.dtype), start, 0
    )
    return (
        responses,
        jax.tree.map(clear, state.tangent_params),
        jax.tree.map(clear, state.tangent_opt),
    )


def _scatter_add(responses, ids, rows):
    """``responses[ids] += rows`` skipping ids of -1."""
    safe = jnp.where(ids >= 0, ids, 0)
    w = ids >= 0

    def add(acc, r):
        r = r * w.reshape((-1,) + (1,) * (r.ndim - 1)).astype(r.dtype)
        return acc.at[safe].add(r.astype(acc.dtype))

    return jax.tree.map(add, responses, rows)


def _flag_errors(state, ids, valid, losses, num_train):
    finite = jnp.isfinite(losses) | ~valid
    first_bad = jnp.where(jnp.any(~finite), ids[jnp.argmax(~finite)], -1)
    nonfinite = jnp.where(state.nonfinite_id >= 0, state.nonfinite_id, first_bad)
    when = jnp.where(
        (state.nonfinite_id < 0) & (first_bad >= 0), state.step, state.nonfinite_step
    )
    out_of_range = (ids != -1) & ~valid
    same = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    dup = jnp.sum(same, axis=1) > 1
    wrong = out_of_range | dup
    first_wrong = jnp.where(jnp.any(wrong), ids[jnp.argmax(wrong)], -1)
    bad_id = jnp.where(state.bad_id != -1, state.bad_id, first_wrong)
    return dataclasses.replace(
        state,
        nonfinite_id=nonfinite.astype(jnp.int32),
        nonfinite_step=when.astype(jnp.int32),
        bad_id=bad_id.astype(jnp.int32),
    )


def _raise_flags(state):
    if int(state.bad_id) != -1:
        raise ValueError(
            f"update received example id {int(state.bad_id)}, which is out of range "
            "[0, num_train) or repeated within one batch. Pass unique ids in "
            "0..num_train-1 (-1 for padding rows). finalize raised before changing "
            "the state, which can still be inspected."
        )
    if int(state.nonfinite_id) >= 0:
        raise ValueError(
            f"The training loss of example id {int(state.nonfinite_id)} was NaN or inf "
            f"at simulated update {int(state.nonfinite_step)} (counting calls to "
            "update/step from 0). If only that example is affected, fix or drop it; "
            "if losses of many examples diverged, lower the learning rate. finalize "
            "raised before changing the state, which can still be inspected."
        )


def _nonfinite_rows(responses):
    ok = None
    for leaf in jax.tree.leaves(responses):
        rows = jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        ok = rows if ok is None else ok & rows
    return np.flatnonzero(~np.asarray(ok))
