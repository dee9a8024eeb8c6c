"""LDS benchmark: every attribution method on the same weights, against retraining.

    python -m bench.lds --setting mnist-mlp --out bench/results/mnist-mlp.json
    python -m bench.lds --setting mnist-lr --quick

Trains the model once (simulating in-training attribution in its last epochs),
retrains on random half subsets and leave-one-out sets for the ground truth
(cached on disk), runs every method with hyperparameters tuned on the first 10%
of the queries, and reports on the other 90%: LDS (margin and -loss targets,
seed-averaged and 1-seed), LOO, noisy-label AUC, preparation time, per-query
cost and bytes per training example. See bench/README.md.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # One XLA device per core: ground-truth retraining splits its models over them.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
    ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxattr  # noqa: E402
from bench import common, methods  # noqa: E402
from bench import peers as peers_mod  # noqa: E402
from jaxattr import evaluate  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and grids of one benchmark run (defaults: the full protocol)."""

    setting: str = "mnist-mlp"
    num_train: int = 5000
    num_test: int = 500
    epochs: int | None = None
    subsets: int = 100
    seeds: int = 5
    loo: int = 100
    tune_fraction: float = 0.1
    sim_epochs: int = 1
    sim_horizon: int = 50
    ensembles: tuple = (1, 10, 50)
    ens_proj_dim: int = 512
    full_proj_dim: int = 2048
    posthoc_horizons: tuple = (100, 300, 1000, None)
    posthoc_dampings: tuple = (1e-4, 1e-3, 1e-2)
    trak_dampings: tuple = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    if_dampings: tuple = (1e-3, 1e-2, 1e-1)
    cg_iters: int = 20
    cg_queries: int | None = None
    cg_self: bool = True
    explicit: bool = True
    noisy: bool = True
    noise: float = 0.1
    noisy_ensemble_max: int | None = None
    noisy_checkpoints: tuple = (5, 10, 20)
    peers: bool = True
    peer_timeout: int = 1800
    seed: int = 0
    models_per_chunk: int = 20
    progress: bool = False


QUICK = dict(
    num_train=1000,
    num_test=100,
    subsets=20,
    seeds=2,
    loo=20,
    ensembles=(1, 5, 10),
    ens_proj_dim=256,
    full_proj_dim=512,
    sim_horizon=20,
    cg_iters=10,
    posthoc_horizons=(300, None),
    trak_dampings=(0.0, 1e-3, 1e-2),
    explicit=False,
)


def setting_defaults(name: str) -> dict:
    """Per-setting choices that keep the full run near 1.5 hours on 2 cores."""
    if name == "mnist-mlp":
        # 5,000 CG solves for self-influence would take hours here; in-training
        # at horizon 20 (not the default 50) and TRAK self-influence from at most
        # 10 noisy-label models keep the run near 1.5 hours on 2 shared cores.
        return dict(
            cg_queries=50,
            if_dampings=(1e-2, 1e-1),
            cg_self=False,
            sim_horizon=20,
            noisy_ensemble_max=10,
            peer_timeout=600,
        )
    return {}


# Logging ---------------------------------------------------------------------

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr)
    sys.stderr.flush()


# Ground truth ----------------------------------------------------------------


@dataclasses.dataclass
class Truth:
    """Retraining results: LDS subsets, LOO removals and their measurements."""

    weights: np.ndarray
    lds: evaluate.Measurements
    removed: np.ndarray
    loo: evaluate.Measurements
    seconds: dict


def keys(config: Config) -> dict:
    root = jax.random.PRNGKey(config.seed)
    names = ("subsets", "lds", "loo_pick", "loo", "noise", "ensemble", "methods")
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(names)}


def _retrain_options(config, cache_dir) -> dict:
    return dict(
        models_per_chunk=config.models_per_chunk,
        cache_dir=cache_dir,
        progress=config.progress,
    )


def lds_truth(config, setting, train, queries, k, cache_dir) -> Truth:
    """The LDS ground truth; LOO is added by :func:`add_loo_truth`."""
    weights = evaluate.random_subsets(k["subsets"], config.subsets, len(train[1]))
    lds, seconds = common.timed(
        evaluate.retrain,
        setting.train_setup(),
        train,
        queries,
        weights,
        k["lds"],
        num_seeds=config.seeds,
        **_retrain_options(config, cache_dir),
    )
    log(f"LDS ground truth: {config.subsets} subsets x {config.seeds} seeds")
    return Truth(weights, lds, None, None, {"lds_s": seconds})


