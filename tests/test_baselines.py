"""Tests of jaxattr.baselines against hand-written formulas and loops, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxattr
from jaxattr import baselines

N, DIM, CLASSES = 20, 3, 3


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _linear(w, x):
    return x @ w


TASKS = {"mlp": jaxattr.classification(_mlp), "linear": jaxattr.classification(_linear)}


def _data(n=N, seed=0):
    """Data from numpy (no random-number kernels to compile)."""
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    y = (np.argmax(x, axis=1) + (np.arange(n) % 7 == 0)) % CLASSES  # a few noisy
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def _init(kind, seed):
    rng = np.random.default_rng(100 + seed)
    if kind == "linear":
        return jnp.asarray(rng.normal(size=(DIM, CLASSES)) * 0.3)
    return {
        "w1": jnp.asarray(rng.normal(size=(DIM, 4)) * 0.5),
        "b1": jnp.zeros(4),
        "w2": jnp.asarray(rng.normal(size=(4, CLASSES)) * 0.5),
        "b2": jnp.zeros(CLASSES),
    }


@functools.cache
def _trained(kind="mlp", seed=0, steps=300):
    """Full-batch gradient descent; cached, as every test here runs in float64."""
    task, data = TASKS[kind], _data()
    mean_loss = lambda p: jnp.mean(jax.vmap(task.loss, (None, 0))(p, data))

    @jax.jit
    def run(params):
        step = lambda _, p: jax.tree.map(
            lambda a, g: a - 0.5 * g, p, jax.grad(mean_loss)(p)
        )
        return jax.lax.fori_loop(0, steps, step, params)

    return run(_init(kind, seed))


@functools.cache
def _grad_fn(fn):
    return jax.jit(lambda p, z: ravel_pytree(jax.grad(fn)(p, z))[0])


def _grads(fn, params, data):
    """Per-example flat gradients by a Python loop."""
    rows = [(data[0][i], data[1][i]) for i in range(len(data[1]))]
    return np.stack([np.asarray(_grad_fn(fn)(params, z)) for z in rows])


def _one_minus_p(params, data, apply):
    probs = jax.nn.softmax(jax.vmap(apply, (None, 0))(params, data[0]))
    return 1.0 - np.asarray(probs)[np.arange(len(data[1])), data[1]]


def _close(a, b, tol=1e-8):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _trak_by_hand(kind, models, train, queries, lam):
    task, apply = TASKS[kind], {"mlp": _mlp, "linear": _linear}[kind]
    total, reweight = 0.0, 0.0
    for params in models:
        phi = _grads(task.margin, params, train)
        phi_q = _grads(task.margin, params, queries)
        kernel = phi.T @ phi + lam * np.eye(phi.shape[1])
        inv = np.linalg.pinv(kernel, rcond=1e-10, hermitian=True)
        total = total + phi_q @ inv @ phi.T
        reweight = reweight + _one_minus_p(params, train, apply)
    m = len(models)
    return len(train[1]) / m * total * (reweight / m)


# TRAK -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "linear"])  # more / fewer params than N
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_unprojected_trak_equals_the_formula_by_hand(kind, lam):
    params, train, queries = _trained(kind), _data(), _data(5, seed=1)
    scorer = baselines.trak(
        TASKS[kind], [params], train, key=None, proj_dim=None, damping=lam
    )
    _close(scorer(queries), _trak_by_hand(kind, [params], train, queries, lam), 1e-6)


def test_trak_ensemble_averages_models_as_by_hand():
    models = [_trained("mlp", seed=s) for s in range(2)]
    train, queries = _data(), _data(4, seed=1)
    scorer = baselines.trak(
        TASKS["mlp"],
        models,
        train,
        key=jax.random.PRNGKey(0),
        proj_dim=None,
        damping=0.05,
    )
    _close(scorer(queries), _trak_by_hand("mlp", models, train, queries, 0.05), 1e-6)


def test_trak_projected_to_more_dims_than_params_is_exact_without_damping():
    params, train, queries = _trained("linear"), _data(), _data(5, seed=1)
    task = TASKS["linear"]
    exact = baselines.trak(task, [params], train, key=None, proj_dim=None)(queries)
    projected = baselines.trak(
        task, [params], train, key=jax.random.PRNGKey(3), proj_dim=40
    )(queries)
    _close(projected, exact, 1e-6)


def test_trak_with_a_large_projection_agrees_with_unprojected_when_damped():
    params, train, queries = _trained("mlp"), _data(), _data(5, seed=1)
    task = TASKS["mlp"]
    exact = baselines.trak(task, [params], train, key=None, proj_dim=None, damping=0.1)(
        queries
    )
    big = baselines.trak(
        task, [params], train, key=jax.random.PRNGKey(0), proj_dim=20_000, damping=0.1
    )(queries)
    r = np.corrcoef(np.ravel(exact), np.ravel(big))[0, 1]
    assert r > 0.99


def test_streamed_projection_equals_the_held_matrix():
    key = jax.random.PRNGKey(5)
    grads = jnp.asarray(np.random.default_rng(6).normal(size=(7, 2100)))
    held = grads @ baselines.projection_matrix(key, 2100, 16, grads.dtype)
    _close(baselines.project_streaming(grads, key, 16), held, 1e-10)
    params, train, queries = _trained("mlp"), _data(), _data(3, seed=1)
    build = lambda budget: baselines.trak(
        TASKS["mlp"],
        [params],
        train,
        key=key,
        proj_dim=8,
        damping=0.1,
        projection_bytes=budget,
    )
    _close(build(0)(queries), build(2**20)(queries), 1e-10)


def test_trak_records_build_costs_and_exposes_the_query_side():
    params, train, queries = _trained("mlp"), _data(), _data(3, seed=1)
    scorer = baselines.trak(
        TASKS["mlp"], [params, params], train, key=jax.random.PRNGKey(0), proj_dim=8
    )
    assert {"train_gradients", "kernel_inverse"} <= set(scorer.build_seconds)
    features = scorer.query_features(queries)
    assert features.shape == (3, 16)
    _close(scorer.scores_from_features(features), scorer(queries))


# Gradient products --------------------------------------------------------------


def test_grad_dot_equals_a_python_loop():
    params, train, queries = _trained(), _data(), _data(4, seed=1)
    task = TASKS["mlp"]
    want = -_grads(task.margin, params, queries) @ _grads(task.loss, params, train).T
    _close(baselines.grad_dot(task, params, train)(queries), want)
    neg = baselines.grad_dot(task, params, train, measure=task.neg_loss)(queries)
    _close(
        neg,
        -_grads(task.neg_loss, params, queries) @ _grads(task.loss, params, train).T,
    )


def test_tracin_is_the_learning_rate_weighted_sum_of_grad_dots():
    ckpts = [_trained(steps=s) for s in (20, 300)]
    lrs = [0.5, 0.1]
    train, queries, task = _data(), _data(4, seed=1), TASKS["mlp"]
    want = sum(
        -lr * _grads(task.margin, p, queries) @ _grads(task.loss, p, train).T
        for p, lr in zip(ckpts, lrs, strict=True)
    )
    _close(baselines.tracin(task, ckpts, lrs, train)(queries), want)


# Influence functions ------------------------------------------------------------


def _ggn_by_hand(task, params, data):
    """``mean_i J_i^T H_i J_i`` by a Python loop over examples."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def pieces(z):
        jac = jax.jacrev(lambda w: task.outputs(unravel(w), z))(flat)
        return jac, jax.hessian(task.output_loss)(task.outputs(params, z), z)

    total = 0.0
    for i in range(len(data[1])):
        jac, h_out = map(np.asarray, pieces((data[0][i], data[1][i])))
        total = total + jac.T @ h_out @ jac
    return total / len(data[1])


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_explicit_influence_equals_the_formula_by_hand(curvature):
    params, train, queries, task = _trained(), _data(), _data(4, seed=1), TASKS["mlp"]
    if curvature == "ggn":
        matrix = _ggn_by_hand(task, params, train)
    else:
        flat, unravel = ravel_pytree(params)
        mean_loss = lambda w: jnp.mean(
            jax.vmap(task.loss, (None, 0))(unravel(w), train)
        )
        matrix = np.asarray(jax.jit(jax.hessian(mean_loss))(flat))
    lam = 0.05
    inv = np.linalg.inv(matrix + lam * np.eye(len(matrix)))
    want = (
        -_grads(task.margin, params, queries) @ inv @ _grads(task.loss, params, train).T
    )
    got = baselines.influence_explicit(
        task, params, train, damping=lam, curvature=curvature
    )(queries)
    _close(got, want, 1e-7)


