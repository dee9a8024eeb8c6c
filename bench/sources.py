"""Source attribution: per-query cost against TRAK, and source-level LDS.

    python -m bench.sources --out bench/results/sources.json
    python -m bench.sources --quick

Attribution is linear in the training examples, so the score of a data source
is exactly the sum of its members' scores. jaxattr simulates one response per
source (``jaxattr.Grouped``) and reads a query against S sources with 2S
forward evaluations (central differences) or S jvps, whatever the number of
examples and parameters. TRAK-M pays M backward passes and M projections of
the query gradient, then an S x (M k) product with its summed training
features. Sources: all data (S = 1), the 10 classes, 100 random shards.

Source-level LDS: models retrained on random halves of the sources (whole
classes or whole shards), at least 2 seeds each (cached on disk); the
prediction for a subset is the sum of its sources' scores. jaxattr runs with
the documented post-hoc defaults; TRAK-1 and TRAK-10 (the first half-data
models of bench.lds, dattri's protocol) with a damping tuned on the first 10%
of the queries. Everything is measured in one run on the same weights.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxattr
from bench import common, lds, methods, prep
from jaxattr import evaluate


@dataclasses.dataclass(frozen=True)
class Options:
    """What this benchmark adds to the bench.lds sizes.

    Attributes:
      shards: number of random shards.
      class_subsets, shard_subsets: retrained subsets of half the sources.
      seeds: retraining seeds per subset.
      ensembles: TRAK-M sizes (on the first M half-data models of bench.lds).
      proj_dim: TRAK's projection ``k``.
      dampings: TRAK damping grid (relative to the kernel's top eigenvalue).
    """

    shards: int = 100
    class_subsets: int = 50
    shard_subsets: int = 100
    seeds: int = 2
    ensembles: tuple = (1, 10)
    proj_dim: int = 512
    dampings: tuple = lds.Config.trak_dampings


QUICK = dict(class_subsets=20, shard_subsets=20, ensembles=(1, 5), proj_dim=256)


@dataclasses.dataclass(frozen=True)
class Grouping:
    """A partition of the training set into sources.

    Attributes:
      name: ``"all"``, ``"classes"`` or ``"shards"``.
      groups: ``(num_train,)`` source of each example, ``0 .. num_sources-1``.
      subsets: retrained subsets for the LDS (0: no LDS, e.g. one source).
    """

    name: str
    groups: np.ndarray
    subsets: int

    @property
    def num_sources(self) -> int:
        return int(self.groups.max()) + 1


def groupings(labels: np.ndarray, opts: Options, seed: int) -> list:
    """All data, the classes, and random shards of (near) equal size."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    shards = np.empty(n, np.int64)
    shards[order] = np.arange(n) % min(opts.shards, n)
    classes = np.unique(labels, return_inverse=True)[1]
    return [
        Grouping("all", np.zeros(n, np.int64), 0),
        Grouping("classes", classes.astype(np.int64), opts.class_subsets),
        Grouping("shards", shards, opts.shard_subsets),
    ]


# jaxattr -----------------------------------------------------------------------


def jaxattr_side(p: prep.Prepared, grouping: Grouping) -> dict:
    """Grouped sketch of the post-hoc defaults; jvp scores and both readouts' cost."""
    sketch, sim_s = common.timed(p.simulate, jaxattr.Grouped(grouping.groups))
    report = p.queries_at(p.report)
    out = {"simulation_s": sim_s, "bytes_per_source": sketch.bytes_per_example()}
    for name, readout in (("jvp", jaxattr.JVP()), ("cd", jaxattr.CentralDifference())):
        sc = jaxattr.scorer(p.task.margin, p.params, sketch, readout=readout)
        scores, out[f"ms_{name}"] = prep.ms_per_query(sc, report)
        out[f"scores_{name}"] = np.asarray(scores)
    s = grouping.num_sources
    out["counts_cd"] = {"forward_evaluations": 2 * s, "backward_passes": 0}
    out["counts_jvp"] = {"jvps": s, "backward_passes": 0}
    out["cd_vs_jvp_pearson"] = _pearson(out["scores_cd"], out["scores_jvp"])
    return out


def _pearson(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# TRAK --------------------------------------------------------------------------


def source_features(models: list, groups: np.ndarray, num_sources: int) -> list:
    """Per model, ``(num_sources, d')``: training features summed per source.

    ``tau(S, q) = sum_{b in S} tau(b, q)``; each model's features are scaled by
    the ensemble's ``1 - p_b`` before the sum, as in TRAK's score.
    """
    reweight = jnp.mean(jnp.stack([m.one_minus_p for m in models]), 0)
    ids = jnp.asarray(groups)
    return [
        jax.ops.segment_sum(m.train * reweight[:, None], ids, num_sources)
        for m in models
    ]


def trak_source_scores(models: list, summed: list, damping: float, rows) -> np.ndarray:
    """``(len(rows), num_sources)`` TRAK-M scores from featurised models."""
    n = models[0].train.shape[0]
    total = 0.0
    for m, s in zip(models, summed, strict=True):
        weighted = m.queries[rows] * methods.inverse_values(m.values, damping)
        total = total + weighted @ s.T
    return np.asarray(total * (n / len(models)))


def trak_side(p, models, grouping, damping_of, truth) -> dict:
    """TRAK-M against one grouping: tuned damping, scores, cost per query."""
    summed = source_features(models, grouping.groups, grouping.num_sources)
    grid = []
    if truth is not None:
        grid = [
            (
                d,
                _source_lds(
                    trak_source_scores(models, summed, d, p.tune), truth, p.tune
                ),
            )
            for d in damping_of
        ]
    # Without a ground truth (one source) nothing to tune; the cost is the same.
    damping = max(grid, key=lambda g: g[1])[0] if grid else damping_of[0]
    trak_source_scores(models, summed, damping, p.report)  # compiles
    scores, product_s = common.timed(
        trak_source_scores, models, summed, damping, p.report
    )
    features_ms = 1000.0 * sum(m.query_s for m in models) / len(p.queries[1])
    product_ms = 1000.0 * product_s / len(p.report)
    return {
        "damping": damping if grid else None,
        "grid": grid,
        "scores": scores,
        "ms": features_ms + product_ms,
        "ms_query_features": features_ms,
        "ms_product": product_ms,
    }


def trak_counts(p: prep.Prepared, num_models: int, dim: int, num_sources: int) -> dict:
    width = num_models * dim
    return {
        "backward_passes": num_models,
        "projection_mults": num_models * p.num_params * dim,
        "product_mults": num_sources * width,
        "forward_equivalents": prep.trak_query_forwards(dim, num_models)
        + num_sources * width / p.num_params,
    }


# Source-level ground truth -----------------------------------------------------


@dataclasses.dataclass
class SourceTruth:
    """Retraining on subsets of whole sources.

    Attributes:
      weights: ``(num_subsets, num_sources)`` 0/1 source subsets.
      measured: :class:`jaxattr.evaluate.Measurements` of the retrained models.
      seconds: wall-clock seconds of the retraining (0 when cached).
    """

    weights: np.ndarray
    measured: evaluate.Measurements
    seconds: float


def source_truth(p, grouping, opts, index, cache_dir) -> SourceTruth:
    """Retrains on random halves of the sources (keys disjoint from bench.lds's)."""
    root = jax.random.fold_in(jax.random.PRNGKey(p.config.seed), 100 + index)
    subset_key, seed_key = jax.random.split(root)
    weights = evaluate.random_subsets(
        subset_key, grouping.subsets, grouping.num_sources
    )
    measured, seconds = common.timed(
        evaluate.retrain,
        p.setting.train_setup(),
        p.train,
        p.queries,
        weights[:, grouping.groups],
        seed_key,
        num_seeds=opts.seeds,
        models_per_chunk=p.config.models_per_chunk,
        cache_dir=cache_dir,
        progress=p.config.progress,
    )
    prep.log(
        f"{grouping.name}: {grouping.subsets} source subsets x {opts.seeds} seeds "
        f"retrained in {seconds:.0f} s"
    )
    return SourceTruth(weights, measured, seconds)


def _source_lds(scores, truth: SourceTruth, rows) -> float:
    return prep.lds_of(scores, truth.weights, truth.measured, rows)


# The run -----------------------------------------------------------------------


def ensemble(p: prep.Prepared, opts: Options) -> tuple:
    """The first ``max(ensembles)`` half-data models of bench.lds, featurised."""
    config = dataclasses.replace(p.config, ensembles=opts.ensembles)
    weights = prep.lds_weights(p)
    (models, train_s) = lds.train_ensemble(
        config, p.setting, p.train, weights, p.keys["ensemble"]
    )
    prep.log(f"{len(models)} half-data models trained in {train_s:.0f} s")
    featurised, feat_s = prep.trak_models(p, list(models), opts.proj_dim)
    prep.log(f"TRAK features (k={opts.proj_dim}) in {feat_s:.0f} s")
    return featurised, {"training_s": train_s, "featurisation_s": feat_s}


def run(p: prep.Prepared, opts: Options, cache_dir) -> dict:
    """Every grouping: jaxattr and TRAK-M costs, and the LDS where defined."""
    models, trak_prep = ensemble(p, opts)
    rows = []
    for index, grouping in enumerate(
        groupings(np.asarray(p.train[1]), opts, p.config.seed)
    ):
        rows.append(_grouping_row(p, opts, models, grouping, index, cache_dir))
    return {
        "model": p.describe(),
        "options": dataclasses.asdict(opts),
        "base_config": dataclasses.asdict(p.config),
        "trak_prep": trak_prep,
        "groupings": rows,
        "machine": lds.machine(),
        "accounting": prep.ACCOUNTING,
    }


def _grouping_row(p, opts, models, grouping, index, cache_dir) -> dict:
    truth = None
    if grouping.subsets:
        truth = source_truth(p, grouping, opts, index, cache_dir)
    ours = jaxattr_side(p, grouping)
    row = {
        "name": grouping.name,
        "num_sources": grouping.num_sources,
        "jaxattr": _drop_scores(ours),
        "trak": {},
        "truth_s": None if truth is None else truth.seconds,
    }
    if truth is not None:
        row["jaxattr"]["lds"] = _source_lds(ours["scores_jvp"], truth, p.report)
    for size in opts.ensembles:
        trak = trak_side(p, models[:size], grouping, opts.dampings, truth)
        if truth is not None:
            trak["lds"] = _source_lds(trak["scores"], truth, p.report)
        trak["counts"] = trak_counts(p, size, opts.proj_dim, grouping.num_sources)
        row["trak"][f"TRAK-{size}"] = _drop_scores(trak)
    prep.log(f"{grouping.name}: S={grouping.num_sources} done")
    return row


def _drop_scores(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("scores")}


# Tables ------------------------------------------------------------------------


def cost_table(report: dict) -> str:
    head = [("sources", 8), ("S", 4), ("method", 12), ("ms/query", 9)]
    head += [("counted per query", 30), ("TRAK/this ms", 14), ("TRAK/this fwd", 14)]
    lines = []
    for g in report["groupings"]:
        lines += _our_cost_lines(g) + _trak_cost_lines(g)
    names = " / ".join(report["groupings"][0]["trak"])
    return (
        prep.table(head, lines) + f"\nTRAK/this: {names} divided by this row, in "
        "measured ms per query and in forward evaluations (equivalents) counted."
    )


def _our_cost_lines(g: dict) -> list:
    ours, traks = g["jaxattr"], g["trak"].values()
    ratio = lambda values: " / ".join(f"{v:.1f}" for v in values)
    forwards = ours["counts_cd"]["forward_evaluations"]
    lines = []
    for readout, label in (("cd", "jaxattr CD"), ("jvp", "jaxattr jvp")):
        ms = ours[f"ms_{readout}"]
        what = f"{forwards} forward evaluations"
        by_count = ratio(t["counts"]["forward_equivalents"] / forwards for t in traks)
        if readout == "jvp":
            what, by_count = f"{ours['counts_jvp']['jvps']} jvps", "-"
        by_ms = ratio(t["ms"] / ms for t in traks)
        lines.append([g["name"], g["num_sources"], label, f"{ms:.3f}", what])
        lines[-1] += [by_ms, by_count]
    return lines


def _trak_cost_lines(g: dict) -> list:
    lines = []
    for name, t in g["trak"].items():
        c = t["counts"]
        what = f"{c['backward_passes']} bwd: {c['forward_equivalents']:.0f} fwd-eq"
        lines.append([g["name"], g["num_sources"], name, f"{t['ms']:.3f}", what])
        lines[-1] += ["", ""]
    return lines


def lds_table(report: dict) -> str:
    head = [("sources", 12), ("S", 4), ("subsets", 8), ("jaxattr", 8)]
    names = list(report["groupings"][0]["trak"])
    head += [(f"{n} (damping)", 20) for n in names]
    lines = []
    for g in report["groupings"]:
        if "lds" not in g["jaxattr"]:
            continue
        cells = [g["name"], g["num_sources"], _subsets(report, g)]
        cells.append(prep.fmt(g["jaxattr"]["lds"]))
        for n in names:
            t = g["trak"][n]
            cells.append(f"{prep.fmt(t['lds'])} ({t['damping']:g})")
        lines.append(cells)
    return prep.table(head, lines)


def _subsets(report, g) -> int:
    opts = report["options"]
    return opts["class_subsets"] if g["name"] == "classes" else opts["shard_subsets"]


def text(report: dict) -> str:
    m = report["model"]
    opts = report["options"]
    return "\n".join(
        [
            f"{m['setting']}; {m['num_train']} train, {m['report_queries']} report "
            f"queries ({m['tune_queries']} tune); {m['num_params']:,} parameters; "
            f"TRAK k={opts['proj_dim']}",
            "",
            "Per-query cost of scoring every source",
            cost_table(report),
            "",
            f"Source-level LDS (margin; {opts['seeds']} seeds; report queries)",
            lds_table(report),
            "",
            prep.ACCOUNTING,
        ]
    )


# Command line ------------------------------------------------------------------


def parse(argv=None) -> tuple:
    p = prep.parser("python -m bench.sources", __doc__)
    p.add_argument("--shards", type=int)
    p.add_argument("--class-subsets", type=int)
    p.add_argument("--shard-subsets", type=int)
    p.add_argument("--source-seeds", dest="source_seeds", type=int)
    p.add_argument("--ensembles", type=prep.ints)
    p.add_argument("--proj-dim", type=int)
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for name in ("shards", "class_subsets", "shard_subsets", "ensembles", "proj_dim"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.source_seeds is not None:
        values["seeds"] = args.source_seeds
    return prep.base_config(args), Options(**values), args


def main(argv=None) -> int:
    config, opts, args = parse(argv)
    if max(opts.ensembles) > config.subsets:
        raise SystemExit(
            f"TRAK-{max(opts.ensembles)} needs {max(opts.ensembles)} half-data "
            f"models but there are {config.subsets} LDS subsets; lower --ensembles."
        )
    return prep.main_of("sources", config, opts, args, run, text)


if __name__ == "__main__":
    sys.exit(main())