def add_loo_truth(truth, config, setting, train, queries, k, cache_dir) -> None:
    """Leave-one-out retraining: fixed seed and data order (``batching="fixed"``)."""
    n = len(train[1])
    truth.removed = np.asarray(jax.random.permutation(k["loo_pick"], n))[: config.loo]
    truth.loo, truth.seconds["loo_s"] = common.timed(
        evaluate.retrain,
        setting.train_setup("fixed"),
        train,
        queries,
        evaluate.loo_weights(n, truth.removed),
        k["loo"],
        num_seeds=1,
        **_retrain_options(config, cache_dir),
    )
    log(f"LOO ground truth: {config.loo} removed examples")


# Models ----------------------------------------------------------------------


def train_main(config, setting, task, train, key, keep=()) -> common.Trained:
    """The full-data model with in-training simulation in its last epochs."""
    sim = jaxattr.in_training(
        task,
        setting.optimizer(),
        horizon=config.sim_horizon,
        batch_size=setting.batch_size,
    )
    return common.train_full(
        setting.train_setup("fixed"), train, key, sim, config.sim_epochs, keep
    )


def train_ensemble(config, setting, train, weights, key) -> tuple:
    """The half-data models of TRAK-M: the first ``max(ensembles)`` LDS subsets."""
    size = max(config.ensembles)
    keys_ = jax.random.split(key, size)
    stacked, seconds = common.timed(
        evaluate.train_models,
        setting.train_setup(),
        train,
        weights[:size],
        keys_,
        models_per_chunk=config.models_per_chunk,
    )
    return tuple(evaluate.unstack(stacked)), seconds


# Methods ----------------------------------------------------------------------

METHODS = (
    methods.posthoc,
    methods.in_training,
    methods.trak_full,
    methods.trak_ensembles,
    methods.grad_dot,
    methods.influence_cg,
    methods.influence_explicit,
)


def run_methods(ctx, config, data_for_peers) -> list:
    """Every method's rows; a method that fails or cannot run gets a row saying why."""
    rows = []
    for method in METHODS:
        name = method.__name__
        if name == "influence_explicit" and not config.explicit:
            rows.append(infeasible("IF explicit (GGN)", "skipped (--no-explicit)"))
            continue
        if name == "influence_explicit" and not methods.explicit_feasible(
            common.num_params(ctx.params)
        ):
            rows.append(infeasible("IF explicit (GGN)", explicit_reason(ctx)))
            continue
        start = time.perf_counter()
        try:
            rows += method(ctx)
        except Exception as err:  # a failed method must not lose the others
            traceback.print_exc()
            rows.append(infeasible(name, f"failed: {type(err).__name__}: {err}"))
        log(f"{name}: {time.perf_counter() - start:.0f} s")
    if config.peers:
        rows += peers_mod.run(ctx, data_for_peers, log)
    return rows


def infeasible(name: str, reason: str) -> methods.Result:
    empty = np.zeros((0, 0))
    return methods.Result(
        name, {}, empty, np.zeros(0, int), {}, float("nan"), 0, note=reason
    )


def explicit_reason(ctx) -> str:
    p = common.num_params(ctx.params)
    return (
        f"infeasible: the explicit {p:,} x {p:,} curvature needs "
        f"{4 * p * p / 2**30:.0f} GiB"
    )


# Metrics -----------------------------------------------------------------------


def metrics(row: methods.Result, truth: Truth) -> dict:
    """LDS (margin, -loss, 1-seed margin) and LOO (margin, -loss) on ``row.rows``."""
    if row.scores.size == 0:
        return {}
    q = row.rows
    lds = lambda m: evaluate.lds(row.scores, truth.weights, m[:, :, q]).mean
    loo = lambda m: evaluate.loo(row.scores, truth.removed, m[:, :, q]).mean
    return {
        "lds_margin": lds(truth.lds.margin),
        "lds_neg_loss": lds(truth.lds.neg_loss),
        "lds_margin_1seed": lds(truth.lds.margin[:, :1]),
        "loo_margin": loo(truth.loo.margin),
        "loo_neg_loss": loo(truth.loo.neg_loss),
        "num_queries": int(len(q)),
    }


# Noisy labels --------------------------------------------------------------------


