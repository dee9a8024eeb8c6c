"""Tests of jaxattr.evaluate: retraining equivalences, caching and the metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxattr
from jaxattr import evaluate

scipy_stats = pytest.importorskip("scipy.stats")

N, DIM, CLASSES, BATCH, EPOCHS = 23, 4, 3, 5, 3


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (DIM, 6)) * 0.5,
        "b1": jnp.zeros(6),
        "w2": jax.random.normal(k2, (6, CLASSES)) * 0.5,
    }


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _make_setup(lr=0.1, batching="compact", **kw):
    return evaluate.TrainSetup(
        init_fn=_init,
        apply_fn=_apply,
        optimizer=optax.sgd(lr, momentum=0.9),
        epochs=EPOCHS,
        batch_size=BATCH,
        description="tanh mlp 4-6-3",
        batching=batching,
        **kw,
    )


# One instance per configuration, so that compiled training is reused.
SETUPS = {b: _make_setup(batching=b) for b in ("compact", "fixed")}


def _setup(batching="compact"):
    return SETUPS[batching]


def _data(n=N, seed=0):
    """Data from numpy (no random-number kernels to compile)."""
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    y = np.argmax(x[:, :CLASSES] + 0.3 * x[:, 1:], axis=1)
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def _measure(params, queries):
    task = jaxattr.classification(_apply)
    margin = jax.vmap(task.margin, (None, 0))(params, queries)
    return margin, jax.vmap(task.neg_loss, (None, 0))(params, queries)


def _half_subsets(num, seed=3):
    """Subsets of 12 of the 23 examples: one compiled schedule for all tests."""
    return evaluate.random_subsets(jax.random.PRNGKey(seed), num, N)


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# Retraining -------------------------------------------------------------------


def test_vmapped_retraining_equals_a_loop_of_single_models(x64):
    data, queries = _data(), _data(4, seed=1)
    weights = _half_subsets(3)
    weights[2, np.flatnonzero(weights[2])[8:]] = 0.0  # 8 members: an empty step
    key = jax.random.PRNGKey(7)
    setup = _setup()
    got = evaluate.retrain(
        setup, data, queries, weights, key, num_seeds=2, models_per_chunk=4
    )
    assert got.margin.shape == (3, 2, 4) and got.neg_loss.shape == (3, 2, 4)
    for s in range(3):
        for j in range(2):
            params = evaluate.train_model(
                setup, data, jax.random.fold_in(key, j), weights[s]
            )
            margin, neg_loss = _measure(params, queries)
            _close(got.margin[s, j], margin)
            _close(got.neg_loss[s, j], neg_loss)


def _reference_train(setup, data, key, removed):
    """Plain-Python SGD over the epoch orders documented in jaxattr.evaluate."""
    x, y = data
    init_key, order_key, _ = jax.random.split(key, 3)
    params = setup.init_fn(init_key)
    state = setup.optimizer.init(params)
    for e in range(setup.epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, e), N))
        for rows in _batches(perm, set(removed), setup.batching):
            grads = _batch_grad(params, x[rows], y[rows])
            updates, state = setup.optimizer.update(grads, state)
            params = optax.apply_updates(params, updates)
    return params


@jax.jit
@jax.grad
def _batch_grad(params, x, y):
    """Gradient of the plain mean cross-entropy of one minibatch."""
    return jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(_apply(params, x), y)
    )


def _batches(perm, removed, batching):
    if batching == "compact":
        kept = np.array([i for i in perm if i not in removed])
        return [kept[i : i + BATCH] for i in range(0, len(kept), BATCH)]
    slots = [perm[i : i + BATCH] for i in range(0, len(perm), BATCH)]
    batches = [np.array([i for i in s if i not in removed]) for s in slots]
    return [b for b in batches if len(b)]


@pytest.mark.parametrize("batching", ["compact", "fixed"])
def test_zero_weights_equal_training_without_those_examples(x64, batching):
    data, key = _data(), jax.random.PRNGKey(11)
    order_key = jax.random.split(key, 3)[1]
    first = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, 0), N))
    # A whole batch and 6 more, so that 12 examples remain (as in _half_subsets).
    removed = [int(i) for i in first[:BATCH]] + [int(i) for i in first[-6:]]
    weights = np.ones(N)
    weights[removed] = 0.0
    setup = _setup(batching=batching)
    got = evaluate.train_model(setup, data, key, weights)
    want = _reference_train(setup, data, key, removed)
    jax.tree.map(_close, got, want)


def test_train_models_matches_train_model(x64):
    data = _data()
    weights = _half_subsets(3, seed=0)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    stacked = evaluate.train_models(_setup(), data, weights, keys, models_per_chunk=2)
    for m, params in enumerate(evaluate.unstack(stacked)):
        want = evaluate.train_model(_setup(), data, keys[m], weights[m])
        jax.tree.map(_close, params, want)


def test_dropout_training_is_keyed_and_differs_from_plain(x64):
    def train_apply(p, x, key):
        keep = jax.random.bernoulli(key, 0.8, (6,))
        return (jnp.tanh(x @ p["w1"] + p["b1"]) * keep / 0.8) @ p["w2"]

    data, key, w = _data(), jax.random.PRNGKey(0), _half_subsets(1)[0]
    setup = _make_setup(train_apply_fn=train_apply)
    a = evaluate.train_model(setup, data, key, w)
    jax.tree.map(_close, a, evaluate.train_model(setup, data, key, w))
    plain = evaluate.train_model(_setup(), data, key, w)
    assert not np.allclose(a["w2"], plain["w2"])


def test_cache_hits_on_second_call_and_misses_on_changed_config(tmp_path, monkeypatch):
    from jaxattr.evaluate import _retrain

    calls = []

    def fake_measure_all(setup, data, queries, w, key, num_seeds, size, progress):
        calls.append(1)
        values = np.random.default_rng(len(calls)).normal(size=(len(w), 1, 3))
        return dict(margin=values, neg_loss=-values)

    monkeypatch.setattr(_retrain, "_measure_all", fake_measure_all)
    data, queries = _data(), _data(3, seed=1)
    weights = evaluate.random_subsets(jax.random.PRNGKey(0), 2, N)
    key = jax.random.PRNGKey(1)
    run = lambda setup, w=weights: evaluate.retrain(
        setup, data, queries, w, key, cache_dir=tmp_path
    )
    first = run(_setup())
    second = run(_setup())
    assert len(calls) == 1
    np.testing.assert_array_equal(first.margin, second.margin)
    run(_make_setup(lr=0.05))  # optimizer hyperparameter changed, same description
    run(_setup(), weights[::-1])
    assert len(calls) == 3
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_trainsetup_and_retrain_reject_bad_arguments():
    with pytest.raises(ValueError, match="batching"):
        _make_setup(batching="shuffled")
    with pytest.raises(TypeError, match="optax"):
        evaluate.TrainSetup(_init, _apply, "sgd", 1, 4)
    with pytest.raises(ValueError, match="epochs"):
        evaluate.TrainSetup(_init, _apply, optax.sgd(0.1), 0, 4)
    data = _data()
    with pytest.raises(ValueError, match="num_train=23"):
        evaluate.retrain(_setup(), data, data, np.ones((2, 5)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="integer class labels"):
        evaluate.train_model(_setup(), (data[0], data[1] * 1.0), jax.random.PRNGKey(0))


# Subsets and label noise -------------------------------------------------------


def test_random_subsets_are_keyed_and_of_equal_size():
    a = evaluate.random_subsets(jax.random.PRNGKey(0), 5, 40, 0.5)
    b = evaluate.random_subsets(jax.random.PRNGKey(0), 5, 40, 0.5)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 40) and np.all(a.sum(1) == 20)
    assert len({tuple(r) for r in a}) == 5


def test_loo_weights_layout():
    w = evaluate.loo_weights(6, [4, 1])
    assert w.shape == (3, 6) and np.all(w[0] == 1)
    assert w[1, 4] == 0 and w[2, 1] == 0 and w.sum() == 16
    with pytest.raises(ValueError, match="distinct"):
        evaluate.loo_weights(6, [1, 1])


def test_flip_labels_flips_the_requested_share_to_other_classes():
    y = np.arange(50) % 4
    noisy, flipped = evaluate.flip_labels(jax.random.PRNGKey(0), y, 0.2, 4)
    assert flipped.sum() == 10
    assert np.all(noisy[flipped] != y[flipped]) and np.all(
        noisy[~flipped] == y[~flipped]
    )
    assert noisy.min() >= 0 and noisy.max() < 4
    with pytest.raises(ValueError, match="num_classes"):
        evaluate.flip_labels(jax.random.PRNGKey(0), y, 0.2, 3)


# Metrics -----------------------------------------------------------------------


def _metric_inputs(q=7, n=15, s=9, seeds=3):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(q, n))
    scores[4] = 0.0  # constant predictions: skipped
    weights = evaluate.random_subsets(jax.random.PRNGKey(1), s, n)
    actual = np.round(rng.normal(size=(s, seeds, q)), 1)  # ties
    actual[:, :, 2] = 0.5  # constant actual: skipped
    return scores, weights, actual


def test_lds_equals_a_scipy_spearman_loop():
    scores, weights, actual = _metric_inputs()
    got = evaluate.lds(scores, weights, actual)
    mean_actual = actual.mean(1)
    want = []
    for q in range(scores.shape[0]):
        predicted = weights @ scores[q]
        if np.ptp(predicted) == 0 or np.ptp(mean_actual[:, q]) == 0:
            want.append(np.nan)
        else:
            want.append(scipy_stats.spearmanr(predicted, mean_actual[:, q])[0])
    np.testing.assert_allclose(got.per_query, want, rtol=1e-12, atol=1e-12)
    assert got.num_skipped == 2
    assert got.mean == pytest.approx(np.nanmean(want))
    same = evaluate.lds(scores, weights, mean_actual)
    np.testing.assert_allclose(same.per_query, got.per_query)
    measured = evaluate.Measurements(margin=actual, neg_loss=-actual)
    from_margin = evaluate.lds(scores, weights, measured)
    from_loss = evaluate.lds(-scores, weights, measured, target="neg_loss")
    np.testing.assert_allclose(from_margin.per_query, got.per_query)
    np.testing.assert_allclose(from_loss.per_query, got.per_query)


def test_loo_equals_a_scipy_pearson_loop_with_the_documented_sign():
    rng = np.random.default_rng(1)
    q, n, removed = 5, 12, np.array([3, 0, 7, 9, 11])
    scores = rng.normal(size=(q, n))
    actual = rng.normal(size=(1 + len(removed), 2, q))
    got = evaluate.loo(scores, removed, actual)
    mean = actual.mean(1)
    want = [
        scipy_stats.pearsonr(scores[i, removed], -(mean[1:, i] - mean[0, i]))[0]
        for i in range(q)
    ]
    np.testing.assert_allclose(got.per_query, want, rtol=1e-12)
    # An exact first-order prediction, change = -tau / n, scores +1.
    exact = np.concatenate([mean[:1], mean[:1] - scores[:, removed].T / n])
    assert evaluate.loo(scores, removed, exact).mean == pytest.approx(1.0)


def test_auc_equals_a_brute_force_pairwise_count():
    rng = np.random.default_rng(2)
    scores = np.round(rng.normal(size=40), 1)
    positives = rng.random(40) < 0.3
    pos, neg = scores[positives], scores[~positives]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg).sum()
    assert evaluate.auc(scores, positives) == pytest.approx(wins / pos.size / neg.size)
    with pytest.raises(ValueError, match="positives and negatives"):
        evaluate.auc(scores, np.zeros(40, bool))


def test_rankdata_matches_scipy_with_ties():
    a = np.array([[3.0, 1.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 5.0, -1.0]])
    for row, got in zip(a, evaluate.rankdata(a), strict=True):
        np.testing.assert_array_equal(got, scipy_stats.rankdata(row))


def test_metrics_reject_mismatched_shapes():
    scores, weights, actual = _metric_inputs()
    with pytest.raises(ValueError, match="num_queries"):
        evaluate.lds(scores[:3], weights, actual)
    with pytest.raises(ValueError, match="1 \\+ len"):
        evaluate.loo(scores, np.array([1, 2]), actual)
