"""Sketches with a small query side: LDS against query cost and bytes, and re-ranking.

    python -m bench.sketches --out bench/results/sketches.json
    python -m bench.sketches --quick

Every sketch stores the same post-hoc responses (``jaxattr.simulate`` with its
defaults, on one eigen-decomposition of the default curvature) in another form:
dense (float32, bfloat16), random projection (``Projected``), the top singular
directions of the responses (``Adaptive``), coefficients along the top
curvature eigenvectors (``CurvatureBasis``) and per-layer low rank
(``LayerLowRank``). For each: margin LDS on the report queries (ground truth
from bench.lds's cache), readouts per query (query-side forward evaluations:
two per readout with central differences, or one jvp per readout), bytes per
training example and measured milliseconds per query with both readouts.
Beside them TRAK-1 on the same weights at k = 512, 2048 and unprojected,
undamped and with a damping tuned on the first 10% of the queries.

The goal line names the cheapest jaxattr sketch that reaches the LDS of damped
TRAK k=2048 and its query-side cost ratio (target: at least 10x fewer forward
evaluations than TRAK's backward pass and projection). The fronts mark which
rows no other row beats on LDS and cost (or bytes).

Shortlist re-ranking: a coarse sketch proposes L candidates per side and
``jaxattr.rerank`` re-scores them exactly from the dense responses with two
forward evaluations each; recall@10 of the exact dense top-10 proponents and
opponents, and milliseconds per query.
"""

import dataclasses
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxattr
from bench import common, lds, methods, prep


@dataclasses.dataclass(frozen=True)
class Options:
    """Grids of this benchmark.

    Attributes:
      projected: ``Projected`` dimensions.
      adaptive: ``Adaptive`` ranks.
      curvature: ``CurvatureBasis`` ranks.
      layer_ranks: ``LayerLowRank`` ranks.
      trak_dims: TRAK-1 projections (``None``: unprojected).
      dampings: TRAK damping grid (relative to the kernel's top eigenvalue).
      coarse: coarse sketches of the re-ranking, e.g. ``("curvature", 64)``.
      shortlists: shortlist sizes L per side.
      top: k of the top-k.
      rerank_rows: responses gathered at once while re-ranking (bounds memory).
    """

    projected: tuple = (64, 256, 1024, 4096)
    adaptive: tuple = (16, 64, 256)
    curvature: tuple = (32, 64, 128, 256, 512)
    layer_ranks: tuple = (1, 4, 16)
    trak_dims: tuple = (512, 2048, None)
    dampings: tuple = lds.Config.trak_dampings
    coarse: tuple = (("curvature", 64), ("projected", 256))
    shortlists: tuple = (10, 30, 100, 300)
    top: int = 10
    rerank_rows: int = 1024


QUICK = dict(
    projected=(64, 256, 1024),
    adaptive=(16, 64),
    curvature=(32, 64, 128),
    trak_dims=(256, 512, None),
    shortlists=(10, 30, 100),
)


