"""The source-attribution and sketch benchmarks: their shortcuts, tiny runs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxattr
from bench import common, methods, prep, sketches, sources
from conftest import assert_close, blobs, tanh_mlp

REPO = Path(__file__).resolve().parent.parent
needs_mnist = pytest.mark.skipif(
    common.mnist_path() is None, reason="MNIST not found ($JAXATTR_MNIST)"
)


@pytest.mark.parametrize("dim", [4, None])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_trak_source_scores_sum_the_example_scores(x64, dim, damping):
    params, apply = tanh_mlp(jax.random.key(0))
    task = jaxattr.classification(apply)
    train, queries = blobs(jax.random.key(1), 24), blobs(jax.random.key(2), 5)
    models = [params, jax.tree.map(lambda a: a * 0.9, params)]
    featurised = [
        methods.featurise(
            task, p, train, queries, jax.random.key(m), dim, common.Clock()
        )
        for m, p in enumerate(models)
    ]
    groups = np.arange(24) % 3
    summed = sources.source_features(featurised, groups, 3)
    ours = sources.trak_source_scores(featurised, summed, damping, np.arange(5))
    per_example = methods.trak_scores(featurised, damping, np.arange(5))
    assert_close(ours, per_example @ np.eye(3)[groups], rtol=1e-9)


def test_truncated_layer_sketch_equals_the_lower_rank_builder(tiny):
    task, params, data = tiny
    dense = jaxattr.simulate(task, params, data, key=jax.random.key(0), horizon=20)
    high = jaxattr.compress(dense, jaxattr.LayerLowRank(3), params)
    low = jaxattr.compress(dense, jaxattr.LayerLowRank(1), params)
    cut = sketches.truncate(high, 1)
    score = lambda s: jaxattr.scorer(task.margin, params, s)(data)
    assert_close(score(cut), score(low), rtol=1e-10)
    assert dict(cut.info.settings)["rank"] == 1


def test_groupings_partition_the_training_set():
    labels = np.array([3, 1, 1, 7, 3, 3, 1, 7, 7, 7, 1])
    opts = sources.Options(shards=4)
    everything, classes, shards = sources.groupings(labels, opts, seed=0)
    assert everything.num_sources == 1 and everything.subsets == 0
    assert classes.num_sources == 3
    assert np.array_equal(np.unique(labels, return_inverse=True)[1], classes.groups)
    assert shards.num_sources == 4
    assert sorted(np.bincount(shards.groups)) == [2, 3, 3, 3]


def test_pareto_front_and_recall():
    cost = [1, 2, 2, 3, 5]
    value = [0.1, 0.3, 0.2, 0.3, 0.5]
    assert prep.pareto(cost, value).tolist() == [True, True, False, False, True]
    found = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[3, 2, 9], [7, 8, 9]])
    assert prep.recall(found, exact) == pytest.approx(1 / 3)


def test_rerank_warm_up_meets_every_chunk_shape():
    for queries, chunk in ((450, 1), (450, 5), (450, 17), (450, 51), (90, 5)):
        warm = sketches._warm_size(queries, chunk)
        assert min(queries, 128) <= warm <= queries
        assert warm % chunk == queries % chunk or warm == queries


def test_goal_picks_the_cheapest_sketch_at_the_reference_lds():
    row = lambda name, family, lds, fwd, jvps: dict(
        name=name,
        family=family,
        lds=lds,
        forward_evaluations=fwd,
        jvps=jvps,
        ms_cd=1.0,
        ms_jvp=1.0,
    )
    rows = [
        row("TRAK-1 k=2048, damped", "trak", 0.4, 2051, None),
        row("curvature r=64", "curvature", 0.41, 128, 64),
        row("curvature r=32", "curvature", 0.39, 64, 32),
        row("dense f32", "dense", 0.5, 10000, 5000),
    ]
    g = sketches.goal(rows, sketches.Options(trak_dims=(512, 2048)))
    assert g["reached_by"] == "curvature r=64"
    assert g["forward_ratio"] == pytest.approx(2051 / 128) and g["met"]


def _run(module: str, args: list, tmp_path) -> dict:
    out = tmp_path / f"{module}.json"
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


TINY = [
    "--setting", "mnist-lr", "--num-train", "60", "--num-test", "12",
    "--epochs", "1", "--subsets", "4", "--seeds", "1", "--no-cache",
]  # fmt: skip


@needs_mnist
def test_tiny_sources_run(tmp_path):
    args = TINY + [
        "--shards", "6", "--class-subsets", "4", "--shard-subsets", "4",
        "--source-seeds", "2", "--ensembles", "1,2", "--proj-dim", "8",
    ]  # fmt: skip
    report, stdout = _run("sources", args, tmp_path)
    rows = {g["name"]: g for g in report["groupings"]}
    assert [rows[n]["num_sources"] for n in ("all", "classes", "shards")] == [1, 10, 6]
    for g in rows.values():
        ours = g["jaxattr"]
        assert ours["counts_cd"]["forward_evaluations"] == 2 * g["num_sources"]
        assert ours["ms_cd"] > 0 and ours["ms_jvp"] > 0
        assert ours["cd_vs_jvp_pearson"] > 0.99
        assert set(g["trak"]) == {"TRAK-1", "TRAK-2"}
        assert g["trak"]["TRAK-2"]["counts"]["backward_passes"] == 2
    for name in ("classes", "shards"):
        assert -1 <= rows[name]["jaxattr"]["lds"] <= 1
        assert -1 <= rows[name]["trak"]["TRAK-2"]["lds"] <= 1
    assert "lds" not in rows["all"]["jaxattr"]
    assert "Source-level LDS" in stdout


@needs_mnist
def test_tiny_sketches_run(tmp_path):
    args = TINY + [
        "--projected", "8", "--adaptive", "4", "--curvature", "8",
        "--layer-ranks", "1", "--trak-dims", "16,none", "--coarse", "curvature:8",
        "--shortlists", "20",
    ]  # fmt: skip
    report, stdout = _run("sketches", args, tmp_path)
    names = [r["name"] for r in report["rows"]]
    assert names[:2] == ["dense f32", "dense bf16"]
    assert {"projected k=8", "adaptive r=4", "curvature r=8", "layer rank=1"} <= set(
        names
    )
    assert "TRAK-1 unprojected, damped" in names
    for r in report["rows"]:
        assert -1 <= r["lds"] <= 1 and r["bytes_per_example"] > 0
    assert any(r["front_cost"] for r in report["rows"])
    assert report["goal"]["reference"] == "TRAK-1 k=16, damped"
    shortlists = [r["shortlist"] for r in report["rerank"]]
    assert shortlists == [0, 20]
    assert report["rerank"][-1]["exact_forward_evaluations"] == 80
    for r in report["rerank"]:
        assert 0 <= r["recall_proponents"] <= 1 and 0 <= r["recall_opponents"] <= 1
    assert "goal: LDS of TRAK-1 k=16, damped" in stdout
