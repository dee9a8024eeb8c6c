"""Post-hoc recursion: convergence to the explicit damped inverse, equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxattr
from conftest import assert_close
from jaxattr._posthoc import response_fn

LAM = 0.05


def explicit_responses(task, params, data, lam, curvature):
    """``-(G + lam I)^-1 grad loss_b`` for every b, with G built as a matrix."""
    flat, unravel = ravel_pytree(params)
    op = curvature.operator(params, data)
    g_mat = jax.vmap(lambda e: ravel_pytree(op(unravel(e)))[0])(jnp.eye(flat.size))
    grads = jax.vmap(lambda z: ravel_pytree(jax.grad(task.loss)(params, z))[0])(data)
    return -jnp.linalg.solve(g_mat + lam * jnp.eye(flat.size), grads.T).T


def flat_rows(sketch):
    return jax.vmap(lambda r: ravel_pytree(r)[0])(sketch.responses)


def test_converges_to_explicit_inverse_as_horizon_grows(tiny):
    task, params, data = tiny
    curvature = task.ggn(batch_size=None)
    exact = explicit_responses(task, params, data, LAM, curvature)
    errors = []
    for horizon in (5, 50, 500, 3000):
        sketch = jaxattr.simulate(
            task,
            params,
            data,
            key=jax.random.key(0),
            horizon=horizon,
            damping=LAM,
            curvature=curvature,
        )
        diff = flat_rows(sketch) - exact
        errors.append(float(jnp.linalg.norm(diff) / jnp.linalg.norm(exact)))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-10, errors


def test_readouts_agree_with_each_other_and_explicit_influence(tiny):
    task, params, data = tiny
    curvature = task.ggn(batch_size=None)
    sketch = jaxattr.simulate(
        task,
        params,
        data,
        key=jax.random.key(0),
        horizon=3000,
        damping=LAM,
        curvature=curvature,
    )
    exact = explicit_responses(task, params, data, LAM, curvature)
    grad_m = jax.vmap(lambda z: ravel_pytree(jax.grad(task.margin)(params, z))[0])
    influence = grad_m(data) @ exact.T  # (queries, train)
    scores = {}
    for readout in (
        jaxattr.JVP(),
        jaxattr.CentralDifference(),
        jaxattr.ForwardDifference(),
    ):
        scores[readout.name] = jaxattr.scorer(
            task.margin, params, sketch, readout=readout
        )(data)
    assert_close(scores["jvp"], influence, rtol=1e-9, what="jvp vs explicit")
    assert_close(scores["central_difference"], scores["jvp"], rtol=1e-8)
    assert_close(scores["forward_difference"], scores["jvp"], rtol=1e-6)


def test_vmapped_equals_python_loop(tiny):
    task, params, data = tiny
    curvature = task.ggn(batch_size=8)
    key = jax.random.key(3)
    sketch = jaxattr.simulate(
        task,
        params,
        data,
        key=key,
        horizon=20,
        damping=LAM,
        step_size=0.3,
        curvature=curvature,
    )
    respond = jax.jit(
        response_fn(task.loss, curvature, params, data, key, 20, LAM, 0.3)
    )
    for b in range(0, 20, 3):
        single = respond(jax.tree.map(lambda a: a[b], data))
        row = jax.tree.map(lambda a: a[b], sketch.responses)
        assert_close(row, single, rtol=1e-12, what=f"example {b}")


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_chunked_equals_unchunked(tiny, chunk_size):
    task, params, data = tiny
    kwargs = dict(
        key=jax.random.key(4), horizon=15, damping=LAM, curvature=task.ggn(batch_size=6)
    )
    whole = jaxattr.simulate(task, params, data, chunk_size=20, **kwargs)
    part = jaxattr.simulate(task, params, data, chunk_size=chunk_size, **kwargs)
    assert_close(part.responses, whole.responses, rtol=1e-12)


def test_same_key_bitwise_other_key_differs(tiny):
    task, params, data = tiny
    run = lambda seed: jaxattr.simulate(
        task,
        params,
        data,
        key=jax.random.key(seed),
        horizon=10,
        damping=LAM,
        curvature=task.ggn(batch_size=5),
    )
    a, b, c = run(0), run(0), run(1)
    score = lambda s: np.asarray(jaxattr.scorer(task.margin, params, s)(data))
    np.testing.assert_array_equal(score(a), score(b))
    assert not np.allclose(score(a), score(c))
    # The difference comes from the curvature minibatches, not the step size.
    curvature = task.ggn(batch_size=5)
    n = 20
    idx = lambda seed: curvature.sample(jnp.arange(n), n, jax.random.key(seed), 0)
    assert not np.array_equal(idx(0), idx(1))


def test_fixed_minibatch_is_the_same_every_step(tiny):
    curvature = tiny[0].ggn(batch_size=5, resample=False)
    draws = [
        curvature.sample(jnp.arange(20), 20, jax.random.key(0), k) for k in range(3)
    ]
    np.testing.assert_array_equal(draws[0], draws[2])


def test_three_identical_examples_without_damping_are_finite(tiny):
    task, params, (x, y) = tiny
    data = (jnp.stack([x[0]] * 3), jnp.stack([y[0]] * 3))
    sketch = jaxattr.simulate(
        task,
        params,
        data,
        key=jax.random.key(0),
        horizon=200,
        damping=0.0,
        curvature=task.ggn(batch_size=None),
    )
    scores = jaxattr.scorer(task.margin, params, sketch)(data)
    assert np.all(np.isfinite(scores))
    assert_close(scores[:, 0], scores[:, 1], rtol=1e-10)


def test_margin_curvature_matches_its_explicit_inverse(tiny):
    task, params, data = tiny
    curvature = task.margin_ggn(batch_size=None)
    sketch = jaxattr.simulate(
        task,
        params,
        data,
        key=jax.random.key(0),
        horizon=4000,
        damping=LAM,
        curvature=curvature,
    )
    exact = explicit_responses(task, params, data, LAM, curvature)
    assert_close(flat_rows(sketch), exact, rtol=1e-8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping=-1e-3), "damping must be a finite number >= 0"),
        (dict(damping=float("nan")), "damping"),
        (dict(horizon=0), "horizon must be a positive integer"),
        (dict(step_size=-1.0), "step_size"),
        (dict(step_size="big"), "step_size must be a positive number or 'auto'"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(ids=np.array([0, 1] * 10)), r"ids must be unique; duplicated: \[0, 1\]"),
        (dict(ids=np.arange(19)), "ids has 19 entries but train_data has 20"),
        (dict(ids=np.linspace(0, 1, 20)), "ids must be a 1-D array of integers"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny, kwargs, match):
    task, params, data = tiny
    kwargs = dict(dict(key=jax.random.key(0), horizon=3), **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        jaxattr.simulate(task, params, data, **kwargs)


def test_nonfinite_loss_names_the_example(tiny):
    task, params, (x, y) = tiny
    x = x.at[7].set(jnp.nan)
    ids = np.arange(100, 120)
    with pytest.raises(ValueError, match=r"example id 107 \(row 7\)"):
        jaxattr.simulate(
            task, params, (x, y), key=jax.random.key(0), horizon=3, ids=ids
        )


def test_mismatched_data_shapes_raise(tiny):
    task, params, (x, y) = tiny
    with pytest.raises(ValueError, match="leading"):
        jaxattr.simulate(task, params, (x, y[:10]), key=jax.random.key(0), horizon=3)


@pytest.mark.parametrize("which", ["ggn", "margin_ggn"])
@pytest.mark.parametrize("horizon", [7, 300])
def test_low_rank_closed_form_equals_running_the_recursion(tiny, which, horizon):
    task, params, data = tiny
    curvature = getattr(task, which)(batch_size=12, resample=False)
    kwargs = dict(key=jax.random.key(5), horizon=horizon, damping=LAM)
    looped = jaxattr.simulate(task, params, data, curvature=curvature, **kwargs)
    closed = jaxattr.simulate(
        task, params, data, curvature=jaxattr.LowRank(curvature), **kwargs
    )
    assert_close(closed.responses, looped.responses, rtol=1e-9)
    assert dict(closed.info.settings)["step_size"] == pytest.approx(
        dict(looped.info.settings)["step_size"], rel=1e-6
    )


def test_low_rank_infinite_horizon_is_the_damped_inverse(tiny):
    task, params, data = tiny
    curvature = task.ggn(batch_size=None)
    closed = jaxattr.simulate(
        task,
        params,
        data,
        key=jax.random.key(0),
        horizon=None,
        damping=LAM,
        curvature=jaxattr.LowRank(curvature),
    )
    exact = explicit_responses(task, params, data, LAM, curvature)
    assert_close(flat_rows(closed), exact, rtol=1e-9)


def test_low_rank_truncation_keeps_the_top_directions(tiny):
    task, params, data = tiny
    curvature = task.margin_ggn(batch_size=None)
    basis = jaxattr._lowrank.eigenbasis(
        jaxattr.LowRank(curvature, rank=3), params, data, jax.random.key(0)
    )
    full = jaxattr._lowrank.eigenbasis(
        jaxattr.LowRank(curvature), params, data, jax.random.key(0)
    )
    assert basis.values.shape == (3,)
    assert_close(basis.values, full.values[:3], rtol=1e-10)
    gram = basis.vectors @ basis.vectors.T
    assert_close(gram, jnp.eye(3), atol=1e-10)


def test_infinite_horizon_needs_low_rank_and_damping(tiny):
    task, params, data = tiny
    with pytest.raises(
        ValueError, match="horizon=None .* needs curvature=jaxattr.LowRank"
    ):
        jaxattr.simulate(
            task,
            params,
            data,
            key=jax.random.key(0),
            horizon=None,
            curvature=task.ggn(),
        )
    with pytest.raises(ValueError, match="horizon=None needs damping > 0"):
        jaxattr.simulate(
            task,
            params,
            data,
            key=jax.random.key(0),
            horizon=None,
            damping=0.0,
            curvature=jaxattr.LowRank(task.ggn(None)),
        )


def test_relative_damping_is_a_fraction_of_the_top_eigenvalue(tiny):
    task, params, data = tiny
    curvature = jaxattr.LowRank(task.margin_ggn(batch_size=None))
    kwargs = dict(key=jax.random.key(0), horizon=40, curvature=curvature)
    rel = jaxattr.simulate(task, params, data, damping=jaxattr.Relative(0.1), **kwargs)
    settings = dict(rel.info.settings)
    lam = 0.1 * settings["lambda_max"]
    assert settings["damping"] == pytest.approx(lam)
    absolute = jaxattr.simulate(task, params, data, damping=lam, **kwargs)
    assert_close(rel.responses, absolute.responses, rtol=1e-12)


def test_default_curvature_is_the_fixed_low_rank_margin_curvature(tiny):
    task, _, _ = tiny
    chosen = jaxattr.default_curvature(task, 20)
    assert isinstance(chosen, jaxattr.LowRank)
    assert chosen.curvature.name == "margin_ggn" and not chosen.curvature.resample
    plain = jaxattr.Task(task.outputs, task.output_loss)
    assert isinstance(jaxattr.default_curvature(plain, 20), jaxattr.GaussNewton)


def test_a_precomputed_eigenbasis_is_reused(tiny):
    task, params, data = tiny
    lowrank = jaxattr.LowRank(task.margin_ggn(batch_size=None))
    basis = jaxattr.eigenbasis(lowrank, params, data, jax.random.key(0))
    kwargs = dict(key=jax.random.key(0), horizon=30, damping=jaxattr.Relative(0.01))
    again = jaxattr.simulate(task, params, data, curvature=basis, **kwargs)
    fresh = jaxattr.simulate(task, params, data, curvature=lowrank, **kwargs)
    assert_close(again.responses, fresh.responses, rtol=1e-12)