# Sketch variants ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of storing the responses.

    Attributes:
      name: row name, e.g. ``"projected k=256"``.
      family: ``dense``, ``projected``, ``adaptive``, ``curvature`` or ``layer``.
      size: the family's size parameter (k, rank), None for dense.
      build: ``build(prepared, dense_sketch) -> sketch``.
    """

    name: str
    family: str
    size: int | None
    build: Callable


def variants(opts: Options, key: jax.Array) -> list:
    """Every sketch of the grid; compressed from the dense sketch where possible."""
    squeeze = lambda builder: lambda p, d: jaxattr.compress(d, builder, p.params)
    out = [
        Variant("dense f32", "dense", None, lambda p, d: d),
        Variant("dense bf16", "dense", None, squeeze(jaxattr.Dense(jnp.bfloat16))),
    ]
    out += [
        Variant(f"projected k={k}", "projected", k, squeeze(jaxattr.Projected(k, key)))
        for k in opts.projected
    ]
    out += [
        Variant(f"adaptive r={r}", "adaptive", r, squeeze(jaxattr.Adaptive(r, key)))
        for r in opts.adaptive
    ]
    out += [
        Variant(
            f"curvature r={r}",
            "curvature",
            r,
            lambda p, d, r=r: p.simulate(jaxattr.CurvatureBasis(r)),
        )
        for r in opts.curvature
    ]
    layer = _layer_builds(opts.layer_ranks)
    out += [
        Variant(f"layer rank={r}", "layer", r, layer(r))
        for r in sorted(opts.layer_ranks, reverse=True)
    ]
    return out


def _layer_builds(ranks: tuple) -> Callable:
    """``rank -> build`` of LayerLowRank sketches sharing one factorisation.

    The largest rank is compressed from the dense sketch; the others are its
    leading factors (:func:`truncate`), so every example's SVDs (the slow part
    on a CPU) are paid once rather than once per rank.
    """
    top, memo = max(ranks, default=1), {}

    def build(rank):
        def make(p, dense):
            if memo.get("dense") is not dense:
                sketch = jaxattr.compress(dense, jaxattr.LayerLowRank(top), p.params)
                memo.update(dense=dense, sketch=sketch)
            return truncate(memo["sketch"], rank)

        return make

    return build


def truncate(sketch: jaxattr.LayerLowRankSketch, rank: int):
    """The ``LayerLowRank(rank)`` sketch from one of a higher rank.

    LayerLowRank keeps each matrix's singular triplets largest first (scaled
    left vectors, right vectors), so its leading ``rank`` columns are exactly
    the rank-``rank`` truncation.
    """
    cut = lambda f: (f[0][..., :rank], f[1][..., :rank]) if isinstance(f, tuple) else f
    settings = dict(sketch.info.settings) | {"rank": rank}
    info = dataclasses.replace(sketch.info, settings=tuple(sorted(settings.items())))
    return dataclasses.replace(
        sketch, factors=[cut(f) for f in sketch.factors], info=info
    )


def readouts(sketch) -> int:
    """Readouts per query: basis directions, or one per stored row."""
    if isinstance(sketch, jaxattr.FactoredSketch):
        return sketch.dim
    return sketch.num_train


def measure(p: prep.Prepared, truth, sketch) -> dict:
    """LDS (jvp scores), both readouts' ms per query, counts and bytes."""
    report = p.queries_at(p.report)
    out, scores = {}, {}
    for name, readout in (("jvp", jaxattr.JVP()), ("cd", jaxattr.CentralDifference())):
        sc = jaxattr.scorer(p.task.margin, p.params, sketch, readout=readout)
        scores[name], out[f"ms_{name}"] = prep.ms_per_query(sc, report)
    count = readouts(sketch)
    factored = isinstance(sketch, jaxattr.FactoredSketch)
    out |= {
        "lds": prep.lds_of(scores["jvp"], truth.weights, truth.lds, p.report),
        "readouts": count,
        "forward_evaluations": 2 * count,
        "jvps": count,
        "product_forward_eq": p.num_train * count / p.num_params if factored else 0.0,
        "bytes_per_example": int(sketch.bytes_per_example()),
        "cd_vs_jvp_pearson": _pearson(scores["cd"], scores["jvp"]),
    }
    return out, np.asarray(scores["jvp"])


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def sketch_rows(p, truth, opts, dense, dense_s, key) -> tuple:
    """Rows of every variant, the exact dense scores and the coarse sketches kept."""
    keep = {(family, size) for family, size in opts.coarse}
    rows, exact, coarse = [], None, {}
    for v in variants(opts, key):
        sketch, build_s = common.timed(v.build, p, dense)
        row, scores = measure(p, truth, sketch)
        row = {"name": v.name, "family": v.family, "size": v.size} | row
        row["build_s"] = dense_s if v.name == "dense f32" else build_s
        rows.append(row)
        if v.name == "dense f32":
            exact = scores
        if (v.family, v.size) in keep:
            coarse[(v.family, v.size)] = sketch
        prep.log(f"{v.name}: LDS {row['lds']:.3f}, {row['ms_jvp']:.2f} ms/query (jvp)")
    return rows, exact, coarse


