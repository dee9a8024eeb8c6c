"""Doctest namespace: docstring examples may use ``jaxattr``, ``jax`` and ``jnp``."""

import jax
import jax.numpy as jnp
import pytest

import jaxattr


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jaxattr=jaxattr, jax=jax, jnp=jnp)