def test_cg_influence_equals_explicit_inverse_influence():
    params, train, queries, task = _trained(), _data(), _data(5, seed=1), TASKS["mlp"]
    explicit = baselines.influence_explicit(task, params, train, damping=0.01)
    cg = baselines.influence_cg(
        task, params, train, damping=0.01, max_iters=200, tol=1e-12, query_chunk=3
    )
    _close(cg(queries), explicit(queries), 1e-7)


# Conformance: every baseline ------------------------------------------------------


def _builders():
    key = jax.random.PRNGKey(0)
    return {
        "trak": lambda t, p, d, **kw: baselines.trak(
            t, [p], d, key=key, proj_dim=16, damping=0.01, **kw
        ),
        "trak_unprojected": lambda t, p, d, **kw: baselines.trak(
            t, [p], d, key=key, proj_dim=None, damping=0.01, **kw
        ),
        "grad_dot": baselines.grad_dot,
        "tracin": lambda t, p, d, **kw: baselines.tracin(
            t, [p, p], [0.1, 0.2], d, **kw
        ),
        "explicit": lambda t, p, d, **kw: baselines.influence_explicit(
            t, p, d, damping=0.01, **kw
        ),
        "cg": lambda t, p, d, **kw: baselines.influence_cg(
            t, p, d, damping=0.01, tol=1e-10, max_iters=100, **kw
        ),
    }