def noisy_labels(config, setting, task, train, queries, truth, k, rows) -> dict:
    """AUC of each method's self-influence for finding flipped labels."""
    noisy_y, flipped = evaluate.flip_labels(k["noise"], train[1], config.noise, 10)
    noisy = (train[0], jnp.asarray(noisy_y))
    keep = tuple(e for e in config.noisy_checkpoints if e < setting.epochs)
    trained = train_main(
        config, setting, task, noisy, jax.random.fold_in(k["loo"], 1), keep
    )
    size = min(max(config.ensembles), config.noisy_ensemble_max or len(truth.weights))
    ensemble = train_ensemble(
        dataclasses.replace(config, ensembles=(size,)),
        setting,
        noisy,
        truth.weights,
        k["ensemble"],
    )
    ctx = methods.Context(
        task,
        trained.params,
        noisy,
        queries,
        np.zeros(0, int),
        np.zeros(0, int),
        truth.weights,
        truth.lds,
        k["methods"],
        config,
        trained,
        ensemble,
    )
    log("noisy-label models trained")
    out, values = {}, {}
    for row in rows:
        out[row.name] = _auc(row, ctx, flipped, values)
    if trained.checkpoints:
        row, out[row.name] = checkpoint_ensemble(ctx, trained, values, flipped)
        rows.append(row)
    return out


def checkpoint_ensemble(ctx, trained, values, flipped) -> tuple:
    """Self-influence summed over training checkpoints, each scaled to unit std.

    A mislabeled example dominates its own gradient early in training, before the
    network memorises it, so earlier checkpoints separate flipped labels better than
    the final model; jaxattr post-hoc runs at its defaults on every checkpoint.
    """
    epochs = sorted(trained.checkpoints)
    name = (
        "jaxattr post-hoc (defaults), checkpoints "
        + ", ".join(map(str, epochs))
        + ", final"
    )
    start = time.perf_counter()
    final = values.get("jaxattr post-hoc (defaults)")
    if final is None:
        final = methods._posthoc_self(ctx, methods.POSTHOC_DEFAULT)
    parts = [np.asarray(final, np.float64)]
    for epoch in epochs:
        at = dataclasses.replace(ctx, params=trained.checkpoints[epoch], cache={})
        parts.append(
            np.asarray(methods._posthoc_self(at, methods.POSTHOC_DEFAULT), np.float64)
        )
    total = sum(np.nan_to_num(v) / max(np.std(np.nan_to_num(v)), 1e-30) for v in parts)
    seconds = time.perf_counter() - start
    log(f"self-influence {name}: {seconds:.0f} s")
    row = infeasible(
        name,
        "noisy labels only: self-influence of the post-hoc defaults on each "
        "checkpoint of the noisy-label run, each divided by its std, summed "
        f"({seconds:.0f} s)",
    )
    return row, evaluate.auc(total, flipped)


def _auc(row, ctx, flipped, values):
    if row.self_influence is None:
        return None
    if row.hparams.get("models", 1) > len(ctx.ensemble[0]) and "half" in row.name:
        return None  # more noisy-label models than noisy_ensemble_max
    try:
        found, seconds = common.timed(row.self_influence, ctx, row.hparams)
    except Exception:
        traceback.print_exc()
        return None
    log(f"self-influence {row.name}: {seconds:.0f} s")
    values[row.name] = found
    return evaluate.auc(np.nan_to_num(found), flipped)


# Table -----------------------------------------------------------------------------

COLUMNS = (
    ("method", 44),
    ("LDS m", 6),
    ("LDS -l", 6),
    ("LDS 1s", 6),
    ("LOO", 6),
    ("AUC", 6),
    ("sim s", 7),
    ("feat s", 7),
    ("train s", 7),
    ("ms/q", 8),
    ("q/TRAK50", 8),
    ("bytes/ex", 9),
)


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(report: dict) -> str:
    """The results as a fixed-width text table with notes below it."""
    head = " ".join(
        name.rjust(w) if i else name.ljust(w) for i, (name, w) in enumerate(COLUMNS)
    )
    lines = [head, "-" * len(head)]
    notes = []
    for i, row in enumerate(report["rows"], 1):
        m, prep = row["metrics"], row["prep"]
        cells = [
            f"{i:2d} {row['name']}"[:44],
            _fmt(m.get("lds_margin")),
            _fmt(m.get("lds_neg_loss")),
            _fmt(m.get("lds_margin_1seed")),
            _fmt(m.get("loo_margin")),
            _fmt(row["auc"]),
            _fmt(prep.get("simulation"), 1),
            _fmt(prep.get("featurisation"), 1),
            _fmt(prep.get("training"), 1),
            _fmt(row["ms_per_query"], 2),
            _fmt(row["query_cost_vs_trak50"], 2),
            _fmt(row["bytes_per_example"] or None),
        ]
        lines.append(
            " ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
            )
        )
        notes.append(
            f"{i:2d}: {_hparams(row)}{'; ' + row['note'] if row['note'] else ''}"
        )
    return "\n".join(lines + [""] + notes + [""] + report["summary"])