# TRAK --------------------------------------------------------------------------


def trak_rows(p: prep.Prepared, truth, opts: Options) -> list:
    """TRAK-1 on the same weights at each projection, undamped and damping-tuned."""
    rows = []
    for dim in opts.trak_dims:
        (model,), feat_s = prep.trak_models(p, [p.params], dim)
        grid = [
            (d, prep.lds_of(_trak(model, d, p.tune), truth.weights, truth.lds, p.tune))
            for d in opts.dampings
        ]
        tuned = methods.pick([({"damping": d}, v) for d, v in grid])["damping"]
        for label, damping in (("undamped", 0.0), ("damped", tuned)):
            row = _trak_row(p, truth, model, dim, damping)
            row |= {"name": f"TRAK-1 {_dim_name(dim)}, {label}", "grid": grid}
            row["build_s"] = feat_s
            rows.append(row)
            prep.log(f"{row['name']}: LDS {row['lds']:.3f}, {row['ms_jvp']:.2f} ms/q")
    return rows


def _trak(model, damping, rows) -> np.ndarray:
    return methods.trak_scores([model], damping, rows)


def _dim_name(dim) -> str:
    return "unprojected" if dim is None else f"k={dim}"


def _trak_row(p, truth, model, dim, damping) -> dict:
    _trak(model, damping, p.report)  # compiles
    scores, product_s = common.timed(_trak, model, damping, p.report)
    ms = 1000.0 * (model.query_s / len(p.queries[1]) + product_s / len(p.report))
    width = dim if dim is not None else p.num_params
    # Unprojected, the query side needs every training gradient (P floats) and
    # the n x n kernel basis: both are stored.
    stored = dim if dim is not None else p.num_params + model.train.shape[1]
    return {
        "family": "trak",
        "size": dim,
        "damping": damping,
        "lds": prep.lds_of(scores, truth.weights, truth.lds, p.report),
        "readouts": None,
        "forward_evaluations": prep.trak_query_forwards(dim),
        "jvps": None,
        "backward_passes": 1,
        "product_forward_eq": p.num_train * width / p.num_params,
        "bytes_per_example": 4 * stored + 4,
        # TRAK has one readout; the same measured cost goes in both columns.
        "ms_jvp": ms,
        "ms_cd": ms,
    }


# Goal and fronts ---------------------------------------------------------------


def goal(rows: list, opts: Options) -> dict:
    """The cheapest jaxattr sketch at damped TRAK k=2048's LDS, and its cost ratio.

    The reference is the largest projected TRAK of the grid (2048 by default).
    """
    dims = [d for d in opts.trak_dims if d is not None]
    if not dims:
        return {}
    ref_dim = 2048 if 2048 in dims else max(dims)
    ref = next(r for r in rows if r["name"] == f"TRAK-1 k={ref_dim}, damped")
    ours = [r for r in rows if r["family"] != "trak" and r["lds"] >= ref["lds"]]
    out = {"reference": ref["name"], "reference_lds": ref["lds"]}
    out["reference_forward_evaluations"] = ref["forward_evaluations"]
    if not ours:
        best = max((r for r in rows if r["family"] != "trak"), key=lambda r: r["lds"])
        return out | {"reached_by": None, "best_jaxattr": best["name"]}
    cheapest = min(ours, key=lambda r: (r["forward_evaluations"], -r["lds"]))
    ratio = ref["forward_evaluations"] / cheapest["forward_evaluations"]
    return out | {
        "reached_by": cheapest["name"],
        "lds": cheapest["lds"],
        "forward_evaluations": cheapest["forward_evaluations"],
        "jvps": cheapest["jvps"],
        "forward_ratio": ratio,
        "jvp_ratio": ref["forward_evaluations"] / cheapest["jvps"],
        "ms_ratio_cd": ref["ms_cd"] / cheapest["ms_cd"],
        "ms_ratio_jvp": ref["ms_jvp"] / cheapest["ms_jvp"],
        "met": bool(ratio >= 10.0),
    }