@pytest.mark.parametrize("name", list(_builders()))
def test_conformance(name):
    params, train, task = _trained(), _data(), TASKS["mlp"]
    ids = 100 + np.arange(N)[::-1]
    scorer = _builders()[name](task, params, train, ids=ids, query_chunk=7)
    queries = _data(9, seed=2)
    scores = np.asarray(scorer(queries))
    assert scores.shape == (9, N) and np.all(np.isfinite(scores))

    top = scorer.top_k(queries, 3)
    order = np.argsort(-scores, axis=1, kind="stable")
    np.testing.assert_array_equal(np.asarray(top.proponents), ids[order[:, :3]])
    _close(top.proponent_scores, np.take_along_axis(scores, order[:, :3], 1))
    _close(top.opponent_scores, np.sort(scores, axis=1)[:, :3])

    own = np.asarray(scorer.self_influence(train))
    _close(own, np.diag(np.asarray(scorer(train))), 1e-7)
    assert np.all(own > 0)  # a duplicate of b as the query: b helps it

    flipped = (train[0], (train[1] + 1) % CLASSES)
    against = np.diag(np.asarray(scorer(flipped)))
    # The same input with another label: b hurts it, on average and mostly.
    assert np.mean(against) < 0 and np.mean(against < 0) > 0.5


def test_baselines_reject_bad_arguments():
    params, train = _trained(), _data()
    task = TASKS["mlp"]
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        baselines.tracin(task, [params], [0.1, 0.2], train)
    with pytest.raises(ValueError, match="influence_cg"):
        baselines.influence_explicit(task, params, train, damping=0.1, max_params=10)
    with pytest.raises(ValueError, match="damping"):
        baselines.influence_cg(task, params, train, damping=0.0)
    with pytest.raises(TypeError, match="list of parameter pytrees"):
        baselines.trak(task, params, train, key=jax.random.PRNGKey(0))
    no_margin = jaxattr.Task(task.outputs, task.output_loss)
    with pytest.raises(ValueError, match="margin"):
        baselines.trak(no_margin, [params], train, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="k=30"):
        baselines.grad_dot(task, params, train).top_k(train, 30)