def _hparams(row) -> str:
    hp = ", ".join(f"{k}={v}" for k, v in row["hparams"].items())
    return f"chosen {hp}" if hp else "no hyperparameters"


def summary(rows: list, truth: Truth, config: Config) -> list:
    """Footer lines: the forward-only query cost against TRAK-1 and TRAK-M."""
    big = max(config.ensembles)
    trak1, trakm = _trak_cost(rows, config, 1), _trak_cost(rows, config, big)
    tuned = rows_tuned(config)
    lines = [
        f"LDS over {config.subsets} half subsets x {config.seeds} seeds (1s: seed 0 "
        f"only); LOO over {config.loo} removed examples; reported on "
        f"{config.num_test - tuned} queries, tuned on {tuned}.",
    ]
    for r in rows:
        ms = r["ms_per_query"]
        if r["name"].startswith("jaxattr") and trak1 and trakm and np.isfinite(ms):
            lines.append(
                f"{r['name']}: per-query cost {r['ms_per_query']:.2f} ms = "
                f"{r['ms_per_query'] / trak1:.2f} x TRAK-1 ({trak1:.2f} ms), "
                f"{r['ms_per_query'] / trakm:.3f} x TRAK-{big} ({trakm:.2f} ms)"
            )
    return lines


def _trak_cost(rows: list, config: Config, size: int) -> float | None:
    """ms per query of undamped TRAK-``size`` on half models, if it ran."""
    name = methods.ensemble_name(size, config.ens_proj_dim) + ", undamped"
    cost = {r["name"]: r["ms_per_query"] for r in rows}.get(name)
    return cost if cost and np.isfinite(cost) else None


def rows_tuned(config: Config) -> int:
    return max(1, round(config.tune_fraction * config.num_test))


def row_dict(row: methods.Result, truth: Truth, auc) -> dict:
    return {
        "name": row.name,
        "hparams": _jsonable(row.hparams),
        "metrics": metrics(row, truth),
        "auc": auc,
        "prep": row.prep,
        "ms_per_query": row.ms_per_query,
        "bytes_per_example": row.bytes_per_example,
        "grid": [[_jsonable(hp), v] for hp, v in row.grid],
        "note": row.note,
        "extra": _jsonable(row.extra),
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "jaxattr": jaxattr.__version__,
    }


# The run --------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    """Everything a run produced, for the notebook: data, truth, rows, report."""

    train: tuple
    queries: tuple
    truth: Truth
    rows: list
    report: dict


def run(config: Config, data_path=None, cache_dir=None, on_partial=None) -> Bench:
    """Runs the whole benchmark and returns its results (see :class:`Bench`).

    ``on_partial(report)``, if given, receives the report before the noisy-label
    part (which rebuilds every method), so a long run keeps its main table.
    """
    setting = common.SETTINGS[config.setting]
    if config.epochs is not None:
        setting = dataclasses.replace(setting, epochs=config.epochs)
    path = common.mnist_path(data_path)
    if path is None:
        raise SystemExit(f"MNIST not found: pass --data or set ${common.MNIST_ENV}.")
    train, queries = common.load_mnist(path, config.num_train, config.num_test)
    train = (jnp.asarray(train[0]), jnp.asarray(train[1]))
    queries = (jnp.asarray(queries[0]), jnp.asarray(queries[1]))
    task = jaxattr.classification(setting.model.apply)
    k = keys(config)
    truth = lds_truth(config, setting, train, queries, k, cache_dir)
    trained = train_main(config, setting, task, train, jax.random.fold_in(k["loo"], 0))
    log(f"main model trained (simulated epochs {trained.sim_s:.0f} s)")
    ensemble = train_ensemble(config, setting, train, truth.weights, k["ensemble"])
    log(f"{len(ensemble[0])} half-data models trained in {ensemble[1]:.0f} s")
    tune_count = rows_tuned(config)
    ctx = methods.Context(
        task,
        trained.params,
        train,
        queries,
        np.arange(tune_count),
        np.arange(tune_count, config.num_test),
        truth.weights,
        truth.lds,
        k["methods"],
        config,
        trained,
        ensemble,
    )
    rows = run_methods(ctx, config, (setting, train, queries))
    add_loo_truth(truth, config, setting, train, queries, k, cache_dir)
    report_of = lambda aucs: make_report(
        config, setting, task, trained, truth, ensemble, rows, aucs, train, queries
    )
    if on_partial is not None:
        on_partial(report_of({}))
    aucs = (
        noisy_labels(config, setting, task, train, queries, truth, k, rows)
        if config.noisy
        else {}
    )
    return Bench(train, queries, truth, rows, report_of(aucs))


