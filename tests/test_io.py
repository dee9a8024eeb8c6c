"""Saving, loading and resuming: bitwise round trips and clear refusals."""

import functools
import json
import pathlib
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxattr
from conftest import blobs, tanh_mlp
from jaxattr import _io, _lowrank, _tree

TESTS = pathlib.Path(__file__).parent


def problem():
    """The tiny float64 problem every test (and the subprocesses) rebuild."""
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), 20)
    kwargs = dict(key=jax.random.key(2), horizon=10, damping=0.05, chunk_size=6)
    return jaxattr.classification(apply), params, data, kwargs


@pytest.fixture(scope="module")
def dense(x64_module):
    task, params, data, kwargs = problem()
    return task, params, data, jaxattr.simulate(task, params, data, **kwargs)


def scores(task, params, sketch, data):
    return np.asarray(jaxattr.scorer(task.margin, params, sketch)(data))


def assert_same_sketch(got, expected):
    assert type(got) is type(expected) and got.info == expected.info
    assert getattr(got, "random", None) == getattr(expected, "random", None)
    leaves = jax.tree.leaves(got), jax.tree.leaves(expected)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(*leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


BUILDERS = {
    "grouped": lambda: jaxattr.Grouped(np.arange(20) % 3),
    "layer_lowrank": lambda: jaxattr.LayerLowRank(2),
    "projected": lambda: jaxattr.Projected(12, jax.random.key(3)),
    "adaptive": lambda: jaxattr.Adaptive(3, jax.random.key(4), oversample=2),
}


@pytest.mark.parametrize("kind", ["dense", "bfloat16", *BUILDERS])
def test_round_trip_scores_bitwise(dense, tmp_path, kind):
    task, params, data, sketch = dense
    if kind == "bfloat16":
        sketch = sketch.astype(jnp.bfloat16)
    elif kind != "dense":
        sketch = jaxattr.compress(sketch, BUILDERS[kind](), params)
    jaxattr.save_sketch(tmp_path / "s", sketch)
    expected = scores(task, params, sketch, data)
    for loaded in (
        jaxattr.load_sketch(tmp_path / "s", params),
        jaxattr.load_sketch(tmp_path / "s"),
        jaxattr.load_sketch(tmp_path / "s", params, mmap_mode="r"),
    ):
        assert_same_sketch(loaded, sketch)
        np.testing.assert_array_equal(scores(task, params, loaded, data), expected)


class Params(NamedTuple):
    w: jax.Array
    b: jax.Array


def test_custom_parameter_nodes_need_params_to_load(tmp_path):
    params = Params(jnp.ones((2, 3)), jnp.zeros(3))
    info = jaxattr.SketchInfo(_tree.param_spec(params), None, "x")
    rows = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    sketch = jaxattr.DenseSketch(rows, jnp.arange(2), info)
    jaxattr.save_sketch(tmp_path / "s", sketch)
    assert_same_sketch(jaxattr.load_sketch(tmp_path / "s", params), sketch)
    with pytest.raises(ValueError, match="custom nodes.*Pass params="):
        jaxattr.load_sketch(tmp_path / "s")


def test_a_sketch_for_another_model_is_refused(dense, tmp_path):
    _, params, _, sketch = dense
    jaxattr.save_sketch(tmp_path / "s", sketch)
    other, _ = tanh_mlp(jax.random.key(0), hidden=6)
    with pytest.raises(ValueError, match=r"do not match the sketch.*\['b1'\]"):
        jaxattr.load_sketch(tmp_path / "s", other)


def test_a_corrupted_or_missing_file_is_named(dense, tmp_path):
    _, params, _, sketch = dense
    jaxattr.save_sketch(tmp_path / "s", sketch)
    file = tmp_path / "s" / "responses.2.npy"
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 1
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="responses.2.npy is corrupted"):
        jaxattr.load_sketch(tmp_path / "s", params)
    file.unlink()
    with pytest.raises(FileNotFoundError, match="responses.2.npy is missing"):
        jaxattr.load_sketch(tmp_path / "s", params)


def test_arrays_that_disagree_with_the_parameter_spec_are_refused(dense, tmp_path):
    _, params, _, sketch = dense
    jaxattr.save_sketch(tmp_path / "s", sketch)
    file, meta_file = tmp_path / "s" / "responses.0.npy", tmp_path / "s" / "meta.json"
    np.save(file, np.zeros((20, 6)))
    meta = json.loads(meta_file.read_text())
    meta["arrays"]["responses.0"].update(shape=[20, 6], sha256=_io._sha256(file))
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"inconsistent: \['b1'\] has shape \(20, 6\)"):
        jaxattr.load_sketch(tmp_path / "s", params)


