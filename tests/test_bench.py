"""The LDS benchmark: its shortcuts against the library, a tiny run, the notebook."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxattr
from bench import common, methods  # the repository root is on sys.path
from conftest import assert_close, blobs, tanh_mlp
from jaxattr import baselines, evaluate

REPO = Path(__file__).resolve().parent.parent
needs_mnist = pytest.mark.skipif(
    common.mnist_path() is None, reason="MNIST not found ($JAXATTR_MNIST)"
)


@pytest.fixture
def problem(x64):
    params, apply = tanh_mlp(jax.random.key(0))
    train = blobs(jax.random.key(1), 24)
    queries = blobs(jax.random.key(2), 5)
    return jaxattr.classification(apply), params, train, queries


@pytest.mark.parametrize("dim", [4, None])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_featurised_trak_equals_baselines_trak(problem, dim, damping):
    task, params, train, queries = problem
    models = [params, jax.tree.map(lambda a: a * 0.9, params)]
    key = jax.random.key(3)
    featurised = [
        methods.featurise(
            task, p, train, queries, jax.random.fold_in(key, m), dim, common.Clock()
        )
        for m, p in enumerate(models)
    ]
    top = featurised[0].values[0]  # the bench damps relative to the top eigenvalue
    ours = methods.trak_scores(featurised[:1], damping, np.arange(5))
    ref = baselines.trak(
        task, models[:1], train, key=key, proj_dim=dim, damping=damping * float(top)
    )
    assert_close(ours, ref(queries), rtol=1e-6)
    if damping:  # ensembles: per-model damping, so compare against one model each
        both = methods.trak_scores(featurised, damping, np.arange(5))
        assert both.shape == (5, 24)


def test_trak_self_influence_is_the_diagonal(problem):
    task, params, train, _ = problem
    model = methods.featurise(
        task, params, train, train, jax.random.key(3), 6, common.Clock()
    )
    full = methods.trak_scores([model], 1e-2, np.arange(24))
    assert_close(methods.trak_self([model], 1e-2), np.diag(full), rtol=1e-6)


def test_closed_form_grid_equals_simulate(problem):
    task, params, train, queries = problem
    ctx = _context(task, params, train, queries)
    basis = methods._basis(task, params, train, ctx.key)
    closed = methods._ClosedForm(ctx, basis)
    for hp in ({"horizon": 30, "damping": 1e-3}, {"horizon": None, "damping": 1e-2}):
        sketch = methods._simulate(ctx, basis, hp)
        sim = jaxattr.scorer(task.margin, params, sketch)(queries)
        assert_close(closed.scores(hp, queries), sim, rtol=1e-6)


def test_neg_loss_scores_are_margin_scores_times_a_query_factor(problem):
    task, params, train, queries = problem
    sketch = jaxattr.simulate(task, params, train, key=jax.random.key(0), horizon=20)
    margin = jaxattr.scorer(task.margin, params, sketch)(queries)
    neg_loss = jaxattr.scorer(task.neg_loss, params, sketch)(queries)
    factor = jax.nn.sigmoid(-common.margins(task, params, queries))
    assert_close(neg_loss, factor[:, None] * margin, rtol=1e-8)


def test_train_full_is_evaluates_full_set_model(x64):
    params0, apply = tanh_mlp(jax.random.key(0))
    setup = evaluate.TrainSetup(
        init_fn=lambda key: jax.tree.map(lambda a: a + 0 * key[0], params0),
        apply_fn=apply,
        optimizer=optax.sgd(0.1, momentum=0.9),
        epochs=3,
        batch_size=8,
        batching="fixed",
    )
    train = blobs(jax.random.key(1), 21)
    key = jax.random.PRNGKey(4)
    task = jaxattr.classification(apply)
    sim = jaxattr.in_training(task, setup.optimizer, horizon=2, batch_size=8)
    ours = common.train_full(setup, train, key, sim, sim_epochs=1)
    assert_close(ours.params, evaluate.train_model(setup, train, key), rtol=1e-9)
    assert ours.sketch.num_train == 21


def _context(task, params, train, queries):
    return methods.Context(
        task,
        params,
        train,
        queries,
        np.arange(2),
        np.arange(2, 5),
        np.ones((2, 24)),
        None,
        jax.random.key(5),
        None,
    )


TINY = [
    "--setting", "mnist-lr", "--num-train", "100", "--num-test", "20",
    "--epochs", "2", "--subsets", "6", "--seeds", "2", "--loo", "5",
    "--ensembles", "1,2", "--ens-proj-dim", "16", "--full-proj-dim", "32",
    "--sim-horizon", "3", "--cg-iters", "5", "--no-peers", "--no-cache",
    "--no-explicit",
]  # fmt: skip


@needs_mnist
def test_tiny_benchmark_run_prints_and_writes_every_method(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.lds", *TINY, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[:3] == [
        "jaxattr post-hoc (defaults)",
        "jaxattr post-hoc (tuned)",
        "jaxattr in-training",
    ]
    assert any(n.startswith("TRAK-2 half models") for n in names)
    assert {"gradient dot", "IF-CG", "IF explicit (GGN)"} <= set(names)
    assert report["rows"][names.index("IF explicit (GGN)")]["note"].startswith("skip")
    scored = [r for r in report["rows"] if r["metrics"]]
    assert len(scored) >= 12
    for row in scored:
        assert -1 <= row["metrics"]["lds_margin"] <= 1
        assert row["metrics"]["num_queries"] in (18, 5)
    assert all(r["auc"] is not None for r in scored[:3])
    assert "jaxattr post-hoc (tuned)" in done.stdout
    assert "per-query cost" in done.stdout


@needs_mnist
def test_notebook_runs_at_a_small_size(tmp_path):
    """Executes the notebook's code cells in order, as plain Python."""
    notebook = json.loads((REPO / "notebooks/lds_small.ipynb").read_text())
    code = [
        "".join(cell["source"])
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
    ]
    env = dict(os.environ, JAXATTR_NOTEBOOK_SIZE="tiny", MPLBACKEND="Agg")
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(code) + "\nfig_subsets.savefig('a.png')\n")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "a.png").exists()
    assert "jaxattr post-hoc" in done.stdout