def mark_fronts(rows: list) -> None:
    """Marks rows on the LDS/query-cost and LDS/bytes Pareto fronts (all rows)."""
    lds_ = [r["lds"] for r in rows]
    cost = [r["forward_evaluations"] for r in rows]
    size = [r["bytes_per_example"] for r in rows]
    for r, c, b in zip(
        rows, prep.pareto(cost, lds_), prep.pareto(size, lds_), strict=True
    ):
        r["front_cost"], r["front_bytes"] = bool(c), bool(b)


# Re-ranking --------------------------------------------------------------------


def rerank_rows(p, dense, exact_scores, coarse: dict, opts: Options) -> list:
    """Recall@k of the exact dense top-k, coarse alone and re-ranked, and costs.

    Costs: ms per query over all report queries at once (throughput) and ms
    for one query at a time (latency), beside the exact dense top-k's.
    """
    report = p.queries_at(p.report)
    exact = _exact_top(np.asarray(dense.ids), exact_scores, opts.top)
    dense_sc = jaxattr.scorer(p.task.margin, p.params, dense)
    exact_fn = lambda q: _fields(dense_sc.top_k(q, opts.top))
    reference = {
        "exact_topk_ms": prep.ms_per_query(exact_fn, report)[1],
        "exact_topk_latency_ms": latency_ms(exact_fn, report),
    }
    rows = []
    for (family, size), sketch in coarse.items():
        sc = jaxattr.scorer(p.task.margin, p.params, sketch)
        base = {"coarse": f"{family} {size}", "coarse_readouts": readouts(sketch)}
        for short in (0,) + tuple(opts.shortlists):
            if short and not opts.top <= short <= p.num_train:
                continue
            fn, warm = _top_fn(sc, dense, short, len(report[1]), opts)
            found, ms = prep.ms_per_query(fn, report, warm=warm)
            row = base | _recalls(found, exact, short) | reference
            rows.append(row | {"ms": ms, "latency_ms": latency_ms(fn, report)})
        prep.log(f"re-ranking from {family} {size} done")
    return rows


def _exact_top(ids, scores, k) -> tuple:
    """Ids of the ``k`` largest and ``k`` most negative scores per query."""
    return (
        ids[np.argsort(-scores, axis=1)[:, :k]],
        ids[np.argsort(scores, axis=1)[:, :k]],
    )


def _fields(top: jaxattr.TopK) -> tuple:
    """The arrays of a TopK (a plain dataclass: block_until_ready skips it)."""
    return top.proponents, top.proponent_scores, top.opponents, top.opponent_scores


