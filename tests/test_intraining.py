"""In-training simulation: jvp of the real optax step vs perturbed real trajectories."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxattr
from conftest import assert_close, blobs, tanh_mlp

N, B = 12, 4


def batches(num_epochs, seed=0):
    """The fixed data order: a list of index arrays, ``B`` rows each."""
    rng = np.random.RandomState(seed)
    order = [rng.permutation(N) for _ in range(num_epochs)]
    return [o[i : i + B] for o in order for i in range(0, N, B)]


def train_reference(task, opt, params, data, schedule, weight):
    """Plain optax training; ``weight(t, idx)`` gives the step-t loss weights."""
    state = opt.init(params)
    x, y = data
    for t, idx in enumerate(schedule):
        w = weight(t, idx)
        batch_loss = lambda p: jnp.mean(
            w * jax.vmap(task.loss, (None, 0))(p, (x[idx], y[idx]))
        )
        updates, state = opt.update(jax.grad(batch_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


def finite_difference(task, opt, params, data, schedule, b, appear, horizon, eps=1e-6):
    """d theta / d eps for upweighting b at step `appear` only, `horizon` steps on."""
    stop = min(appear + horizon, len(schedule))

    def run(sign):
        weight = lambda t, idx: jnp.where(
            (jnp.asarray(idx) == b) & (t == appear), 1 + sign * N * eps, 1.0
        )
        return train_reference(task, opt, params, data, schedule[:stop], weight)

    return jax.tree.map(lambda a, c: (a - c) / (2 * eps), run(1), run(-1))


def simulate_in_training(task, opt, params, data, schedule, horizon):
    sim = jaxattr.in_training(task, opt, horizon=horizon, batch_size=B)
    opt_state = opt.init(params)
    state = sim.init(params, opt_state, N)
    x, y = data
    for idx in schedule:
        params, opt_state, state, _ = sim.step(
            state, params, opt_state, (x[idx], y[idx]), jnp.asarray(idx)
        )
    return sim.finalize(state), params


OPTIMIZERS = {
    "sgd_momentum": optax.sgd(0.1, momentum=0.9),
    "adam": optax.adam(0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("horizon", [2, 100])
def test_response_equals_finite_difference_of_real_trajectories(x64, name, horizon):
    opt = OPTIMIZERS[name]
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), N)
    task = jaxattr.classification(apply)
    schedule = batches(3)
    sketch, _ = simulate_in_training(task, opt, params, data, schedule, horizon)
    for b in (0, 5):
        appearances = [t for t, idx in enumerate(schedule) if b in idx]
        parts = [
            finite_difference(task, opt, params, data, schedule, b, t, horizon)
            for t in appearances
        ]
        expected = jax.tree.map(lambda *a: sum(a), *parts)
        got = jax.tree.map(lambda a: a[b], sketch.responses)
        assert_close(got, expected, rtol=1e-7, what=f"{name} example {b}")


def test_fused_step_is_the_plain_optax_step(x64):
    opt = OPTIMIZERS["adam"]
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), N)
    task = jaxattr.classification(apply)
    schedule = batches(2)
    _, trained = simulate_in_training(task, opt, params, data, schedule, 3)
    plain = train_reference(task, opt, params, data, schedule, lambda t, i: 1.0)
    assert_close(trained, plain, rtol=1e-12)


def test_update_leaves_training_to_the_user_and_matches_step(x64):
    opt = OPTIMIZERS["sgd_momentum"]
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), N)
    task = jaxattr.classification(apply)
    sim = jaxattr.in_training(task, opt, horizon=3, batch_size=B)
    fused, _ = simulate_in_training(task, opt, params, data, batches(2), 3)
    opt_state = opt.init(params)
    state = sim.init(params, opt_state, N)
    step = jax.jit(lambda p, s, batch: _plain_step(task, opt, p, s, batch))
    for idx in batches(2):
        batch = (data[0][idx], data[1][idx])
        state = sim.update(state, params, opt_state, batch, jnp.asarray(idx))
        params, opt_state = step(params, opt_state, batch)
    assert_close(sim.finalize(state).responses, fused.responses, rtol=1e-12)


def _plain_step(task, opt, params, opt_state, batch):
    loss = lambda p: jnp.mean(jax.vmap(task.loss, (None, 0))(p, batch))
    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def test_chunked_propagation_equals_unchunked(x64):
    opt = OPTIMIZERS["sgd_momentum"]
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), N)
    task = jaxattr.classification(apply)
    results = []
    for chunk in (None, 1, 5):
        sim = jaxattr.in_training(task, opt, horizon=3, batch_size=B, chunk_size=chunk)
        p, s = params, opt.init(params)
        state = sim.init(p, s, N)
        for idx in batches(2):
            p, s, state, _ = sim.step(state, p, s, (data[0][idx], data[1][idx]), idx)
        results.append(sim.finalize(state).responses)
    assert_close(results[1], results[0], rtol=1e-12)
    assert_close(results[2], results[0], rtol=1e-12)


def test_padding_rows_are_ignored(x64):
    opt = OPTIMIZERS["sgd_momentum"]
    params, apply = tanh_mlp(jax.random.key(0))
    x, y = blobs(jax.random.key(1), N)
    task = jaxattr.classification(apply)
    sim = jaxattr.in_training(task, opt, horizon=2, batch_size=B)
    s = opt.init(params)
    state = sim.init(params, s, N)
    idx = np.array([3, 4, 0, 0])
    ids = np.array([3, 4, -1, -1])
    p_pad, _, state, _ = sim.step(state, params, s, (x[idx], y[idx]), ids)
    ref = train_reference(
        task, opt, params, (x, y), [np.array([3, 4])], lambda t, i: 1.0
    )
    assert_close(p_pad, ref, rtol=1e-12)
    sketch = sim.finalize(state)
    assert float(jnp.abs(sketch.responses["w1"][0]).sum()) == 0.0
    assert float(jnp.abs(sketch.responses["w1"][3]).sum()) > 0.0


@pytest.fixture
def setup(x64):
    opt = OPTIMIZERS["sgd_momentum"]
    params, apply = tanh_mlp(jax.random.key(0))
    x, y = blobs(jax.random.key(1), N)
    sim = jaxattr.in_training(
        jaxattr.classification(apply), opt, horizon=2, batch_size=B
    )
    opt_state = opt.init(params)
    return sim, params, opt_state, (x, y), sim.init(params, opt_state, N)


@pytest.mark.parametrize(
    "ids, match",
    [
        (
            [0, 1, 2, 12],
            r"ids \(use -1 for padding rows\) must lie in \[0, num_train=12\); "
            r"got \[12\]",
        ),
        ([0, 1, 1, 2], r"must be unique; duplicated: \[1\]"),
        ([0, 1, 2], r"ids must have shape \(4,\)"),
        ([0.0, 1.0, 2.0, 3.0], "ids must be integers"),
    ],
)
def test_bad_ids_are_refused_before_anything_changes(setup, ids, match):
    sim, params, opt_state, (x, y), state = setup
    with pytest.raises((ValueError, TypeError), match=match):
        sim.update(state, params, opt_state, (x[:4], y[:4]), np.asarray(ids))


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (jnp.array([0, 1, 2]), ValueError, r"ids must have shape \(4,\)"),
        (jnp.array([0.0, 1.0, 2.0, 3.0]), TypeError, "ids must be integers"),
    ],
)
def test_ids_of_the_wrong_shape_or_dtype_are_refused_under_jit(
    setup, ids, error, match
):
    sim, params, opt_state, (x, y), state = setup
    with pytest.raises(error, match=match):
        jax.jit(sim.update)(state, params, opt_state, (x[:4], y[:4]), ids)


def test_bad_ids_inside_jit_are_reported_by_finalize(setup):
    sim, params, opt_state, (x, y), state = setup
    update = jax.jit(sim.update)
    state = update(state, params, opt_state, (x[:4], y[:4]), jnp.array([0, 1, 1, 2]))
    with pytest.raises(
        ValueError, match="example id 1, which is out of range .* or repeated"
    ):
        sim.finalize(state)


def test_nonfinite_loss_is_named_by_id(setup):
    sim, params, opt_state, (x, y), state = setup
    x = x.at[5].set(jnp.inf)
    state = sim.update(state, params, opt_state, (x[:4], y[:4]), jnp.arange(4))
    state = sim.update(state, params, opt_state, (x[4:8], y[4:8]), jnp.arange(4, 8))
    with pytest.raises(
        ValueError, match="loss of example id 5 was NaN or inf at simulated update 1"
    ):
        sim.finalize(state)


def test_wrong_batch_size_and_settings_are_refused(setup):
    sim, params, opt_state, (x, y), state = setup
    with pytest.raises(ValueError, match="batch_size=4 but got a batch of 3 rows"):
        sim.update(state, params, opt_state, (x[:3], y[:3]), jnp.arange(3))
    task = jaxattr.classification(lambda p, x: x)
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        jaxattr.in_training(task, optax.sgd(0.1), horizon=0, batch_size=4)
    with pytest.raises(
        TypeError, match="optimizer must be an optax GradientTransformation"
    ):
        jaxattr.in_training(task, "sgd", batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        jaxattr.in_training(task, optax.sgd(0.1), batch_size=-2)
