"""Flax linen and NNX models give the same attributions as the same plain function."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen, nnx

import jaxattr
from conftest import assert_close, blobs


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        hidden = linen.tanh(linen.Dense(6)(x))
        return linen.Dense(3)(hidden)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def plain_apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def linen_model():
    model = LinenMLP()
    params = model.init(jax.random.key(0), jnp.zeros(4))
    d = params["params"]
    plain = {
        "w1": d["Dense_0"]["kernel"],
        "b1": d["Dense_0"]["bias"],
        "w2": d["Dense_1"]["kernel"],
        "b2": d["Dense_1"]["bias"],
    }
    return model.apply, params, plain


def nnx_model():
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    plain = {
        "w1": state["hidden"]["kernel"][...],
        "b1": state["hidden"]["bias"][...],
        "w2": state["out"]["kernel"][...],
        "b2": state["out"]["bias"][...],
    }
    return apply, state, plain


def flat_scores(task, params, sketch, data):
    return jaxattr.scorer(task.margin, params, sketch)(data)


@pytest.mark.parametrize("build", [linen_model, nnx_model], ids=["linen", "nnx"])
def test_posthoc_matches_plain_function(build):
    apply, params, plain = build()
    data = blobs(jax.random.key(1), 16)
    kwargs = dict(key=jax.random.key(2), horizon=20, damping=1e-2)
    task, ref = jaxattr.classification(apply), jaxattr.classification(plain_apply)
    sketch = jaxattr.simulate(
        task, params, data, curvature=task.ggn(batch_size=8), **kwargs
    )
    ref_sketch = jaxattr.simulate(
        ref, plain, data, curvature=ref.ggn(batch_size=8), **kwargs
    )
    assert_close(
        flat_scores(task, params, sketch, data),
        flat_scores(ref, plain, ref_sketch, data),
        rtol=1e-4,
    )


@pytest.mark.parametrize("build", [linen_model, nnx_model], ids=["linen", "nnx"])
def test_in_training_matches_plain_function(build):
    apply, params, plain = build()
    x, y = blobs(jax.random.key(1), 16)
    opt = optax.sgd(0.05, momentum=0.9)
    results = []
    for task, p in (
        (jaxattr.classification(apply), params),
        (jaxattr.classification(plain_apply), plain),
    ):
        sim = jaxattr.in_training(task, opt, horizon=3, batch_size=4)
        s = opt.init(p)
        state = sim.init(p, s, 16)
        for start in range(0, 16, 4):
            ids = jnp.arange(start, start + 4)
            p, s, state, _ = sim.step(state, p, s, (x[ids], y[ids]), ids)
        results.append(flat_scores(task, p, sim.finalize(state), (x, y)))
    assert_close(results[0], results[1], rtol=1e-4)
