"""Forward-only scoring: sign, readout agreement, chunking, callbacks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxattr
from conftest import assert_close, blobs, tanh_mlp


@pytest.fixture(scope="module")
def trained(x64_module):
    """A tiny MLP trained to fit 40 blob examples, with its converged sketch."""
    params, apply = tanh_mlp(jax.random.key(0), hidden=8)
    data = blobs(jax.random.key(1), 40, noise=1.5)
    task = jaxattr.classification(apply)
    opt = optax.adam(0.05)
    state = opt.init(params)
    loss = lambda p: jnp.mean(jax.vmap(task.loss, (None, 0))(p, data))
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
    for _ in range(500):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    sketch = jaxattr.simulate(
        task,
        params,
        data,
        key=jax.random.key(0),
        horizon=2000,
        damping=1e-2,
        curvature=task.ggn(batch_size=None),
    )
    return task, params, data, sketch


def test_duplicate_query_ranks_its_training_example_first(trained):
    task, params, (x, y), sketch = trained
    losses = jax.vmap(task.loss, (None, 0))(params, (x, y))
    hardest = np.argsort(-np.asarray(losses))[:5]
    score = jaxattr.scorer(task.margin, params, sketch)
    same = score((x[hardest], y[hardest]))
    other = score((x[hardest], (y[hardest] + 1) % 3))
    for row, b in enumerate(hardest):
        assert int(np.argmax(same[row])) == b
        assert same[row, b] > 0
        assert other[row, b] < 0


def test_removal_prediction_has_the_documented_sign_and_units(trained):
    task, params, data, sketch = trained
    b, n = 7, 40
    scores = jaxattr.scorer(task.margin, params, sketch)(data)
    # Upweighting by eps = -1/n approximates removal: delta ~= -score / n.
    predicted = -scores[:, b] / n
    shifted = jax.tree.map(lambda p, r: p - r[b] / n, params, sketch.responses)
    actual = jax.vmap(task.margin, (None, 0))(shifted, data) - jax.vmap(
        task.margin, (None, 0)
    )(params, data)
    assert np.corrcoef(predicted, actual)[0, 1] > 0.99


@pytest.mark.parametrize(
    "query_chunk, train_chunk", [(1, 40), (32, 40), (7, 3), (40, 1)]
)
def test_chunking_and_batch_size_do_not_change_scores(
    trained, query_chunk, train_chunk
):
    task, params, data, sketch = trained
    whole = jaxattr.scorer(task.margin, params, sketch, query_chunk=40, train_chunk=40)
    part = jaxattr.scorer(
        task.margin, params, sketch, query_chunk=query_chunk, train_chunk=train_chunk
    )
    assert_close(part(data), whole(data), rtol=1e-12)


def test_one_query_at_a_time_equals_a_batch_of_32(trained):
    task, params, data, sketch = trained
    score = jaxattr.scorer(task.margin, params, sketch, query_chunk=32)
    batch = score(jax.tree.map(lambda a: a[:32], data))
    singles = jnp.concatenate(
        [score(jax.tree.map(lambda a: a[i : i + 1], data)) for i in range(32)]
    )
    assert_close(singles, batch, rtol=1e-12)


@pytest.mark.parametrize(
    "readout", [jaxattr.CentralDifference(), jaxattr.ForwardDifference()]
)
def test_difference_readouts_work_on_a_model_jax_cannot_differentiate(trained, readout):
    task, params, data, sketch = trained

    def numpy_margin(p, x, y):
        h = np.tanh(x @ p["w1"] + p["b1"])
        logits = h @ p["w2"] + p["b2"]
        return np.asarray(logits[y] - np.log(np.exp(np.delete(logits, y)).sum()))

    def opaque_margin(p, example):
        shape = jax.ShapeDtypeStruct((), jnp.float64)
        return jax.pure_callback(
            numpy_margin, shape, p, *example, vmap_method="sequential"
        )

    expected = jaxattr.scorer(task.margin, params, sketch)(data)
    got = jaxattr.scorer(opaque_margin, params, sketch, readout=readout)(data)
    assert_close(
        got, expected, rtol=1e-5 if readout.name == "forward_difference" else 1e-7
    )
    with pytest.raises(TypeError, match="CentralDifference"):
        jaxattr.scorer(opaque_margin, params, sketch)(data)


def test_auto_step_agrees_with_jvp_in_float32(trained):
    task, params, data, sketch = trained
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    sketch32 = jaxattr.DenseSketch(
        jax.tree.map(lambda a: a.astype(jnp.float32), sketch.responses),
        sketch.ids,
        sketch.info.__class__(jaxattr._tree.param_spec(params32), None, "posthoc"),
    )
    data32 = (data[0].astype(jnp.float32), data[1])
    exact = jaxattr.scorer(task.margin, params32, sketch32)(data32)
    for readout in (jaxattr.CentralDifference(), jaxattr.ForwardDifference()):
        got = jaxattr.scorer(task.margin, params32, sketch32, readout=readout)(data32)
        r = np.corrcoef(np.ravel(got), np.ravel(exact))[0, 1]
        assert r > (0.9999 if readout.name == "central_difference" else 0.999), r


def test_bfloat16_storage_keeps_the_ranking(trained):
    task, params, data, sketch = trained
    full = jaxattr.scorer(task.margin, params, sketch)(data)
    half = jaxattr.scorer(task.margin, params, sketch.astype(jnp.bfloat16))(data)
    assert (
        sketch.astype(jnp.bfloat16).bytes_per_example() * 4
        == sketch.bytes_per_example()
    )
    assert np.corrcoef(np.ravel(full), np.ravel(half))[0, 1] > 0.999


def test_top_k_and_self_influence_match_the_score_matrix(trained):
    task, params, data, sketch = trained
    score = jaxattr.scorer(task.margin, params, sketch, train_chunk=7)
    scores = np.asarray(score(data))
    top = score.top_k(data, k=4)
    np.testing.assert_array_equal(top.proponents, np.argsort(-scores, axis=1)[:, :4])
    np.testing.assert_array_equal(top.opponents, np.argsort(scores, axis=1)[:, :4])
    assert_close(top.proponent_scores, -np.sort(-scores, axis=1)[:, :4], rtol=1e-12)
    assert_close(top.opponent_scores, np.sort(scores, axis=1)[:, :4], rtol=1e-12)
    assert_close(score.self_influence(data), np.diag(scores), rtol=1e-10)


def test_top_k_with_float32_weights_and_float64_queries(trained):
    # Regression: the running top-k carry took the weights' dtype, not the scores'.
    task, params, data, _ = trained
    weights = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    sketch = jaxattr.simulate(task, weights, data, key=jax.random.key(0), horizon=5)
    # Stored in the weights' dtype, as its metadata says, not promoted to float64.
    assert {a.dtype for a in jax.tree.leaves(sketch.responses)} == {np.dtype("float32")}
    score = jaxattr.scorer(task.margin, weights, sketch, train_chunk=7)
    scores = np.asarray(score(data))
    assert scores.dtype == np.float64
    top = score.top_k(data, k=3)
    np.testing.assert_array_equal(top.proponents, np.argsort(-scores, axis=1)[:, :3])


def test_top_k_reports_ids_not_rows(trained):
    task, params, data, sketch = trained
    relabeled = jaxattr.DenseSketch(sketch.responses, sketch.ids + 1000, sketch.info)
    top = jaxattr.scorer(task.margin, params, relabeled).top_k(data, k=2)
    assert int(jnp.min(top.proponents)) >= 1000


def test_parameters_that_do_not_match_the_sketch_are_refused(trained):
    task, params, data, sketch = trained
    wrong = dict(params, w1=params["w1"][:, :4])
    with pytest.raises(
        ValueError, match=r"leaf \['w1'\] has shape \(4, 4\), expected \(4, 8\)"
    ):
        jaxattr.scorer(task.margin, wrong, sketch)
    with pytest.raises(ValueError, match="leaves missing"):
        jaxattr.scorer(task.margin, {"w1": params["w1"]}, sketch)


def test_a_sketch_tied_to_a_measurement_refuses_another(trained):
    task, params, data, _ = trained
    tied = jaxattr.simulate(
        task, params, data, key=jax.random.key(0), horizon=2, measurement=task.margin
    )
    jaxattr.scorer(task.margin, params, tied)
    with pytest.raises(ValueError, match="built for measurement 'margin'.*'neg_loss'"):
        jaxattr.scorer(task.neg_loss, params, tied)


def test_bad_scorer_arguments(trained):
    task, params, data, sketch = trained
    with pytest.raises(TypeError, match="readout must be"):
        jaxattr.scorer(task.margin, params, sketch, readout="jvp")
    with pytest.raises(ValueError, match="query_chunk must be a positive integer"):
        jaxattr.scorer(task.margin, params, sketch, query_chunk=0)
    score = jaxattr.scorer(task.margin, params, sketch)
    with pytest.raises(ValueError, match="k=41 exceeds the 40 training examples"):
        score.top_k(data, k=41)
    with pytest.raises(
        ValueError, match="train_data has 39 examples but the sketch has 40"
    ):
        score.self_influence(jax.tree.map(lambda a: a[:39], data))
    with pytest.raises(ValueError, match="leading"):
        score((data[0], data[1][:3]))


def test_ensemble_is_the_weighted_sum_of_its_scorers(trained):
    task, params, data, sketch = trained
    shifted = jax.tree.map(lambda p: p * 1.01, params)
    other = jaxattr.simulate(task, shifted, data, key=jax.random.key(1), horizon=50)
    a = jaxattr.scorer(task.margin, params, sketch)
    b = jaxattr.scorer(task.margin, shifted, other)
    ens = jaxattr.Ensemble([a, b], weights=[0.25, 0.75])
    expected = 0.25 * np.asarray(a(data)) + 0.75 * np.asarray(b(data))
    assert_close(ens(data), expected, rtol=1e-12)
    top = ens.top_k(data, k=3, query_chunk=7)
    np.testing.assert_array_equal(top.proponents, np.argsort(-expected, 1)[:, :3])
    assert_close(ens.self_influence(data), np.diag(expected), rtol=1e-9)
    with pytest.raises(ValueError, match="Got 1 weights for 2 scorers"):
        jaxattr.Ensemble([a, b], weights=[1.0])


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, y: (x, jnp.full_like(y, 7)), ValueError, r"label 7 .* 0\.\.2"),
        (lambda x, y: (x, y.at[3].set(-1)), ValueError, "label -1 at position 3"),
        (lambda x, y: x, TypeError, r"pair \(inputs, labels\)"),
        (lambda x, y: (x[:, :3], y), ValueError, r"cannot take one queries input"),
        (lambda x, y: (x, jax.nn.one_hot(y, 3)), ValueError, "argmax"),
        (lambda x, y: (x, y[:-1]), ValueError, "one label per input"),
        (lambda x, y: (x, y + 0.5), TypeError, "integer class indices"),
    ],
)
def test_queries_a_classifier_cannot_take_are_refused(trained, make, error, message):
    task, params, (x, y), sketch = trained
    score = jaxattr.scorer(task.margin, params, sketch)
    bad = make(x[:10], y[:10])
    for call in (score, lambda q: score.top_k(q, k=2)):
        with pytest.raises(error, match=message):
            call(bad)


def test_training_labels_out_of_range_are_named(trained):
    task, params, (x, y), _ = trained
    with pytest.raises(ValueError, match="train_data label 5 at position 4"):
        jaxattr.simulate(
            task, params, (x, y.at[4].set(5)), key=jax.random.key(0), horizon=2
        )


def test_a_sketch_that_is_not_a_builder_is_refused(trained):
    task, params, data, _ = trained
    with pytest.raises(TypeError, match=r"sketch builder .* got 'dense'"):
        jaxattr.simulate(task, params, data, key=jax.random.key(0), sketch="dense")


def test_a_nan_query_is_named(trained):
    task, params, (x, y), sketch = trained
    score = jaxattr.scorer(task.margin, params, sketch)
    with pytest.raises(ValueError, match="queries example 3 has a NaN"):
        score((x[:6].at[3, 1].set(jnp.nan), y[:6]))
