"""Shared fixtures: float64 switch, tiny models and data, tolerances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattr


def _float64():
    """Sets 64-bit floats for the duration of a fixture.

    Sets the global flag rather than the thread-local context manager, so that
    host callbacks (which run on another thread) see float64 too.
    """
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats, for checks of exactness."""
    yield from _float64()


@pytest.fixture(scope="module")
def x64_module():
    """64-bit floats for a whole module, for module-scoped float64 fixtures."""
    yield from _float64()


def assert_close(a, b, rtol=1e-7, atol=0.0, what=""):
    """One tolerance helper for every comparison of arrays or pytrees."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)), 1e-30)
        err = np.max(np.abs(x - y)) if x.size else 0.0
        assert err <= atol + rtol * scale, (
            f"{what}: max error {err:.3g}, scale {scale:.3g}"
        )


def tanh_mlp(key, d_in=4, hidden=5, classes=3, scale=0.5):
    """A tiny smooth MLP as a params dict and its single-example apply."""
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (d_in, hidden)) * scale,
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, classes)) * scale,
        "b2": jnp.zeros(classes),
    }

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return params, apply


def blobs(key, n, d_in=4, classes=3, noise=1.0):
    """Gaussian class blobs: ``(x[n, d_in], y[n])``."""
    kc, kx, ky = jax.random.split(key, 3)
    centers = jax.random.normal(kc, (classes, d_in)) * 2.0
    y = jax.random.randint(ky, (n,), 0, classes)
    x = centers[y] + noise * jax.random.normal(kx, (n, d_in))
    return x, y


@pytest.fixture
def tiny(x64):
    """A float64 tiny MLP classification problem: (task, params, data)."""
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), 20)
    return jaxattr.classification(apply), params, data
