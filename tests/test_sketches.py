"""Sketch builders: each equals its definition, streaming equals compressing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxattr
from conftest import assert_close


@pytest.fixture(scope="module")
def dense(x64_module):
    """A tiny problem and its dense sketch (fixed curvature, 20 examples)."""
    from conftest import blobs, tanh_mlp

    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), 20)
    task = jaxattr.classification(apply)
    kwargs = dict(key=jax.random.key(2), horizon=30, damping=0.05, chunk_size=7)
    sketch = jaxattr.simulate(task, params, data, **kwargs)
    return task, params, data, sketch, kwargs


def flat_rows(tree):
    return jax.vmap(lambda r: ravel_pytree(r)[0])(tree)


def scores(task, params, sketch, data, **kw):
    return np.asarray(jaxattr.scorer(task.margin, params, sketch, **kw)(data))


def test_grouped_scores_are_sums_of_member_scores(dense):
    task, params, data, sketch, kwargs = dense
    groups = np.array([3, 1, 7] * 6 + [1, 1])
    grouped = jaxattr.compress(sketch, jaxattr.Grouped(groups), params)
    np.testing.assert_array_equal(grouped.ids, [1, 3, 7])
    per_example = scores(task, params, sketch, data)
    expected = np.stack([per_example[:, groups == g].sum(1) for g in (1, 3, 7)], 1)
    for readout in (jaxattr.JVP(), jaxattr.CentralDifference()):
        got = scores(task, params, grouped, data, readout=readout)
        assert_close(got, expected, rtol=1e-7)


def test_projected_equals_explicit_projection(dense):
    task, params, data, sketch, kwargs = dense
    builder = jaxattr.Projected(dim=50, key=jax.random.key(9), block=16)
    projected = jaxattr.compress(sketch, builder, params)
    dirs = flat_rows(projected.random.directions(params, jnp.asarray(0), 50))
    assert_close(np.abs(dirs), np.full(dirs.shape, 1 / np.sqrt(50)), rtol=1e-12)
    assert_close(
        projected.coefficients, flat_rows(sketch.responses) @ dirs.T, rtol=1e-12
    )
    grad_m = jax.vmap(lambda z: ravel_pytree(jax.grad(task.margin)(params, z))[0])(data)
    expected = (grad_m @ dirs.T) @ (flat_rows(sketch.responses) @ dirs.T).T
    assert_close(scores(task, params, projected, data), expected, rtol=1e-9)


def test_projected_scores_approach_dense_as_dim_grows(dense):
    task, params, data, sketch, kwargs = dense
    exact = scores(task, params, sketch, data)
    errors = []
    for dim in (8, 128, 2048):
        projected = jaxattr.compress(
            sketch, jaxattr.Projected(dim, jax.random.key(3)), params
        )
        errors.append(np.abs(scores(task, params, projected, data) - exact).mean())
    assert errors[0] > errors[1] > errors[2]


def test_adaptive_basis_is_the_top_right_singular_subspace(dense):
    task, params, data, sketch, kwargs = dense
    r = flat_rows(sketch.responses)
    _, _, vt = np.linalg.svd(np.asarray(r), full_matrices=False)
    builder = jaxattr.Adaptive(
        rank=4, key=jax.random.key(4), oversample=6, power_iters=3
    )
    adaptive = jaxattr.compress(sketch, builder, params, chunk_size=6)
    basis = flat_rows(adaptive.stored)
    assert_close(basis @ basis.T, np.eye(4), atol=1e-10)
    # Same subspace as the exact top-4 right singular vectors.
    overlap = np.linalg.svd(np.asarray(basis) @ vt[:4].T, compute_uv=False)
    assert_close(overlap, np.ones(4), atol=1e-6)
    assert_close(adaptive.coefficients, r @ basis.T, rtol=1e-10)


def test_full_rank_adaptive_and_layer_lowrank_reproduce_dense_scores(dense):
    task, params, data, sketch, kwargs = dense
    exact = scores(task, params, sketch, data)
    full = jaxattr.compress(sketch, jaxattr.Adaptive(20, jax.random.key(0)), params)
    assert_close(scores(task, params, full, data), exact, rtol=1e-8)
    layer = jaxattr.compress(sketch, jaxattr.LayerLowRank(4), params)
    assert_close(scores(task, params, layer, data), exact, rtol=1e-8)
    # w1 (4x5) at rank 4, w2 (5x3) at its full rank 3, biases whole; float64.
    assert layer.bytes_per_example() == 8 * (4 * (4 + 5) + 5 + 3 * (5 + 3) + 3)


def test_layer_lowrank_keeps_the_best_rank_r_matrix(dense):
    task, params, data, sketch, kwargs = dense
    layer = jaxattr.compress(sketch, jaxattr.LayerLowRank(1), params)
    decoded = jaxattr.LayerLowRankSketch.decode_row(
        jax.tree.map(lambda a: a[2], layer.factors), params
    )
    w1 = np.asarray(sketch.responses["w1"][2])
    u, s, vt = np.linalg.svd(w1)
    assert_close(decoded["w1"], s[0] * np.outer(u[:, 0], vt[0]), rtol=1e-10)
    assert_close(decoded["b1"], sketch.responses["b1"][2], rtol=1e-12)


def test_in_basis_projects_onto_given_directions(dense):
    task, params, data, sketch, kwargs = dense
    basis = jaxattr.eigenbasis(
        jaxattr.LowRank(task.margin_ggn(None)), params, data, jax.random.key(0)
    )
    coded = jaxattr.compress(sketch, jaxattr.InBasis(basis.vectors), params)
    assert_close(
        coded.coefficients, flat_rows(sketch.responses) @ basis.vectors.T, rtol=1e-10
    )


@pytest.mark.parametrize(
    "builder",
    [
        jaxattr.Dense(),
        jaxattr.Grouped(np.arange(20) % 4),
        jaxattr.Projected(16, jax.random.key(5)),
        jaxattr.Adaptive(5, jax.random.key(6)),
        jaxattr.LayerLowRank(2),
    ],
    ids=lambda b: type(b).__name__,
)
def test_streaming_in_simulate_equals_compressing_afterwards(dense, builder):
    task, params, data, sketch, kwargs = dense
    streamed = jaxattr.simulate(task, params, data, sketch=builder, **kwargs)
    compressed = jaxattr.compress(sketch, builder, params, chunk_size=7)
    assert_close(
        scores(task, params, streamed, data),
        scores(task, params, compressed, data),
        rtol=1e-9,
    )


@pytest.mark.parametrize("chunk", [1, 7, 20])
def test_chunk_sizes_give_identical_sketches_and_scores(dense, chunk):
    task, params, data, sketch, kwargs = dense
    kwargs = dict(kwargs, chunk_size=chunk)
    again = jaxattr.simulate(task, params, data, **kwargs)
    assert_close(again.responses, sketch.responses, rtol=1e-12)
    # Differences divide rounding by h ~ 6e-6: they agree to ~1e-10, not 1e-12.
    for readout, rtol in ((jaxattr.JVP(), 1e-12), (jaxattr.CentralDifference(), 1e-9)):
        kw = dict(readout=readout, query_chunk=chunk, train_chunk=chunk)
        got = scores(task, params, again, data, **kw)
        ref = scores(task, params, sketch, data, readout=readout)
        assert_close(got, ref, rtol=rtol)
    top = jaxattr.scorer(task.margin, params, sketch, train_chunk=chunk).top_k(data, 3)
    full = scores(task, params, sketch, data)
    np.testing.assert_array_equal(top.proponents, np.argsort(-full, 1)[:, :3])


def test_factored_top_k_and_self_influence(dense):
    task, params, data, sketch, kwargs = dense
    projected = jaxattr.compress(
        sketch, jaxattr.Projected(64, jax.random.key(1)), params
    )
    score = jaxattr.scorer(task.margin, params, projected, train_chunk=7)
    full = np.asarray(score(data))
    top = score.top_k(data, 3)
    np.testing.assert_array_equal(top.proponents, np.argsort(-full, 1)[:, :3])
    np.testing.assert_array_equal(top.opponents, np.argsort(full, 1)[:, :3])
    assert_close(score.self_influence(data), np.diag(full), rtol=1e-9)


def test_bad_builder_arguments(dense):
    task, params, data, sketch, kwargs = dense
    with pytest.raises(TypeError, match="groups must be a 1-D array of integer labels"):
        jaxattr.Grouped(np.linspace(0, 1, 20))
    with pytest.raises(ValueError, match="groups has 3 labels but there are 20"):
        jaxattr.compress(sketch, jaxattr.Grouped(np.arange(3)), params)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        jaxattr.Projected(0, jax.random.key(0))
    with pytest.raises(ValueError, match="InBasis vectors have 3 columns"):
        jaxattr.compress(sketch, jaxattr.InBasis(jnp.ones((2, 3))), params)


def test_projected_cached_and_regenerated_directions_agree(dense):
    task, params, data, sketch, kwargs = dense
    key = jax.random.key(9)
    cached = jaxattr.compress(sketch, jaxattr.Projected(40, key, block=16), params)
    regen = jaxattr.compress(
        sketch, jaxattr.Projected(40, key, block=16, cache_bytes=0), params
    )
    assert_close(regen.coefficients, cached.coefficients, rtol=1e-12)


def test_rerank_recovers_the_exact_top_k_from_a_coarse_shortlist(dense):
    task, params, data, sketch, kwargs = dense
    exact = jaxattr.scorer(task.margin, params, sketch).top_k(data, 3)
    coarse_sketch = jaxattr.compress(
        sketch, jaxattr.Projected(6, jax.random.key(0)), params
    )
    coarse = jaxattr.scorer(task.margin, params, coarse_sketch)
    # A shortlist of every example must give the exact answer.
    full = jaxattr.rerank(coarse, sketch, data, k=3, shortlist=20)
    np.testing.assert_array_equal(full.proponents, exact.proponents)
    np.testing.assert_array_equal(full.opponents, exact.opponents)
    # The default readout is the coarse scorer's (jvp), so equal to float rounding.
    assert_close(full.proponent_scores, exact.proponent_scores, rtol=1e-12)
    two_forward = jaxattr.rerank(
        coarse, sketch, data, k=3, shortlist=20, readout=jaxattr.CentralDifference()
    )
    assert_close(two_forward.proponent_scores, exact.proponent_scores, rtol=1e-6)
    # A short list is exact where the coarse sketch found the true top-k.
    short = jaxattr.rerank(coarse, sketch, data, k=3, shortlist=8, query_chunk=3)
    for got, want in zip(short.proponents, exact.proponents, strict=True):
        assert len(set(np.asarray(got)) & set(np.asarray(want))) >= 1
    with pytest.raises(ValueError, match="shortlist=2 must be >= k=3"):
        jaxattr.rerank(coarse, sketch, data, k=3, shortlist=2)
    with pytest.raises(ValueError, match="shortlist=21 exceeds the 20 training"):
        jaxattr.rerank(coarse, sketch, data, k=3, shortlist=21)


@pytest.mark.parametrize("kind", ["lowrank", "ggn"])
def test_grouped_simulation_sums_gradients_first_and_equals_summed_responses(
    dense, kind
):
    task, params, data, sketch, kwargs = dense
    groups = np.array([5, 2] * 10)
    curvature = None if kind == "lowrank" else task.ggn(batch_size=6)
    kw = dict(kwargs, curvature=curvature)
    per_example = jaxattr.simulate(task, params, data, **kw)
    fast = jaxattr.simulate(task, params, data, sketch=jaxattr.Grouped(groups), **kw)
    summed = jaxattr.compress(per_example, jaxattr.Grouped(groups), params)
    np.testing.assert_array_equal(fast.ids, [2, 5])
    assert_close(fast.responses, summed.responses, rtol=1e-10)


def test_curvature_basis_coefficients_are_the_response_coordinates(dense):
    task, params, data, sketch, kwargs = dense
    basis = jaxattr.eigenbasis(
        jaxattr.default_curvature(task, 20), params, data, kwargs["key"]
    )
    coded = jaxattr.simulate(
        task, params, data, sketch=jaxattr.CurvatureBasis(4), **kwargs
    )
    expected = flat_rows(sketch.responses) @ basis.vectors[:4].T
    assert_close(coded.coefficients, expected, rtol=1e-9)
    full = jaxattr.simulate(
        task, params, data, sketch=jaxattr.CurvatureBasis(), **kwargs
    )
    via_basis = jaxattr.compress(sketch, jaxattr.InBasis(basis.vectors), params)
    assert_close(
        scores(task, params, full, data),
        scores(task, params, via_basis, data),
        rtol=1e-8,
    )
    with pytest.raises(
        TypeError, match="CurvatureBasis needs curvature=jaxattr.LowRank"
    ):
        jaxattr.simulate(
            task,
            params,
            data,
            sketch=jaxattr.CurvatureBasis(2),
            **dict(kwargs, curvature=task.ggn(batch_size=4)),
        )
    with pytest.raises(TypeError, match="cannot re-encode stored responses"):
        jaxattr.compress(sketch, jaxattr.CurvatureBasis(2), params)


def test_adaptive_oversampling_past_the_parameters_and_too_high_a_rank(dense):
    task, params, data, sketch, kwargs = dense  # 20 examples, 43 parameters
    wide = jaxattr.Adaptive(20, jax.random.key(0), oversample=40)
    full = jaxattr.compress(sketch, wide, params)
    exact = scores(task, params, sketch, data)
    assert_close(scores(task, params, full, data), exact, rtol=1e-8)
    with pytest.raises(ValueError, match=r"rank=21\).* use rank <= 20"):
        jaxattr.compress(sketch, jaxattr.Adaptive(21, jax.random.key(0)), params)