def _top_fn(sc, dense, short, num_queries, opts) -> tuple:
    """``(fn, warm)``: coarse top-k alone (``short`` 0) or re-ranked."""
    if not short:
        return (lambda q: _fields(sc.top_k(q, opts.top))), 128
    chunk = max(1, opts.rerank_rows // (2 * short))
    fn = lambda q: _fields(
        jaxattr.rerank(
            sc,
            dense,
            q,
            k=opts.top,
            shortlist=short,
            readout=jaxattr.CentralDifference(),
            query_chunk=chunk,
        )
    )
    return fn, _warm_size(num_queries, chunk)


def _warm_size(num_queries: int, chunk: int, scorer_chunk: int = 128) -> int:
    """Queries whose re-ranking compiles every shape a run on all of them meets.

    At least the scorer's query chunk (its kernels pad to it), and as many
    left over after whole re-ranking chunks as ``num_queries`` leaves.
    """
    if num_queries <= scorer_chunk:
        return num_queries
    return scorer_chunk + (num_queries - scorer_chunk) % chunk


def latency_ms(fn: Callable, queries: tuple, count: int = 5) -> float:
    """Median ms of ``fn`` on one query at a time, after compiling on query 0."""
    one = lambda i: common.take(queries, slice(i, i + 1))
    jax.block_until_ready(fn(one(0)))
    rows = range(1, min(count, len(queries[1]) - 1) + 1) or [0]
    return 1000.0 * float(np.median([common.timed(fn, one(i))[1] for i in rows]))


def _recalls(found, exact, short) -> dict:
    return {
        "shortlist": short,
        "recall_proponents": prep.recall(found[0], exact[0]),
        "recall_opponents": prep.recall(found[2], exact[1]),
        "exact_forward_evaluations": 4 * short,
    }


# The run -----------------------------------------------------------------------


def run(p: prep.Prepared, opts: Options, cache_dir) -> dict:
    truth = prep.lds_truth(p, cache_dir)
    rows = trak_rows(p, truth, opts)
    dense, dense_s = common.timed(p.simulate)
    prep.log(f"dense post-hoc sketch simulated in {dense_s:.0f} s")
    key = jax.random.fold_in(p.keys["methods"], 4)  # the sketches' random bases
    ours, exact, coarse = sketch_rows(p, truth, opts, dense, dense_s, key)
    rows = ours + rows
    mark_fronts(rows)
    return {
        "model": p.describe(),
        "options": dataclasses.asdict(opts),
        "base_config": dataclasses.asdict(p.config),
        "truth": {"subsets": p.config.subsets, "seeds": p.config.seeds},
        "rows": rows,
        "goal": goal(rows, opts),
        "default_sketch": "dense f32",
        "rerank": rerank_rows(p, dense, exact, coarse, opts),
        "machine": lds.machine(),
        "accounting": prep.ACCOUNTING,
    }


# Tables ------------------------------------------------------------------------


def sketch_table(report: dict) -> str:
    head = [("sketch", 28), ("LDS", 6), ("fwd/q", 7), ("jvp/q", 6)]
    head += [("product", 8), ("bytes/ex", 9), ("ms/q jvp", 9), ("ms/q CD", 8)]
    head += [("build s", 8), ("front", 6)]
    lines = []
    for r in report["rows"]:
        fronts = ("c" if r["front_cost"] else "") + ("b" if r["front_bytes"] else "")
        name = r["name"] + (" *" if r["name"] == report["default_sketch"] else "")
        lines.append(
            [
                name,
                prep.fmt(r["lds"]),
                r["forward_evaluations"],
                prep.fmt(r["jvps"]),
                prep.fmt(r["product_forward_eq"], 1),
                r["bytes_per_example"],
                prep.fmt(r["ms_jvp"], 2),
                prep.fmt(r["ms_cd"], 2),
                prep.fmt(r["build_s"], 1),
                fronts or "-",
            ]
        )
    return prep.table(head, lines)


def goal_text(g: dict) -> str:
    if not g:
        return "goal: no projected TRAK in the grid."
    head = (
        f"goal: LDS of {g['reference']} = {g['reference_lds']:.3f} at "
        f"{g['reference_forward_evaluations']} forward-evaluation equivalents per query"
    )
    if g["reached_by"] is None:
        return f"{head}; no jaxattr sketch reaches it (best: {g['best_jaxattr']})."
    return (
        f"{head}; reached by {g['reached_by']} (LDS {g['lds']:.3f}) with "
        f"{g['forward_evaluations']} forward evaluations (CD) or {g['jvps']} jvps: "
        f"{g['forward_ratio']:.1f}x fewer forward evaluations "
        f"({g['jvp_ratio']:.1f}x counting jvps); measured ms/query "
        f"{g['ms_ratio_cd']:.1f}x (CD) and {g['ms_ratio_jvp']:.1f}x (jvp) less. "
        f"10x target {'met' if g['met'] else 'NOT met'}."
    )


def default_text(report: dict) -> str:
    rows = report["rows"]
    row = next(r for r in rows if r["name"] == report["default_sketch"])
    return (
        f"default sketch ({report['default_sketch']}, jaxattr.simulate's default): "
        f"{_front_text(row, rows, 'forward_evaluations', 'front_cost')} the "
        f"LDS/query-cost front, "
        f"{_front_text(row, rows, 'bytes_per_example', 'front_bytes')} the "
        "LDS/bytes front."
    )


def _front_text(row: dict, rows: list, cost: str, flag: str) -> str:
    if row[flag]:
        return "on"
    beats = [
        f"{r['name']} (LDS {r['lds']:.4f} vs {row['lds']:.4f}, {cost} {r[cost]} vs "
        f"{row[cost]})"
        for r in rows
        if r[cost] <= row[cost]
        and r["lds"] >= row["lds"]
        and (r[cost] < row[cost] or r["lds"] > row["lds"])
    ]
    return f"off (beaten by {'; '.join(beats[:3])})"


def rerank_table(report: dict) -> str:
    head = [("coarse", 16), ("readouts", 9), ("L", 5), ("+fwd", 6)]
    head += [("recall pro", 11), ("recall opp", 11), ("ms/q", 8), ("1-query ms", 11)]
    lines = [
        [
            r["coarse"],
            r["coarse_readouts"],
            r["shortlist"] or "-",
            r["exact_forward_evaluations"],
            prep.fmt(r["recall_proponents"]),
            prep.fmt(r["recall_opponents"]),
            prep.fmt(r["ms"], 2),
            prep.fmt(r["latency_ms"], 2),
        ]
        for r in report["rerank"]
    ]
    first = report["rerank"][0] if report["rerank"] else {}
    return prep.table(head, lines) + (
        f"\nexact dense top-{report['options']['top']} by jvp over all training "
        f"examples: {prep.fmt(first.get('exact_topk_ms'), 2)} ms/q batched, "
        f"{prep.fmt(first.get('exact_topk_latency_ms'), 2)} ms for one query."
    )


def text(report: dict) -> str:
    m, k = report["model"], report["options"]["top"]
    return "\n".join(
        [
            f"{m['setting']}; {m['num_train']} train, {m['report_queries']} report "
            f"queries ({m['tune_queries']} tune); {m['num_params']:,} parameters; "
            f"LDS over {report['truth']['subsets']} half subsets x "
            f"{report['truth']['seeds']} seeds",
            "",
            sketch_table(report),
            "fwd/q: query-side forward evaluations (jaxattr: 2 per readout, central "
            "differences; TRAK: equivalents of its backward pass and projection); "
            "jvp/q: readouts as jvps; product: the final product in forward-"
            "evaluation equivalents; front: c = on the LDS/fwd front, b = on the "
            "LDS/bytes front; * = the default sketch.",
            "",
            goal_text(report["goal"]),
            default_text(report),
            "",
            f"Shortlist re-ranking: recall@{k} of the exact dense top-{k} (L = - : "
            "coarse top-k alone; +fwd: exact forward evaluations per query, 2 per "
            "candidate, L candidates per side; ms/q: all report queries at once; "
            "1-query ms: one query at a time, median of 5)",
            rerank_table(report),
            "",
            prep.ACCOUNTING,
        ]
    )


# Command line ------------------------------------------------------------------


GRIDS = ("projected", "adaptive", "curvature", "layer_ranks", "trak_dims", "shortlists")


def parse(argv=None) -> tuple:
    p = prep.parser("python -m bench.sketches", __doc__)
    for name in GRIDS:
        p.add_argument("--" + name.replace("_", "-"), type=prep.ints)
    p.add_argument(
        "--coarse",
        type=lambda s: tuple(
            (part.split(":")[0], int(part.split(":")[1])) for part in s.split(",")
        ),
        help="coarse sketches as family:size, e.g. curvature:64,projected:256",
    )
    p.add_argument("--top", type=int)
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for name in (*GRIDS, "coarse", "top"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return prep.base_config(args), Options(**values), args


def main(argv=None) -> int:
    config, opts, args = parse(argv)
    return prep.main_of("sketches", config, opts, args, run, text)


if __name__ == "__main__":
    sys.exit(main())
