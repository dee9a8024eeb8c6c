"""Simulates and scores on a 1-device mesh and a 4-device mesh; run as a script.

Run by tests/test_sharding.py in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which must be set before
jax starts. Writes one ``.npz`` of results per mesh into the directory given as
the first argument, and exits non-zero if a 4-device kernel's result is not
really split over the 4 devices.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jaxattr
from jaxattr import _lowrank, _posthoc, _scoring, _sharding, _tree

jax.config.update("jax_enable_x64", True)

# 22 rows are not a multiple of 4 devices, nor are 7 basis directions, nor
# the chunks of 8 examples' last 6: every kind of padding is exercised.
NUM_TRAIN, NUM_QUERIES, DEVICES, K = 22, 6, 4, 5
HORIZON, CHUNK, DIM = 25, 8, 7
# Below 1 / (largest curvature eigenvalue, about 1.9, + damping); a fixed step
# spares the power iteration's compile.
STEP = 0.3


def problem():
    """A tiny tanh MLP on Gaussian blobs, float64."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k1, (4, 5)) * 0.5,
        "b1": jnp.zeros(5),
        "w2": jax.random.normal(k2, (5, 3)) * 0.5,
        "b2": jnp.zeros(3),
    }
    apply = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    y = jax.random.randint(k3, (NUM_TRAIN,), 0, 3)
    x = jax.random.normal(k4, (NUM_TRAIN, 4)) + 2.0 * jax.nn.one_hot(y, 4)
    return jaxattr.classification(apply), params, (x, y)


def curvatures(task):
    gn = task.ggn(batch_size=8)
    return gn, jaxattr.LowRank(task.margin_ggn(batch_size=16, resample=False))


def sketches(task, params, data, mesh):
    """Dense and projected sketches from both curvature paths."""
    gn, lowrank = curvatures(task)
    common = dict(key=jax.random.key(1), horizon=HORIZON, chunk_size=CHUNK)
    gn = dict(common, curvature=gn, damping=0.05, step_size=STEP, mesh=mesh)
    lr = dict(common, curvature=lowrank, damping=jaxattr.Relative(1e-2), mesh=mesh)
    # A stored orthonormal basis: a random one (Projected) compiles far slower.
    num_params = sum(a.size for a in jax.tree.leaves(params))
    vectors = np.linalg.qr(np.random.default_rng(0).normal(size=(num_params, DIM)))
    in_basis = jaxattr.InBasis(jnp.asarray(vectors[0].T))
    return {
        "gn_dense": jaxattr.simulate(task, params, data, **gn),
        "gn_factored": jaxattr.simulate(task, params, data, sketch=in_basis, **gn),
        "lr_dense": jaxattr.simulate(task, params, data, **lr),
        "lr_factored": jaxattr.simulate(task, params, data, sketch=in_basis, **lr),
    }


def scorers(task, params, made, mesh):
    """A dense and a factored scorer, reading few rows per step."""
    kw = dict(query_chunk=4, train_chunk=3, mesh=mesh)
    return {
        name: jaxattr.scorer(task.margin, params, made[name], **kw)
        for name in ("gn_dense", "lr_factored")
    }


def results(task, params, data, mesh):
    """Every sketch's rows; scores, top-k and self-influence of two of them."""
    made = sketches(task, params, data, mesh)
    out = {
        f"{name}/rows{i}": a
        for name, sketch in made.items()
        for i, a in enumerate(jax.tree.leaves(sketch.rows))
    }
    queries = _tree.slice_rows(data, 0, NUM_QUERIES)
    made_scorers = scorers(task, params, made, mesh)
    for name, score in made_scorers.items():
        top = score.top_k(queries, k=K)
        out[f"{name}/scores"] = score(queries)
        out[f"{name}/top_ids"] = jnp.concatenate([top.proponents, top.opponents])
        out[f"{name}/top"] = jnp.concatenate(
            [top.proponent_scores, top.opponent_scores]
        )
        out[f"{name}/self"] = score.self_influence(data)
    return out, made_scorers


def split_over(array, axis=0):
    """True when ``array`` is split along ``axis`` over all the devices."""
    shards = array.addressable_shards
    return (
        len(array.sharding.device_set) == DEVICES
        and len({s.device for s in shards}) == DEVICES
        and all(s.data.shape[axis] * DEVICES == array.shape[axis] for s in shards)
    )


def simulation_kernels(task, params, data, rows):
    """One chunk through each simulation kernel, called as :func:`simulate` does."""
    gn, lowrank = curvatures(task)
    chunk, key = _tree.slice_rows(data, 0, CHUNK), jax.random.key(1)
    common = dict(params=params, damping=0.05, step_size=STEP, loss=task.loss)
    common.update(horizon=HORIZON, split=rows)
    basis = jaxattr.eigenbasis(lowrank, params, data, key)
    return {
        "gauss_newton": _posthoc._respond_rows(
            chunk, data=data, key=key, curvature=gn, **common
        ),
        "lowrank": _lowrank.map_rows(
            chunk, basis=basis, per_example=_lowrank.closed_form_fn, **common
        ),
    }


def scoring_kernels(params, data, score):
    """A query chunk and the training set through the scorer's own kernels."""
    factored = isinstance(score.sketch, jaxattr.FactoredSketch)
    kernel = _scoring._factored_scores if factored else _scoring._scores_block
    own = _scoring._factored_self if factored else _scoring._self_block
    stored, how = score._stored, score._how
    padded = _tree.pad_rows(data, _tree.leading_size(stored.ids))
    return {
        "stored": jax.tree.leaves(stored.rows),
        "scores": kernel(params, stored, _tree.slice_rows(data, 0, 4), how=how),
        "self": own(params, stored, padded, how=how),
    }


def check_split(task, params, data, mesh, made_scorers):
    """Exits unless each kernel's output is split over the mesh's devices."""
    rows = _sharding.layout(mesh, None)
    found = {"simulate": simulation_kernels(task, params, data, rows)}
    for name, score in made_scorers.items():
        found[name] = scoring_kernels(params, data, score)
    even = jax.tree.map(lambda a: a[:20], made_scorers["gn_dense"].sketch)
    found["shard_sketch"] = jaxattr.shard_sketch(even, mesh).responses
    try:
        jaxattr.shard_sketch(made_scorers["gn_dense"].sketch, mesh)
        sys.exit("shard_sketch split 22 rows over 4 devices without an error.")
    except ValueError:
        pass
    bad = []
    for path, a in jax.tree_util.tree_leaves_with_path(found):
        axis = 1 if "scores" in jax.tree_util.keystr(path) else 0
        if not split_over(a, axis):
            bad.append(jax.tree_util.keystr(path))
    if bad:
        sys.exit(f"Not split over {DEVICES} devices: {bad}")
    return len(jax.tree.leaves(found))


def main(out_dir):
    if jax.device_count() != DEVICES:
        sys.exit(f"Expected {DEVICES} devices, got {jax.devices()}.")
    task, params, data = problem()
    meshes = {
        "one": Mesh(np.array(jax.devices()[:1]), ("rows",)),
        "four": jax.make_mesh((DEVICES,), ("rows",)),
    }
    for label, mesh in meshes.items():
        start = time.perf_counter()
        out, made_scorers = results(task, params, data, mesh)
        np.savez(f"{out_dir}/{label}.npz", **jax.tree.map(np.asarray, out))
        print(f"{label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    checked = check_split(task, params, data, meshes["four"], made_scorers)
    took = time.perf_counter() - start
    print(f"split checks: {checked} arrays, {took:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
