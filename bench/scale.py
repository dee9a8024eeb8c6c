"""Scale benchmark: all of MNIST, 10,000 queries, and how costs grow with N.

    python -m bench.scale --out bench/results/scale.json
    python -m bench.scale --sizes 2000,4000 --queries 500 --epochs 2   # smoke

For each training-set size N (default 5,000, 20,000 and 60,000 MNIST images)
a fresh process trains the MNIST-MLP of DESIGN section 6 on the first N
images, then measures, for jaxattr and for TRAK-1 at the same N:

* preparation time: jaxattr's eigen-decomposition of the default curvature
  plus its sketches; TRAK's training gradients, projection and kernel;
* bytes stored per training example;
* per-query latency of the top-10 proponents and opponents among all N
  examples, and of attribution to 110 data sources (the 10 classes and 100
  random shards);
* the process's peak resident memory.

jaxattr's per-example sketch is :class:`jaxattr.CurvatureBasis` (coefficients
along the top curvature eigenvectors; the query side costs ``rank`` forward-
mode derivatives) and its source sketch :class:`jaxattr.Grouped` read with two
forward evaluations per source. Each size runs in its own process so that peak
memory is that size's own.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattr
from bench import common
from jaxattr import baselines

SOURCES_SHARDS = 100


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def groups_of(labels: np.ndarray, key: int) -> np.ndarray:
    """Source label per example: its class (0-9) or one of 100 shards (10-109)."""
    shards = np.random.default_rng(key).integers(0, SOURCES_SHARDS, len(labels))
    return labels.astype(np.int64), shards + 10


def train(setting, data, epochs, key):
    setup = setting.train_setup()
    if epochs is not None:
        setup = type(setup)(**{**setup.__dict__, "epochs": epochs})
    trained, seconds = common.timed(common.train_full, setup, data, key, None, 0)
    return trained.params, seconds


def per_query(fn, queries, repeat: int = 1) -> float:
    """Milliseconds per query of ``fn(queries)``, after one warm-up call."""
    warm = jax.tree.map(lambda a: a[: min(len(a), 256)], queries)
    jax.block_until_ready(jax.tree.leaves(fn(warm)))
    _, seconds = common.timed(lambda: jax.tree.leaves(fn(queries)))
    return 1000.0 * seconds / len(queries[1])


def jaxattr_side(task, params, train_data, queries, groups, rank, key) -> dict:
    curvature = jaxattr.default_curvature(task, len(train_data[1]))
    basis, basis_s = common.timed(
        jaxattr.eigenbasis, curvature, params, train_data, key
    )
    simulate = lambda sketch: common.timed(
        jaxattr.simulate,
        task,
        params,
        train_data,
        key=key,
        curvature=basis,
        sketch=sketch,
    )
    coded, coded_s = simulate(jaxattr.CurvatureBasis(rank))
    sources = [simulate(jaxattr.Grouped(g)) for g in groups]
    top = jaxattr.scorer(task.margin, params, coded)
    by_source = [
        jaxattr.scorer(task.margin, params, s, readout=jaxattr.CentralDifference())
        for s, _ in sources
    ]
    return dict(
        curvature_examples=int(curvature.curvature.batch_size),
        basis_rank=int(basis.values.shape[0]),
        sketch_rank=int(coded.dim),
        prep_s=dict(
            eigenbasis=basis_s,
            per_example_sketch=coded_s,
            sources=sum(s for _, s in sources),
        ),
        bytes_per_example=coded.bytes_per_example(),
        basis_bytes=int(
            coded.dim
            * coded.coefficients.dtype.itemsize
            * sum(np.size(a) for a in jax.tree.leaves(params))
        ),
        topk_ms=per_query(lambda q: top.top_k(q, 10), queries),
        sources_ms=per_query(lambda q: [s(q) for s in by_source], queries),
        num_sources=sum(s.num_train for s, _ in sources),
    )


def trak_side(task, params, train_data, queries, groups, dim, damping, key) -> dict:
    trak, trak_s = common.timed(
        baselines.trak,
        task,
        [params],
        train_data,
        key=key,
        proj_dim=dim,
        damping=damping,
    )
    feats = trak.train_features * trak.train_scale[:, None]
    summed = [
        jax.ops.segment_sum(feats, jnp.asarray(g), int(g.max()) + 1) for g in groups
    ]

    def sources(q):
        features = trak.query_features(q)  # one backward pass + projection
        return [features @ s.T for s in summed]

    return dict(
        proj_dim=dim,
        prep_s=trak_s,
        bytes_per_example=int(trak.train_features.shape[1] * 4),
        topk_ms=per_query(lambda q: trak.top_k(q, 10), queries),
        sources_ms=per_query(sources, queries),
    )


def one_size(args) -> dict:
    """Everything for one N, in this process; returns the JSON row."""
    setting = common.SETTINGS["mnist-mlp"]
    train_data, queries = common.load_mnist(
        common.mnist_path(args.data), args.one, args.queries
    )
    key = jax.random.PRNGKey(0)
    task = jaxattr.classification(setting.model.apply)
    params, train_s = train(setting, train_data, args.epochs, key)
    log(f"N={args.one}: trained in {train_s:.1f}s")
    groups = groups_of(np.asarray(train_data[1]), 0)
    ours = jaxattr_side(task, params, train_data, queries, groups, args.rank, key)
    log(f"N={args.one}: jaxattr done")
    trak = trak_side(
        task, params, train_data, queries, groups, args.trak_dim, args.trak_damping, key
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        num_train=args.one,
        num_queries=len(queries[1]),
        train_s=train_s,
        jaxattr=ours,
        trak1=trak,
        peak_rss_gib=peak_kib / 2**20,
    )


def run_all(args) -> list:
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "bench.scale", "--one", str(n)] + passthrough(args)
        log(f"N={n}: {' '.join(cmd[1:])}")
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sys.stderr.write(out.stderr[-4000:])
        if out.returncode != 0:
            raise SystemExit(f"bench.scale: N={n} failed (exit {out.returncode}).")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


def passthrough(args) -> list:
    out = [
        "--queries",
        str(args.queries),
        "--rank",
        str(args.rank),
        "--trak-dim",
        str(args.trak_dim),
        "--trak-damping",
        str(args.trak_damping),
    ]
    if args.epochs is not None:
        out += ["--epochs", str(args.epochs)]
    if args.data:
        out += ["--data", args.data]
    return out


def table(rows: list) -> str:
    head = (
        "| N | jaxattr prep s (basis + sketches) | TRAK-1 prep s | jaxattr B/example "
        "| TRAK-1 B/example | top-10 ms/query jaxattr / TRAK-1 | 110 sources "
        "ms/query jaxattr / TRAK-1 | peak RSS GiB | wall s |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ours, trak = r["jaxattr"], r["trak1"]
        prep = ours["prep_s"]
        lines.append(
            f"| {r['num_train']} | {prep['eigenbasis']:.0f} + "
            f"{prep['per_example_sketch']:.0f} + {prep['sources']:.0f} "
            f"| {trak['prep_s']:.0f} | {ours['bytes_per_example']} "
            f"| {trak['bytes_per_example']} | {ours['topk_ms']:.2f} / "
            f"{trak['topk_ms']:.2f} | {ours['sources_ms']:.2f} / "
            f"{trak['sources_ms']:.2f} "
            f"| {r['peak_rss_gib']:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        default="5000,20000,60000",
        type=lambda s: [int(v) for v in s.split(",")],
    )
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument(
        "--rank",
        type=int,
        default=256,
        help="CurvatureBasis rank of the per-example sketch (256)",
    )
    p.add_argument("--trak-dim", type=int, default=512)
    p.add_argument("--trak-damping", type=float, default=1e-2)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--data", default=None, help="MNIST .npz (default ../shared)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if common.mnist_path(args.data) is None:
        raise SystemExit("bench.scale: MNIST not found; pass --data PATH/mnist.npz.")
    if args.one is not None:
        print(json.dumps(one_size(args)))
        return 0
    start = time.perf_counter()
    rows = run_all(args)
    print(table(rows))
    print(
        f"total wall time {time.perf_counter() - start:.0f} s on {os.cpu_count()} CPUs"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(rows=rows, argv=sys.argv[1:], date=time.ctime()), f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
