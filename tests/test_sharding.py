"""Several devices: simulation and scoring split over a mesh equal one device.

The 4-device run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
before jax starts, so it runs ``sharding_check.py`` in a fresh process.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxattr
from conftest import assert_close, blobs, tanh_mlp

SCRIPT = Path(__file__).with_name("sharding_check.py")

# Each device vmaps its share of a chunk (2 rows instead of 8), and XLA's CPU
# kernels may sum in another order for another batch size: the runs agree to a
# few float64 ulps (about 2e-15 relative, after 25 recursion steps). A wrong
# split (rows swapped, gradients summed over devices) is off by order 1.
RTOL = 1e-12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results on a 1-device and a 4-device mesh, from one subprocess."""
    out = tmp_path_factory.mktemp("sharding")
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(),
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.load(out / "one.npz"), np.load(out / "four.npz")


def test_four_devices_equal_one_device(runs):
    one, four = runs
    assert sorted(one) == sorted(four)
    assert {k.split("/")[1] for k in one} >= {"scores", "top", "top_ids", "self"}
    for name in one:
        if np.issubdtype(one[name].dtype, np.integer):
            np.testing.assert_array_equal(four[name], one[name], err_msg=name)
        else:
            assert one[name].dtype == np.float64, name
            assert_close(four[name], one[name], rtol=RTOL, what=name)


@pytest.fixture
def small(x64):
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), 6)
    return jaxattr.classification(apply), params, data


def one_device_mesh(*names):
    devices = np.array(jax.devices()[:1]).reshape((1,) * len(names))
    return Mesh(devices, names)


@pytest.mark.parametrize(
    "mesh, axis, error, words",
    [
        ("one", "cols", ValueError, "not an axis of the mesh"),
        ("two", None, ValueError, "name the one that splits"),
        (None, "rows", ValueError, "without a mesh"),
        ("devices", None, TypeError, "jax.sharding.Mesh"),
    ],
)
def test_bad_meshes_are_refused_before_any_work(small, mesh, axis, error, words):
    task, params, data = small
    mesh = {
        "one": one_device_mesh("rows"),
        "two": one_device_mesh("rows", "models"),
        "devices": jax.devices(),
        None: None,
    }[mesh]
    with pytest.raises(error, match=words):
        jaxattr.simulate(
            task, params, data, key=jax.random.key(0), mesh=mesh, mesh_axis=axis
        )