def make_report(
    config, setting, task, trained, truth, ensemble, rows, aucs, train, queries
):
    out_rows = [row_dict(r, truth, aucs.get(r.name)) for r in rows]
    ref = _trak_cost(out_rows, config, max(config.ensembles))
    for r in out_rows:
        r["query_cost_vs_trak50"] = r["ms_per_query"] / ref if ref else None
    base = truth.loo.margin[0, 0]
    main_margins = common.margins(task, trained.params, queries)
    return {
        "config": _jsonable(dataclasses.asdict(config)),
        "setting": setting.describe(),
        "machine": machine(),
        "model": {
            "num_params": common.num_params(trained.params),
            "test_accuracy": common.accuracy(
                setting.model.apply, trained.params, queries
            ),
            "train_accuracy": common.accuracy(
                setting.model.apply, trained.params, train
            ),
            "plain_run_s": trained.plain_run_s,
            "sim_epochs_s": trained.sim_s,
            "max_margin_diff_vs_loo_base_model": float(
                np.max(np.abs(main_margins - base))
            ),
        },
        "ground_truth_s": truth.seconds,
        "ensemble_training_s": ensemble[1],
        "rows": out_rows,
        "summary": summary(out_rows, truth, config),
    }


# Command line -----------------------------------------------------------------------


def parse(argv=None) -> tuple:
    p = argparse.ArgumentParser(
        prog="python -m bench.lds", description=__doc__.split("\n")[0]
    )
    p.add_argument("--setting", choices=sorted(common.SETTINGS), default="mnist-mlp")
    p.add_argument("--quick", action="store_true", help="small sizes, under 5 minutes")
    p.add_argument(
        "--data", help="mnist.npz (default $JAXATTR_MNIST or ../shared/data)"
    )
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--cache-dir", default=str(common.REPO / "bench/.cache"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    ints = (
        "num_train",
        "num_test",
        "epochs",
        "subsets",
        "seeds",
        "loo",
        "sim_epochs",
        "sim_horizon",
        "ens_proj_dim",
        "full_proj_dim",
        "cg_iters",
        "cg_queries",
        "seed",
        "models_per_chunk",
    )
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--ensembles", type=lambda s: tuple(int(v) for v in s.split(",")))
    for flag in ("noisy", "peers", "explicit"):
        p.add_argument(f"--no-{flag}", dest=flag, action="store_false", default=None)
    args = p.parse_args(argv)
    values = setting_defaults(args.setting) | (QUICK if args.quick else {})
    for name in (*ints, "ensembles", "noisy", "peers", "explicit"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    config = Config(setting=args.setting, progress=args.progress, **values)
    return config, args


def main(argv=None) -> int:
    config, args = parse(argv)
    log(f"{config.setting}: {config}")
    cache = None if args.no_cache else args.cache_dir
    partial = lambda report: write(report, args.out, "before the noisy-label part")
    bench = run(config, args.data, cache, on_partial=partial if args.out else None)
    print(f"{config.setting}: {bench.report['setting']}")
    print(table(bench.report))
    write(bench.report, args.out)
    return 0


def write(report: dict, path: str | None, stage: str | None = None) -> None:
    """Writes the report as JSON (``stage`` marks an unfinished one)."""
    if path is None:
        return
    report = dict(report, stage=stage or "complete")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    if stage is not None:
        log(f"wrote {path} ({stage}):\n{table(report)}")


if __name__ == "__main__":
    sys.exit(main())