def test_newer_format_and_other_kinds_of_save_are_refused(dense, tmp_path):
    _, params, _, sketch = dense
    jaxattr.save_sketch(tmp_path / "s", sketch)
    meta_file = tmp_path / "s" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(ValueError, match="format version 2.*Upgrade jaxattr"):
        jaxattr.load_sketch(tmp_path / "s")
    jaxattr.save_state(tmp_path / "state", {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="holds format 'jaxattr.state'"):
        jaxattr.load_sketch(tmp_path / "state")
    with pytest.raises(FileNotFoundError, match="not a complete jaxattr save"):
        jaxattr.load_sketch(tmp_path)


def test_saving_is_atomic_and_never_clobbers(dense, tmp_path, monkeypatch):
    _, params, _, sketch = dense
    jaxattr.save_sketch(tmp_path / "s", sketch)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxattr.save_sketch(tmp_path / "s", sketch)
    grouped = jaxattr.compress(sketch, BUILDERS["grouped"](), params)
    with monkeypatch.context() as m:
        m.setattr(_io, "_write_json", _fail)
        with pytest.raises(OSError, match="disk full"):
            jaxattr.save_sketch(tmp_path / "s", grouped, overwrite=True)
        with pytest.raises(OSError, match="disk full"):
            jaxattr.save_sketch(tmp_path / "new", sketch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert_same_sketch(jaxattr.load_sketch(tmp_path / "s"), sketch)
    jaxattr.save_sketch(tmp_path / "s", grouped, overwrite=True)
    assert_same_sketch(jaxattr.load_sketch(tmp_path / "s"), grouped)
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a jaxattr save"):
        jaxattr.save_sketch(tmp_path / "mine", sketch, overwrite=True)


def _fail(*args):
    raise OSError("disk full")


SUBPROCESS = """
import sys
import jax
import numpy as np
jax.config.update("jax_enable_x64", True)
import jaxattr
from test_io import BUILDERS, problem, scores
task, params, data, kwargs = problem()
path = sys.argv[2]
if sys.argv[1] == "save":
    dense = jaxattr.simulate(task, params, data, **kwargs)
    projected = jaxattr.compress(dense, BUILDERS["projected"](), params)
    jaxattr.save_sketch(f"{path}/dense", dense)
    jaxattr.save_sketch(f"{path}/projected", projected)
else:
    for name in ("dense", "projected"):
        sketch = jaxattr.load_sketch(f"{path}/{name}", params)
        np.save(f"{path}/{name}.npy", scores(task, params, sketch, data))
"""


def test_save_in_one_process_load_and_score_in_another(dense, tmp_path):
    task, params, data, sketch = dense
    for step in ("save", "score"):
        subprocess.run(
            [sys.executable, "-c", SUBPROCESS, step, str(tmp_path)],
            cwd=TESTS,
            check=True,
            timeout=300,
        )
    projected = jaxattr.compress(sketch, BUILDERS["projected"](), params)
    for name, here in (("dense", sketch), ("projected", projected)):
        there = np.load(tmp_path / f"{name}.npy")
        assert np.array_equal(there, scores(task, params, here, data)), name


class Crash(Exception):
    """Stands for the process dying."""


def crash_after_save(monkeypatch, k):
    """Makes the ``k``-th checkpoint save raise right after it committed."""
    original, count = _io._Checkpoint.save, [0]

    def save(self, *args):
        original(self, *args)
        count[0] += 1
        if count[0] == k:
            raise Crash

    monkeypatch.setattr(_io._Checkpoint, "save", save)


def crash_during_save(monkeypatch, k):
    """Makes the ``k``-th commit of run.json fail, after its parts were written."""
    original, count = _io._write_json, [0]

    def write(path, obj):
        count[0] += path.name == "run.json"
        if count[0] == k and path.name == "run.json":
            raise Crash
        original(path, obj)

    monkeypatch.setattr(_io, "_write_json", write)


def count_chunks(monkeypatch):
    """Counts the chunks of responses computed (the default closed-form path)."""
    original, count = _lowrank.map_rows, [0]

    def respond(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(_lowrank, "map_rows", respond)
    return count


@pytest.mark.parametrize(
    "builder, crash, at, every",
    [
        ("dense", crash_after_save, 2, 1),
        ("dense", crash_during_save, 2, 2),
        ("grouped", crash_after_save, 3, 1),
        ("adaptive", crash_after_save, 7, 1),
        ("adaptive", crash_during_save, 9, 1),
    ],
)
def test_interrupted_simulation_resumes_bitwise(
    dense, tmp_path, monkeypatch, builder, crash, at, every
):
    task, params, data, _ = dense
    kwargs = dict(problem()[3], checkpoint_every=every)
    make = BUILDERS.get(builder, lambda: None)
    chunks = count_chunks(monkeypatch)
    # The reference also checkpoints: without a checkpoint a grouped sketch
    # sums gradients before simulating (same values, other rounding).
    reference = tmp_path / "reference"
    expected = jaxattr.simulate(
        task, params, data, sketch=make(), checkpoint_dir=reference, **kwargs
    )
    uninterrupted, chunks[0] = chunks[0], 0
    tmp_path = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        crash(m, at)
        with pytest.raises(Crash):
            jaxattr.simulate(
                task, params, data, sketch=make(), checkpoint_dir=tmp_path, **kwargs
            )
    resumed = jaxattr.simulate(
        task, params, data, sketch=make(), checkpoint_dir=tmp_path, **kwargs
    )
    assert_same_sketch(resumed, expected)
    if crash is crash_after_save and every == 1:
        assert chunks[0] == uninterrupted  # no chunk was computed twice
    chunks[0] = 0
    again = jaxattr.simulate(
        task, params, data, sketch=make(), checkpoint_dir=tmp_path, **kwargs
    )
    assert_same_sketch(again, expected)
    assert chunks[0] == 0  # a finished checkpoint is read back, not recomputed


@pytest.mark.parametrize(
    "change, differs",
    [
        (dict(horizon=11), "settings"),
        (dict(key=jax.random.key(7)), "key"),
        (dict(chunk_size=5), "chunk_size"),
        (dict(sketch=jaxattr.Projected(12, jax.random.key(3))), "sketch"),
        (dict(ids=np.arange(20) + 100), "ids"),
    ],
)
def test_a_checkpoint_of_another_configuration_is_refused(
    dense, tmp_path, change, differs
):
    task, params, data, _ = dense
    kwargs = problem()[3]
    jaxattr.simulate(task, params, data, checkpoint_dir=tmp_path, **kwargs)
    before = (tmp_path / "run.json").read_bytes()
    with pytest.raises(ValueError, match=f"different configuration.*{differs}"):
        jaxattr.simulate(
            task, params, data, checkpoint_dir=tmp_path, **dict(kwargs, **change)
        )
    assert (tmp_path / "run.json").read_bytes() == before


def test_other_data_or_params_and_foreign_directories_are_refused(dense, tmp_path):
    task, params, data, _ = dense
    kwargs = problem()[3]
    jaxattr.simulate(task, params, data, checkpoint_dir=tmp_path / "c", **kwargs)
    other_data = (data[0] + 1.0, data[1])
    with pytest.raises(ValueError, match="train_data"):
        jaxattr.simulate(
            task, params, other_data, checkpoint_dir=tmp_path / "c", **kwargs
        )
    other_params = jax.tree.map(lambda a: a * 1.5, params)
    with pytest.raises(ValueError, match="params"):
        jaxattr.simulate(
            task, other_params, data, checkpoint_dir=tmp_path / "c", **kwargs
        )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds no jaxattr checkpoint"):
        jaxattr.simulate(task, params, data, checkpoint_dir=tmp_path / "mine", **kwargs)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxattr.simulate(task, params, data, checkpoint_every=0, **kwargs)


N, B, STEPS = 12, 4, 9


def in_training_run(sim, data, carry, steps):
    """Runs ``steps`` of a training loop whose state is ``(sim, params, opt, key)``."""
    state, params, opt_state, key = carry
    x, y = data
    for t in steps:
        idx = np.roll(np.arange(N), -t * B)[:B]
        key, _ = jax.random.split(key)
        params, opt_state, state, _ = sim.step(
            state, params, opt_state, (x[idx], y[idx]), jnp.asarray(idx)
        )
    return state, params, opt_state, key


def test_in_training_state_round_trip_continues_to_the_same_sketch(x64, tmp_path):
    params, apply = tanh_mlp(jax.random.key(0))
    data = blobs(jax.random.key(1), N)
    opt = optax.adam(0.05)
    sim = jaxattr.in_training(
        jaxattr.classification(apply), opt, horizon=3, batch_size=B
    )

    def start(num_train=N):
        opt_state = opt.init(params)
        return (
            sim.init(params, opt_state, num_train),
            params,
            opt_state,
            jax.random.key(5),
        )

    run = functools.partial(in_training_run, sim, data)
    full = run(start(), range(STEPS))
    expected = sim.finalize(full[0])

    jaxattr.save_state(tmp_path / "state", run(start(), range(4)))
    carry = jaxattr.load_state(tmp_path / "state", like=jax.eval_shape(start))
    resumed = run(carry, range(4, STEPS))
    assert_same_sketch(sim.finalize(resumed[0]), expected)
    assert np.array_equal(jax.random.key_data(resumed[3]), jax.random.key_data(full[3]))

    with pytest.raises(ValueError, match=r"does not match `like`.*responses\['b1'\]"):
        jaxattr.load_state(tmp_path / "state", like=start(N + 1))
